"""The fine-tuning runs behind the recipes: arguments, data, Trainer, report.

`run_text_classification(argv)` and `run_causal_lm(argv)` parse the recipe flags (script arguments, every
`FreezeConfig` field and every `TrainingArguments` field), optionally time full fine-tuning, train with the chosen
method, evaluate, print the report and save the model, its card, the timeline plot and `results.json`. The recipes
in the repository's `recipes/` folder are `accelerate launch` scripts that call them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    DataCollatorWithPadding,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
)

from . import assets
from .atomic import write_text_atomic
from .callback import FreezeCallback
from .checkpoint import full_metadata, write_metadata
from .config import FreezeConfig
from .data import causal_lm_data, classification_data
from .freezing import frozen_boundary, get_layout
from .hub import PLOT_NAME, build_model_card, describe_policy, evaluation_metrics, write_model_card
from .metrics import load_metric
from .report import StepTimerCallback, format_phases, format_timeline, phases, plot_timeline
from .trainer import FreezeTrainer

METHODS = ("freeze_cache", "freeze", "full")
# TrainingArguments defaults shared by the recipes (each recipe adds its own batch sizes and output_dir).
TRAINING_DEFAULTS = {
    "num_train_epochs": 2,
    "learning_rate": 5e-5,
    "eval_strategy": "epoch",
    "save_strategy": "no",
    "logging_steps": 20,
    "report_to": "none",
    "seed": 42,
}


@dataclass
class ScriptArguments:
    """Flags both runs share: the method, the text column, truncation, subsets, the measured baseline."""

    method: str = field(
        default="freeze_cache",
        metadata={"help": "freeze_cache: FreezeTrainer; freeze: Trainer + FreezeCallback; full: no freezing.",
                  "choices": METHODS},
    )
    text_column: str = field(default="text", metadata={"help": "Column with the text."})
    max_length: int = field(default=128, metadata={"help": "Truncate examples to this many tokens."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training examples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N test examples."})
    baseline_steps: int = field(
        default=0,
        metadata={"help": "Before training, time this many steps of full fine-tuning in the same run to report the "
                          "speed-up (0: skip)."},
    )

    def subsets(self, data):
        train, test = data["train"], data["test"]
        if self.max_train_samples is not None:
            train = train.select(range(min(self.max_train_samples, len(train))))
        if self.max_eval_samples is not None:
            test = test.select(range(min(self.max_eval_samples, len(test))))
        return train, test


@dataclass
class ClassificationArguments(ScriptArguments):
    """Flags of `run_text_classification` besides `FreezeConfig`'s and `TrainingArguments`'."""

    model_name_or_path: str = field(default="minilm", metadata={"help": "minilm | mpnet | a path | a Hub name"})
    dataset: str = field(default="rotten_tomatoes", metadata={"help": "rotten_tomatoes | files | a Hub name"})
    label_column: str = field(default="label", metadata={"help": "Column with the integer label."})


@dataclass
class CausalLMArguments(ScriptArguments):
    """Flags of `run_causal_lm` besides `FreezeConfig`'s and `TrainingArguments`'."""

    model_name_or_path: str = field(default="smollm2", metadata={"help": "smollm2 | a path | a Hub name"})
    dataset: str = field(default="rotten_tomatoes", metadata={"help": "rotten_tomatoes | hamlet | files | Hub"})


CLASSIFICATION_DEFAULTS = {
    "output_dir": "outputs/text_classification",
    "per_device_train_batch_size": 32,
    "per_device_eval_batch_size": 128,
}
CAUSAL_LM_DEFAULTS = {
    "output_dir": "outputs/causal_lm",
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 16,
}


def run_text_classification(argv: list[str] | None = None) -> dict[str, Any]:
    """Fine-tune a sequence classifier with the recipe's flags, report what freezing gained, save the outputs.

    Args:
        argv (`list[str]`, *optional*): the flags (`--model_name_or_path`, `--dataset`, `--method`, every
            `FreezeConfig` and `TrainingArguments` field); `None` reads `sys.argv`.

    Returns:
        `dict`: what `results.json` holds: `metrics` (eval accuracy, F1, loss), `timeline`, `boundary`, `phases`,
        `steps`, `train_step_seconds`, and `speedup` with `--baseline_steps`.

    Example:
        ```python
        results = run_text_classification(["--model_name_or_path", "minilm", "--output_dir", "outputs/minilm",
                                           "--max_train_samples", "256"])
        results["metrics"]["eval_accuracy"], results["boundary"]
        ```
    """
    script, freeze_config, training_args = parse_arguments(ClassificationArguments, CLASSIFICATION_DEFAULTS, argv)
    setup_logging(training_args)
    make_model, common = prepare_text_classification(script, training_args)
    return train_and_report(script, freeze_config, make_model, common, task="text-classification")


def run_causal_lm(argv: list[str] | None = None) -> dict[str, Any]:
    """Fine-tune a causal language model with the recipe's flags, report what freezing gained, save the outputs.

    Args:
        argv (`list[str]`, *optional*): the flags, as for `run_text_classification`; `None` reads `sys.argv`.

    Returns:
        `dict`: as for `run_text_classification`, with the eval perplexity in `metrics`.

    Example:
        ```python
        results = run_causal_lm(["--dataset", "hamlet", "--max_train_samples", "2000", "--output_dir", "out"])
        results["metrics"]["eval_perplexity"]
        ```
    """
    script, freeze_config, training_args = parse_arguments(CausalLMArguments, CAUSAL_LM_DEFAULTS, argv)
    setup_logging(training_args)
    make_model, common = prepare_causal_lm(script, training_args)
    return train_and_report(script, freeze_config, make_model, common, task="text-generation")


def prepare_text_classification(script: ClassificationArguments, training_args: TrainingArguments):
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


def prepare_causal_lm(script: CausalLMArguments, training_args: TrainingArguments):
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


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of each next token (`preprocess_logits_for_metrics`: keeps eval memory small)."""
    shifted_labels = labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2).float(), shifted_labels.clamp_min(0), reduction="none"
    )
    return nll.masked_fill(shifted_labels == -100, 0.0)

def parse_arguments(script_class: type, defaults: dict[str, Any], argv: list[str] | None):
    """(script arguments, FreezeConfig, TrainingArguments) from the command line, with the recipe's defaults."""
    parser = HfArgumentParser((script_class, FreezeConfig, TrainingArguments))
    parser.set_defaults(**{**TRAINING_DEFAULTS, **defaults})
    return parser.parse_args_into_dataclasses(argv)


def setup_logging(training_args: TrainingArguments) -> None:
    level = logging.INFO if training_args.should_log else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S", level=logging.WARNING)
    logging.getLogger("hf_freeze").setLevel(level)
    transformers.utils.logging.set_verbosity_warning()


def measure_full_step(make_trainer: Callable[[TrainingArguments], Trainer], training_args: TrainingArguments,
                      steps: int, warmup: int = 2) -> float:
    """Mean seconds per optimizer step of full fine-tuning, over `steps` steps after `warmup`, in this process."""
    with tempfile.TemporaryDirectory() as tmp:
        args = dataclasses.replace(training_args, output_dir=tmp, max_steps=steps + warmup, eval_strategy="no",
                                   save_strategy="no", logging_strategy="no", push_to_hub=False, report_to="none")
        timer = StepTimerCallback()
        trainer = make_trainer(args)
        trainer.add_callback(timer)
        trainer.train()
    return statistics.mean(r.seconds for r in timer.records[warmup:])


def train_and_report(script: ScriptArguments, freeze_config: FreezeConfig, make_model: Callable[[], Any],
                     common: dict[str, Any], task: str) -> dict[str, Any]:
    """Optionally time full fine-tuning, train with `script.method`, evaluate, and report (see `summarize`).

    `common` holds the Trainer keyword arguments shared by every method (args, datasets, collator, metrics).
    """
    training_args = common["args"]
    baseline_step = None
    if script.baseline_steps:
        baseline_step = measure_full_step(lambda args: Trainer(model=make_model(), **{**common, "args": args}),
                                          training_args, script.baseline_steps)
    torch.manual_seed(training_args.seed)
    timer = StepTimerCallback()
    model = make_model()
    if script.method == "freeze_cache":
        trainer = FreezeTrainer(model=model, freeze_config=freeze_config, callbacks=[timer], **common)
    elif script.method == "freeze":
        trainer = Trainer(model=model, callbacks=[FreezeCallback(freeze_config), timer], **common)
    else:
        trainer = Trainer(model=model, callbacks=[timer], **common)
    trainer.train()
    metrics = trainer.evaluate()
    return summarize(trainer, timer, metrics, script, baseline_step, task=task,
                     title=f"{script.model_name_or_path} on {script.dataset}")


def summarize(trainer: Trainer, timer: StepTimerCallback, metrics: dict[str, float], script: ScriptArguments,
              baseline_step: float | None, task: str, title: str) -> dict[str, Any]:
    """Print the report; save the model, its card, the timeline plot and `results.json` in `output_dir`."""
    output_dir = Path(trainer.args.output_dir)
    callback = next((cb for cb in trainer.callback_handler.callbacks if isinstance(cb, FreezeCallback)), None)
    timeline = callback.timeline if callback else []
    rows = phases(timer.records)
    train_seconds = sum(r.seconds for r in timer.records)
    result: dict[str, Any] = {
        "title": title,
        "method": script.method,
        "metrics": metrics,
        "steps": len(timer.records),
        "train_step_seconds": train_seconds,
        "boundary": frozen_boundary(trainer.model),
        "timeline": timeline,
        "phases": rows,
        "logs": trainer.state.log_history,
    }
    lines = [f"\n==== hf_freeze: {title} ({script.method}) ===="]
    for key in ("eval_accuracy", "eval_f1", "eval_perplexity", "eval_loss"):
        if key in metrics:
            lines.append(f"{key[5:]:>11}: {metrics[key]:.4f}")
    lines += ["freeze timeline:", format_timeline(timeline), "step time by phase:", format_phases(rows, baseline_step)]
    lines.append(f"training steps: {len(timer.records)} in {train_seconds:.1f} s (sum of optimizer-step wall times)")
    if baseline_step:
        estimate = baseline_step * len(timer.records)
        result.update(full_step_seconds=baseline_step, full_estimate_seconds=estimate,
                      speedup=estimate / train_seconds)
        lines.append(
            f"full fine-tuning, estimated from {script.baseline_steps} steps measured in this run: "
            f"{baseline_step:.3f} s/step x {len(timer.records)} steps = {estimate:.1f} s"
        )
        lines.append(f"speed-up over full fine-tuning: {estimate / train_seconds:.2f}x")
    print("\n".join(lines), flush=True)

    if trainer.is_world_process_zero():
        trainer.save_model(str(output_dir))
        metadata = full_metadata(trainer.model, timeline=timeline)
        write_metadata(output_dir, metadata)  # FreezeTrainer's save wrote it too; a plain Trainer's did not
        num_blocks = get_layout(trainer.model).num_blocks
        plot_timeline(timer.records, output_dir / PLOT_NAME, title=f"{title}: {script.method}",
                      baseline_step_s=baseline_step, num_blocks=num_blocks)
        card = build_model_card(
            metadata, model_name=output_dir.name, repo_id=trainer.args.hub_model_id or str(output_dir), task=task,
            dataset=script.dataset, metrics=evaluation_metrics(metrics), log_history=trainer.state.log_history,
            speedup=result.get("speedup"), policy=describe_policy(callback.config) if callback else None,
            plot=PLOT_NAME,
        )
        write_model_card(card, output_dir)
        write_text_atomic(output_dir / "results.json", json.dumps(result, indent=2, default=str))
        print(f"saved the model, README.md (model card), freeze_timeline.png and results.json to {output_dir}")
    return result
