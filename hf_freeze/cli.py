"""The `hf-freeze` command: `inspect`, `push`, `train` (and `serve` where installed).

Each subcommand lives in a module exposing `register(subparsers) -> None`, which adds its parser and sets
`func` (called with the parsed namespace; returns the exit status). Heavy imports happen inside `func`, so
`hf-freeze --help` is quick.

Example:
    ```
    hf-freeze inspect out/suffix
    hf-freeze push out/suffix me/minilm-rotten-tomatoes
    hf-freeze train text-classification --model_name_or_path minilm --output_dir out
    ```
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Modules whose `register(subparsers)` adds a subcommand, in `--help` order.
SUBCOMMAND_MODULES = (
    "hf_freeze.commands.inspect",
    "hf_freeze.commands.push",
    "hf_freeze.commands.train",
    "hf_freeze.serving.cli",
)


def build_parser() -> argparse.ArgumentParser:
    """The `hf-freeze` parser with every subcommand registered."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="hf-freeze",
        description="Freeze converged blocks of Hugging Face models; inspect, push, train and serve frozen-prefix models.",
    )
    parser.add_argument("--version", action="version", version=f"hf_freeze {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `hf-freeze` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
