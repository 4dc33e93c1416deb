"""`hf-freeze push DIR REPO_ID`: upload a folder saved by hf_freeze (full or suffix-only) with its model card."""

from __future__ import annotations

import argparse


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
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import CheckpointError
    from ..hub import PushError, push_folder

    try:
        url = push_folder(args.directory, args.repo_id, token=args.token, private=args.private or None,
                          revision=args.revision, commit_message=args.message)
    except (PushError, CheckpointError) as error:
        print(f"hf-freeze push: {error}")
        return 1
    print(f"pushed {args.directory} to {args.repo_id}: {url}")
    return 0
