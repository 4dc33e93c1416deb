"""The `hf-freeze` command: `inspect`, `push`, `train` (and `serve` where installed).

Each subcommand lives in a module exposing `register(subparsers) -> None`, which adds its parser and sets
`func` (called with the parsed namespace; returns the exit status). Heavy imports happen inside `func`, so
`hf-freeze --help` is quick.

A failing subcommand prints one line on stderr, `hf-freeze COMMAND: error: ...`, naming the problem and the fix,
and exits with a non-zero status (`commands/errors.py`); `--debug` (or `HF_FREEZE_DEBUG=1`) shows the traceback.

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
        description="Freeze converged blocks of Hugging Face models; inspect, push, train and serve them.",
    )
    parser.add_argument("--version", action="version", version=f"hf_freeze {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error instead of one line (or set HF_FREEZE_DEBUG=1)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `hf-freeze` console script; returns the exit status."""
    from .commands.errors import debugging, error_line

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as error:
        if debugging(args.debug):
            raise
        print(error_line(args.command, error), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
