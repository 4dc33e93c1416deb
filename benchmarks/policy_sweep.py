"""Accuracy against training time for several freeze settings: the measurements the defaults were chosen from.

Runs the classification recipe (MiniLM on Rotten Tomatoes, 2 epochs, seed 42, FreezeTrainer with the cache) once
per setting, one after the other, and tabulates accuracy, eval loss, training time (sum of optimizer-step wall
times), the freeze timeline and the size of the cache at the end of training (which `default-bf16-cache` halves).
Each run takes 3-12 minutes on 2 CPU cores. Writes benchmarks/results/policy_sweep.{json,md}.

    python benchmarks/policy_sweep.py                       # every setting below
    python benchmarks/policy_sweep.py --only default fixed5 # some of them
    python benchmarks/policy_sweep.py --only default default-bf16-cache --name cache_dtype_minilm  # cache sizes
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, markdown_table, stamp, write_results

SETTINGS = {
    "full": ["--method", "full"],
    "fixed0": ["--policy", "fixed", "--boundary", "0"],
    "interval0.1": ["--interval", "0.1", "--percentile", "50"],
    "default": [],
    "default-bf16-cache": ["--cache_dtype", "bfloat16"],
    "percentile50": ["--percentile", "50"],
    "interval0.025": ["--interval", "0.025", "--percentile", "50"],
    "interval0.025-p75": ["--interval", "0.025", "--percentile", "75"],
    "fixed5": ["--policy", "fixed", "--boundary", "5"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--recipe-flags", default="", help="flags added to every run, e.g. '--max_train_samples 64'")
    parser.add_argument("--name", default="policy_sweep", help="results file name")
    args = parser.parse_args()
    rows = []
    for name in args.only:
        with tempfile.TemporaryDirectory() as out:
            command = [sys.executable, str(ROOT / "recipes" / "text_classification.py"), "--output_dir", out,
                       "--eval_strategy", "no", "--logging_steps", "50", *SETTINGS[name],
                       *shlex.split(args.recipe_flags)]
            print(f"==== {name}: {' '.join(SETTINGS[name]) or '(defaults)'} ====", flush=True)
            subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
            result = json.loads((Path(out) / "results.json").read_text())
        rows.append({
            "setting": name,
            "flags": " ".join(SETTINGS[name]) or "(defaults)",
            "accuracy %": 100 * result["metrics"]["eval_accuracy"],
            "eval loss": result["metrics"]["eval_loss"],
            "train s": result["train_step_seconds"],
            "freezes (step: boundary)": ", ".join(f"{e['step']}: {e['boundary']}" for e in result["timeline"]),
            **cache_size(result["logs"]),
        })
        print(rows[-1], flush=True)
    full = next((r for r in rows if r["setting"] == "full"), None)
    for row in rows:
        row["speed-up"] = full["train s"] / row["train s"] if full else ""
    info = stamp()
    title = "Freeze settings on MiniLM / Rotten Tomatoes, 2 epochs, seed 42 (recipe defaults otherwise)"
    if args.recipe_flags:
        title += f"; every run with `{args.recipe_flags}`"
    columns = ["setting", "flags", "accuracy %", "eval loss", "train s", "speed-up", "freezes (step: boundary)",
               "cached examples", "cache MB"]
    write_results(args.name, {"stamp": info, "rows": rows, "title": title, "recipe_flags": args.recipe_flags},
                  f"**{title}** ({info['machine']}, commit {info['commit']})\n\n" + markdown_table(rows, columns))


def cache_size(logs: list[dict]) -> dict:
    """Entries and megabytes the cache held at the end of training (the Trainer's last `cache/*` log before
    the final evaluation); empty for runs without the cache."""
    train_logs = [e for e in logs if "cache/entries" in e and not any(k.startswith("eval_") for k in e)]
    if not train_logs:
        return {}
    return {"cached examples": int(train_logs[-1]["cache/entries"]), "cache MB": train_logs[-1]["cache/bytes"] / 2**20}


if __name__ == "__main__":
    main()
