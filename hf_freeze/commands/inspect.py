"""`hf-freeze inspect MODEL_OR_DIR`: the block layout, and for a folder saved by hf_freeze its base, its boundary
and whether the base's prefix fingerprint matches."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `inspect` subcommand."""
    parser = subparsers.add_parser(
        "inspect", help="Show a model's layout (embeddings, blocks, head) and a saved folder's freeze metadata.",
        description="Show the layout hf_freeze finds (embeddings, blocks, head, parameters per unit). For a folder "
                    "saved by hf_freeze, also its base, its boundary and whether the base's prefix fingerprint "
                    "matches the one recorded (this loads the base).",
    )
    parser.add_argument("model", metavar="MODEL_OR_DIR",
                        help="a folder, a Hub id, or a packaged model name (minilm, mpnet, smollm2)")
    parser.add_argument("--base", help="check against this base (path or Hub id) instead of the recorded one")
    parser.add_argument("--no-check", action="store_true", help="do not load the base to check its fingerprint")
    parser.add_argument("--blocks-path", help="dotted path of the blocks when detection fails")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the report; errors (a missing path, a bad or unreachable Hub id, a corrupt folder) reach
    `hf_freeze.cli.main`, which prints them in one line on stderr."""
    from .errors import check_model_source

    source = check_model_source(args.model)
    if args.base is not None:
        check_model_source(args.base, what="the base")
    report = inspect_model(source, base=args.base, check=not args.no_check, blocks_path=args.blocks_path)
    report["model"] = args.model
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    matches = report.get("base_check", {}).get("matches", True)
    return {True: 0, False: 2}.get(matches, 1)  # 2: the base differs; 1: it could not be checked


def inspect_model(name_or_path: str, *, base: str | None = None, check: bool = True,
                  blocks_path: str | None = None) -> dict[str, Any]:
    """What `hf-freeze inspect` prints, as a dict: `layout`, and for saved folders `metadata` and `base_check`."""
    from ..assets import resolve_model
    from ..checkpoint import (
        METADATA_NAME,
        BaseMismatchError,
        CheckpointError,
        check_base,
        load_pretrained,
        load_suffix,
        read_metadata,
        resolve_base,
    )

    path = _saved_repo(resolve_model(name_or_path))
    report: dict[str, Any] = {"model": name_or_path}
    if (Path(path) / METADATA_NAME).is_file():
        metadata = read_metadata(path)
        report["metadata"] = {k: getattr(metadata, k) for k in (
            "suffix_only", "base_model", "base_revision", "boundary", "num_blocks", "blocks_path",
            "prefix_fingerprint", "untied", "library_version", "format_version")}
        report["metadata"]["freezes"] = len(metadata.timeline)
        base_model = None
        if check and metadata.boundary is not None:
            try:
                base_model = resolve_base(base, metadata)
                check_base(base_model, metadata, where=str(path))
                report["base_check"] = {"matches": True, "base": base or metadata.base_model}
            except BaseMismatchError as error:
                report["base_check"] = {"matches": False, "base": base or metadata.base_model, "error": str(error)}
            except (OSError, CheckpointError) as error:  # offline, not found, or no base recorded
                report["base_check"] = {"matches": None, "error": f"could not load the base: {error}"}
        if metadata.suffix_only:
            if report.get("base_check", {}).get("matches"):
                model = load_suffix(path, base=base_model)
            else:  # the layout of the suffix's own config, without weights
                model = _model_from_config(path, metadata.architecture)
        else:
            model = load_pretrained(path)
    else:
        model = load_pretrained(path)
    report["layout"] = describe_layout(model, blocks_path)
    return report


def describe_layout(model: Any, blocks_path: str | None = None) -> dict[str, Any]:
    """Embeddings, blocks and head of `model` with their parameter counts, and its frozen boundary."""
    from ..freezing import frozen_boundary, get_layout

    layout = get_layout(model, blocks_path)

    def count(modules: list) -> int:
        return sum(p.numel() for p in {id(p): p for m in modules for p in m.parameters()}.values())

    head = layout.head_parameters(model)
    return {
        "class": type(model).__name__,
        "embeddings": {"modules": list(layout.embedding_names), "parameters": count(list(layout.embeddings))},
        "blocks": {"path": layout.blocks_path, "count": layout.num_blocks,
                   "parameters_per_block": [count([block]) for block in layout.blocks]},
        "head": {"parameters": sum(p.numel() for p in head)},
        "frozen_boundary": frozen_boundary(model),
    }


def format_report(report: dict[str, Any]) -> str:
    """The text `hf-freeze inspect` prints."""
    layout = report["layout"]
    blocks = layout["blocks"]
    per_block = blocks["parameters_per_block"]
    same = len(set(per_block)) == 1
    lines = [
        f"{report['model']}: {layout['class']}",
        f"  embeddings: {', '.join(layout['embeddings']['modules'])} ({layout['embeddings']['parameters']:,} params)",
        f"  blocks:     {blocks['count']} at `{blocks['path']}` ("
        + (f"{per_block[0]:,} params each)" if same else ", ".join(f"{n:,}" for n in per_block) + " params)"),
        f"  head:       {layout['head']['parameters']:,} params",
        f"  frozen:     {'nothing' if layout['frozen_boundary'] is None else layout['frozen_boundary']}",
    ]
    metadata = report.get("metadata")
    if metadata:
        kind = "suffix-only" if metadata["suffix_only"] else "full"
        lines += [
            f"saved by hf_freeze {metadata['library_version']} ({kind} checkpoint, "
            f"format {metadata['format_version']})",
            f"  base:       {metadata['base_model']}"
            + (f" @ {metadata['base_revision']}" if metadata["base_revision"] else ""),
            f"  boundary:   {metadata['boundary']} of {metadata['num_blocks']} blocks; "
            f"{metadata['freezes']} freeze event(s)",
            f"  prefix fingerprint: {metadata['prefix_fingerprint']}",
        ]
        check = report.get("base_check")
        if check is None:
            lines.append("  base check: skipped")
        elif check["matches"]:
            lines.append(f"  base check: the base's prefix fingerprint matches ({check['base']})")
        elif check["matches"] is None:
            lines.append(f"  base check: not done, {check['error']}")
        else:
            lines.append(f"  base check: MISMATCH. {check['error']}")
    return "\n".join(lines)


def _saved_repo(path: str) -> str:
    """A Hub repo saved by hf_freeze (it holds `hf_freeze.json`) is downloaded and inspected as a folder; any other
    name is returned as is (a local folder, or a plain model `from_pretrained` finds)."""
    from ..checkpoint import METADATA_NAME, is_hub_id

    if not is_hub_id(path):
        return path
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        hf_hub_download(path, METADATA_NAME)
    except (EntryNotFoundError, OSError, ValueError):  # not saved by hf_freeze, not on the Hub, or offline
        return path
    return snapshot_download(path)


def _model_from_config(path: str, architecture: str) -> Any:
    import transformers

    return getattr(transformers, architecture)(transformers.AutoConfig.from_pretrained(path))
