"""How many bytes a suffix-only checkpoint saves over a full one (sizes, not times).

MiniLM (text classification head) at k = 4 of 6 blocks, SmolLM2-135M (causal LM, fp32) at k = 20 and 29 of 30.
Each model is frozen at k and saved both ways (`hf_freeze.checkpoint.save_pretrained` and `save_suffix`, no
tokenizer); the table counts every file in each folder. SmolLM2 ties `lm_head` to the embeddings: freezing unties
it by default (`tied_weights="untie"`, so the head keeps training), and then the suffix (and the full checkpoint)
holds the 28.3 M-parameter `lm_head` (113 MB in fp32) whatever k is; `tied_weights="freeze"` keeps it tied and
frozen, out of the suffix.

It also times the sha256 of the weight files that `hf_freeze.json` records (`weight_checksums`, which every save
runs once and `load_suffix` runs again to verify): the files were just written, so they are read from the page
cache and the figure is the hashing itself, not the disk.

    python benchmarks/checkpoint_bytes.py    # writes benchmarks/results/checkpoint_bytes.{json,md}
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from common import markdown_table, stamp, write_results
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from hf_freeze import assets, freeze_prefix
from hf_freeze.checkpoint import SUFFIX_WEIGHTS_NAME, save_pretrained, save_suffix, weight_checksums


def _classifier(path):
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)


def _causal_lm(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


# (model, task, k, loader, tied_weights): "untie" is the default; "freeze" keeps lm_head tied (and frozen).
CASES = [
    ("minilm", "text classification", 4, _classifier, "untie"),
    ("smollm2", "causal LM", 20, _causal_lm, "untie"),
    ("smollm2", "causal LM", 29, _causal_lm, "untie"),
    ("smollm2", "causal LM", 29, _causal_lm, "freeze"),
]


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def measure(name: str, task: str, boundary: int, load, tied_weights: str) -> dict:
    model = load(str(assets.model_path(name)))
    freeze_prefix(model, boundary, tied_weights=tied_weights)
    with tempfile.TemporaryDirectory() as tmp:
        full = save_pretrained(model, Path(tmp) / "full")
        suffix = save_suffix(model, Path(tmp) / "suffix")
        full_bytes, suffix_bytes = folder_bytes(full), folder_bytes(suffix)
        weights_bytes = (suffix / SUFFIX_WEIGHTS_NAME).stat().st_size
        full_hash_s, suffix_hash_s = _seconds(weight_checksums, full), _seconds(weight_checksums, suffix)
        full_weights_bytes = sum((full / name).stat().st_size for name in weight_checksums(full))
    return {
        "model": f"{assets.HUB_IDS[name]} ({task})",
        "k": f"{boundary} of {model.config.num_hidden_layers}",
        "tied_weights": tied_weights,
        "full_MB": full_bytes / 1e6,
        "suffix_MB": suffix_bytes / 1e6,
        "suffix_weights_MB": weights_bytes / 1e6,
        "suffix/full": suffix_bytes / full_bytes,
        "full_sha256_s": full_hash_s,
        "suffix_sha256_s": suffix_hash_s,
        "sha256_MB_per_s": full_weights_bytes / 1e6 / full_hash_s,
        "full_bytes": full_bytes,
        "suffix_bytes": suffix_bytes,
    }


def _seconds(function, *args) -> float:
    """Best of three timings (the machine may be shared)."""
    times = []
    for _ in range(3):
        started = time.perf_counter()
        function(*args)
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    rows = [measure(*case) for case in CASES]
    columns = ["model", "k", "tied_weights", "full_MB", "suffix_MB", "suffix_weights_MB", "suffix/full",
               "full_sha256_s", "suffix_sha256_s", "sha256_MB_per_s"]
    table = markdown_table(rows, columns)
    write_results("checkpoint_bytes", {"stamp": stamp(), "rows": rows}, table)


if __name__ == "__main__":
    main()
