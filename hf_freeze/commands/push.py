"""`hf-freeze push DIR REPO_ID`: upload a folder saved by hf_freeze (full or suffix-only) with its model card."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `push` subcommand."""
    parser = subparsers.add_parser(
        "push", help="Push a saved folder (full or suffix-only) to the Hub, with a model card.",
        description="Push a folder holding hf_freeze.json to a Hub model repo (created if needed). A folder "
                    "without README.md gets a model card rendered from its metadata.",
    )
    parser.add_argument("directory", metavar="DIR", help="folder written by save_suffix / save_pretrained / "
                                                         "FreezeTrainer")
    parser.add_argument("repo_id", metavar="REPO_ID", help="the Hub repo, `user/name`")
    parser.add_argument("--token", help="a write token (default: `hf auth login` / HF_TOKEN)")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--revision", help="branch to commit to (default: main)")
    parser.add_argument("--message", default="Upload with hf_freeze", help="commit message")
    parser.add_argument("--base-model-id", metavar="HUB_ID",
                        help="the base's Hub id, when the folder knows its base only by a local path: recorded in "
                             "hf_freeze.json (so load_suffix finds the base on the Hub) and in the card's base_model")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Push; errors (a missing or corrupt folder, a bad repo id, no token, offline, a refusal) reach
    `hf_freeze.cli.main`, which prints them in one line on stderr."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    from ..hub import push_folder
    from .errors import CommandError, check_model_folder

    directory = Path(args.directory)
    if not directory.is_dir():
        raise CommandError(f"{args.directory} is not a folder; pass the folder save_suffix, save_pretrained or "
                           "FreezeTrainer wrote.")
    check_model_folder(directory, what="the folder")
    try:
        validate_repo_id(args.repo_id)
    except HFValidationError:
        raise CommandError(f"{args.repo_id!r} is not a valid Hub repo id; use `user/name` (letters, digits, '-', "
                           "'_', '.').") from None
    if args.base_model_id is not None:
        try:
            validate_repo_id(args.base_model_id)
        except HFValidationError:
            raise CommandError(f"--base-model-id {args.base_model_id!r} is not a valid Hub id; use `user/name`."
                               ) from None
    url = push_folder(args.directory, args.repo_id, token=args.token, private=args.private or None,
                      revision=args.revision, commit_message=args.message, base_model_id=args.base_model_id)
    print(f"pushed {args.directory} to {args.repo_id}: {url}", file=sys.stdout)
    return 0
