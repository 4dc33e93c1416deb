"""What the recipes share: script arguments, logging set-up, the measured full-fine-tuning baseline, the report."""

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

import torch
import transformers
from transformers import HfArgumentParser, Trainer, TrainingArguments

from hf_freeze import FreezeCallback, FreezeConfig, FreezeTrainer, frozen_boundary, get_layout
from hf_freeze.atomic import write_text_atomic
from hf_freeze.checkpoint import full_metadata, write_metadata
from hf_freeze.hub import PLOT_NAME, build_model_card, describe_policy, evaluation_metrics, write_model_card
from hf_freeze.report import StepTimerCallback, format_phases, format_timeline, phases, plot_timeline

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
