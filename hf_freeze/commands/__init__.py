"""Subcommands of `hf-freeze` (see `hf_freeze/cli.py`): each module exposes `register(subparsers) -> None`."""
