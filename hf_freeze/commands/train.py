"""`hf-freeze train TASK [recipe flags]`: run a recipe (`hf_freeze.training`) with its own flags."""

from __future__ import annotations

import argparse

TASKS = {"text-classification": "run_text_classification", "causal-lm": "run_causal_lm"}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `train` subcommand."""
    parser = subparsers.add_parser(
        "train", help="Fine-tune with a recipe (text classification or causal LM).",
        description="Run a training recipe. Everything after TASK goes to the recipe: its script arguments, "
                    "FreezeConfig and TrainingArguments flags (`hf-freeze train TASK --help` lists them).",
    )
    parser.add_argument("task", choices=sorted(TASKS), metavar="TASK", help=f"one of {', '.join(sorted(TASKS))}")
    parser.add_argument("recipe_args", nargs=argparse.REMAINDER, help="flags for the recipe")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Check the model the recipe will load (a missing path, a bad, unknown or unreachable Hub id fail here in one
    line), then run the recipe."""
    from .. import training
    from .errors import check_model_source

    model, _ = _model_flag().parse_known_args(list(args.recipe_args))
    if model.model_name_or_path is not None:
        check_model_source(model.model_name_or_path)
    getattr(training, TASKS[args.task])(list(args.recipe_args))
    return 0


def _model_flag() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--model_name_or_path", "--model-name-or-path")
    return parser
