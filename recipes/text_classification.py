"""Fine-tune a sequence classifier with hf_freeze, and report what freezing gained.

    accelerate launch --config_file recipes/configs/cpu.yaml recipes/text_classification.py \\
        --model_name_or_path minilm --dataset rotten_tomatoes --output_dir outputs/minilm-rotten-tomatoes

Every `FreezeConfig` field (`--policy gradnorm`, `--cache auto`, ...) and every `TrainingArguments` field
(`--learning_rate`, `--push_to_hub`, ...) is a flag. `--method` picks what to run: `freeze_cache` (FreezeTrainer,
the default), `freeze` (Trainer + FreezeCallback, no cache) or `full` (plain fine-tuning, the baseline).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import numpy as np
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    TrainingArguments,
)

from hf_freeze import FreezeConfig, assets
from hf_freeze.metrics import load_metric
from recipes.common import ScriptArguments, parse_arguments, setup_logging, train_and_report
from recipes.data import classification_data

DEFAULTS = {
    "output_dir": "outputs/text_classification",
    "per_device_train_batch_size": 32,
    "per_device_eval_batch_size": 128,
}


@dataclass
class ClassificationArguments(ScriptArguments):
    model_name_or_path: str = field(default="minilm", metadata={"help": "minilm | mpnet | a path | a Hub name"})
    dataset: str = field(default="rotten_tomatoes", metadata={"help": "rotten_tomatoes | files | a Hub name"})
    label_column: str = field(default="label", metadata={"help": "Column with the integer label."})


def main(argv: list[str] | None = None) -> dict:
    return run(*parse_arguments(ClassificationArguments, DEFAULTS, argv))


def run(script: ClassificationArguments, freeze_config: FreezeConfig, training_args: TrainingArguments) -> dict:
    setup_logging(training_args)
    make_model, common = prepare(script, training_args)
    return train_and_report(script, freeze_config, make_model, common, task="text-classification")


def prepare(script: ClassificationArguments, training_args: TrainingArguments):
    """A model factory and the Trainer keyword arguments shared by every method (data, collator, metrics)."""
    path = assets.resolve_model(script.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    data = classification_data(script.dataset, tokenizer, script.text_column, script.label_column,
                               script.max_length, seed=training_args.seed)
    train, test = script.subsets(data)
    num_labels = len(set(train["labels"]))

    def make_model():
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
        model.config.pad_token_id = tokenizer.pad_token_id
        return model

    accuracy, f1 = load_metric("accuracy"), load_metric("f1")

    def compute_metrics(prediction):
        predicted = np.argmax(prediction.predictions, axis=-1)
        scores = accuracy.compute(predictions=predicted, references=prediction.label_ids)
        scores.update(f1.compute(predictions=predicted, references=prediction.label_ids,
                                 average="binary" if num_labels == 2 else "macro"))
        return scores

    common = dict(args=training_args, train_dataset=train, eval_dataset=test, processing_class=tokenizer,
                  data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=compute_metrics)
    return make_model, common


if __name__ == "__main__":
    main(sys.argv[1:])
