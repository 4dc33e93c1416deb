"""Model cards that record what was frozen and when (template: `model_cards/freeze_section.md`)."""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path
from typing import Any

from .atomic import write_text_atomic
from .config import FreezeConfig
from .report import describe_boundary

TEMPLATE = "freeze_section.md"
_POLICY_KNOBS = {
    "gradnorm": ("interval", "interval_steps", "percentile", "freeze_start", "max_boundary"),
    "schedule": ("schedule", "interval", "interval_steps", "schedule_fraction", "freeze_start", "freeze_level",
                 "max_boundary"),
    "fixed": ("boundary",),
}


def render_freeze_section(
    config: FreezeConfig,
    timeline: list[dict[str, Any]],
    *,
    num_blocks: int,
    blocks_path: str,
    boundary: int | None,
    untied: list[str] | None = None,
    cache_summary: str | None = None,
) -> str:
    """The markdown section describing a run's freezing: policy, final boundary, and the timeline."""
    from . import __version__

    template = importlib.resources.files("hf_freeze.model_cards").joinpath(TEMPLATE).read_text()
    knobs = ", ".join(f"{k}={getattr(config, k)!r}" for k in _POLICY_KNOBS[config.policy])
    rows = "\n".join(
        f"| {e['step']} | {e['epoch']:.2f} | {describe_boundary(e['boundary'])} | {e['reason']} |" for e in timeline
    ) or "| - | - | nothing | no freeze was decided |"
    return template.format(
        version=__version__,
        num_blocks=num_blocks,
        blocks_path=blocks_path,
        boundary_text=describe_boundary(boundary) + ("" if boundary is None else f" (boundary {boundary})"),
        boundary_value=boundary,
        policy=config.policy,
        policy_knobs=knobs,
        cache_text=cache_summary or f"{config.cache}",
        untied_text=(f"- Untied from the frozen embeddings (kept training): {', '.join(untied)}.\n" if untied else ""),
        timeline_rows=rows,
    )


def append_to_model_card(readme: str | os.PathLike, section: str) -> None:
    """Append `section` to a model card (replacing an earlier hf_freeze section), atomically."""
    path = Path(readme)
    text = path.read_text() if path.exists() else ""
    marker = "## Layer freezing (hf_freeze)"
    if marker in text:
        text = text[: text.index(marker)].rstrip() + "\n"
    write_text_atomic(path, (text.rstrip() + "\n\n" if text else "") + section)
