"""`evaluate` metric scripts shipped with hf_freeze, loadable offline: `load_metric("accuracy")`."""

from __future__ import annotations

from pathlib import Path

METRICS_DIR = Path(__file__).parent
METRIC_NAMES = ("accuracy", "f1", "perplexity")


def metric_path(name: str) -> str:
    """Folder of a shipped metric script, for `evaluate.load(path)`."""
    if name not in METRIC_NAMES:
        raise ValueError(f"Unknown shipped metric {name!r}; choose one of {list(METRIC_NAMES)}.")
    return str(METRICS_DIR / name)


def load_metric(name: str):
    """`evaluate.load` of a shipped metric; works without the Hub."""
    import evaluate

    return evaluate.load(metric_path(name))
