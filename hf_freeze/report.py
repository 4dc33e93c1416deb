"""Seeing what freezing did: per-step wall times, phases, a text report and a PNG of the freeze timeline."""

from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from .freezing import frozen_boundary


@dataclass(frozen=True)
class StepRecord:
    step: int
    epoch: int
    seconds: float
    boundary: int | None


class StepTimerCallback(TrainerCallback):
    """Records the wall time of every optimizer step with the boundary it ran at (`records`)."""

    def __init__(self) -> None:
        self.records: list[StepRecord] = []
        self._started = 0.0
        self._boundary: int | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._boundary = frozen_boundary(kwargs["model"])
        self._started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        epoch = math.ceil(state.epoch or 0) - 1
        self.records.append(StepRecord(state.global_step, max(epoch, 0), time.perf_counter() - self._started,
                                       self._boundary))


def phases(records: list[StepRecord]) -> list[dict[str, Any]]:
    """Runs of consecutive steps with the same boundary and epoch, with their median step time."""
    groups: list[list[StepRecord]] = []
    for record in records:
        if groups and (groups[-1][-1].boundary, groups[-1][-1].epoch) == (record.boundary, record.epoch):
            groups[-1].append(record)
        else:
            groups.append([record])
    return [
        {
            "epoch": group[0].epoch + 1,
            "boundary": "none" if group[0].boundary is None else group[0].boundary,
            "steps": f"{group[0].step}-{group[-1].step}",
            "count": len(group),
            "median_step_s": statistics.median(r.seconds for r in group),
            "total_s": sum(r.seconds for r in group),
        }
        for group in groups
    ]


def describe_boundary(boundary: int | None) -> str:
    if boundary is None:
        return "nothing"
    if boundary == 0:
        return "the embeddings"
    if boundary == 1:
        return "the embeddings and block 0"
    return f"the embeddings and blocks 0-{boundary - 1}"


def format_timeline(timeline: list[dict[str, Any]]) -> str:
    if not timeline:
        return "  (no block was frozen)"
    return "\n".join(
        f"  step {e['step']:>5} (epoch {e['epoch']:.2f}, {e['seconds']:.0f}s): froze {describe_boundary(e['boundary'])}"
        f" - {e['reason']}"
        for e in timeline
    )


def format_phases(rows: list[dict[str, Any]], baseline_step_s: float | None = None) -> str:
    lines = [f"  {'epoch':>5} {'boundary':>8} {'steps':>11} {'median step':>12} {'total':>8}"
             + ("  vs full step" if baseline_step_s else "")]
    for row in rows:
        line = (f"  {row['epoch']:>5} {row['boundary']!s:>8} {row['steps']:>11} {row['median_step_s']:>11.3f}s"
                f" {row['total_s']:>7.1f}s")
        if baseline_step_s:
            line += f"  {baseline_step_s / row['median_step_s']:>6.2f}x faster"
        lines.append(line)
    return "\n".join(lines)


def plot_timeline(records: list[StepRecord], path: str | Path, title: str = "hf_freeze: freeze timeline",
                  baseline_step_s: float | None = None, num_blocks: int | None = None) -> Path:
    """A PNG with the step time (left axis) and the frozen boundary (right axis) against the optimizer step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r.step for r in records]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.plot(steps, [r.seconds for r in records], lw=0.8, color="tab:blue", label="step time")
    if baseline_step_s:
        ax.axhline(baseline_step_s, color="tab:gray", ls="--", lw=1, label="full fine-tuning step (measured)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("seconds per step")
    ax.set_ylim(bottom=0)
    twin = ax.twinx()
    twin.step(steps, [-1 if r.boundary is None else r.boundary for r in records], where="post", color="tab:red",
              lw=1.5, label="frozen boundary")
    twin.set_ylabel("frozen blocks (-1: none, 0: embeddings)")
    if num_blocks is not None:
        twin.set_ylim(-1.5, num_blocks + 0.5)
    lines = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    labels = ax.get_legend_handles_labels()[1] + twin.get_legend_handles_labels()[1]
    ax.legend(lines, labels, loc="upper right")
    ax.set_title(title)
    return _save_figure(fig, path, dpi=120)


def plot_boundary_timeline(timeline: list[dict[str, Any]], path: str | Path, *, num_blocks: int, max_steps: int,
                           title: str = "hf_freeze: frozen boundary") -> Path:
    """A PNG of the frozen boundary against the optimizer step, from a freeze timeline alone (no step times)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, boundaries = [0], [-1]
    for event in timeline:
        steps.append(event["step"])
        boundaries.append(event["boundary"])
    steps.append(max(max_steps, steps[-1]))
    boundaries.append(boundaries[-1])
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.step(steps, boundaries, where="post", color="tab:red", lw=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("frozen blocks (-1: none, 0: embeddings)")
    ax.set_ylim(-1.5, num_blocks + 0.5)
    ax.set_title(title)
    return _save_figure(fig, path, dpi=100)


def _save_figure(fig: Any, path: str | Path, *, dpi: int) -> Path:
    """Write `fig` to `path` (PNG) through a temporary file renamed into place, then close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    try:
        fig.tight_layout()
        fig.savefig(tmp, dpi=dpi)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path
