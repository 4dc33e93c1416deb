"""Shared helpers of the benchmarks: stamps (version, commit, machine), data batches, timing, markdown tables."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))

from hf_freeze.atomic import write_text_atomic  # noqa: E402  (after the path: runs from a plain checkout too)


def stamp() -> dict[str, str]:
    """What produced a result: library versions, git commit, machine."""
    import transformers

    import hf_freeze

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "hf_freeze": hf_freeze.__version__,
        "commit": commit,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def median_seconds(step: Callable[[], None], repeats: int, warmup: int = 1) -> float:
    """Median wall time of `step()` over `repeats` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        _sync()
        started = time.perf_counter()
        step()
        _sync()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def write_results(name: str, payload: dict, table: str) -> None:
    """`results/<name>.json` (the payload) and `results/<name>.md` (the stamp, then the table), each atomically."""
    write_text_atomic(RESULTS / f"{name}.json", json.dumps(payload, indent=2, default=str))
    header = f"<!-- {json.dumps(payload['stamp'])} -->\n"
    write_text_atomic(RESULTS / f"{name}.md", header + table + "\n")
    print(table)
    print(f"\nwritten to {RESULTS / name}.md/.json")


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
