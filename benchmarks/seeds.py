"""Seed spread of the MiniLM fine-tuning runs: per-seed accuracy gaps and speed-ups, and their means, from the
committed per-seed result files of `finetune.py` (nothing is re-run or timed here).

A speed-up compares a method's training time with full fine-tuning's on the same seed, so it is only computed
where both runs had the CPU to themselves (`SHARED_CPU` lists the runs that did not); every mean is over one stated
set of seeds, the same for the numerator and the denominator.

    python benchmarks/seeds.py      # writes benchmarks/results/seeds_minilm.{json,md}
"""

from __future__ import annotations

import json
import statistics

from common import RESULTS, markdown_table, stamp, write_results

SEEDS = (42, 1, 2)
# column -> seed -> (result file, method inside it)
RUNS = {
    "full": {42: ("finetune_minilm_classification", "full"), 1: ("finetune_minilm_seed1", "full"),
             2: ("finetune_minilm_seed2", "full")},
    "gradnorm": {s: (f"finetune_minilm_noemb_seed{s}", "cache:gradnorm:freeze_embeddings_at_start=false")
                 for s in SEEDS},
    "+emb": {42: ("finetune_minilm_classification", "cache:gradnorm"), 1: ("finetune_minilm_seed1", "cache:gradnorm"),
             2: ("finetune_minilm_seed2", "cache:gradnorm")},
    "+emb, max_boundary=4": {s: (f"finetune_minilm_mb4_seed{s}", "cache:gradnorm:max_boundary=4") for s in SEEDS},
}
SHARED_CPU = {("full", 1)}  # seed 1's full run shared the CPU with the test suite: its time is not comparable


def main() -> None:
    loaded = {name: json.loads((RESULTS / f"{name}.json").read_text())
              for runs in RUNS.values() for name, _ in runs.values()}
    result = {column: {seed: loaded[name]["results"][method] for seed, (name, method) in runs.items()}
              for column, runs in RUNS.items()}
    timed = [s for s in SEEDS if ("full", s) not in SHARED_CPU]
    rows = []
    for seed in SEEDS:
        full = result["full"][seed]
        row = {"seed": seed, "full %": 100 * full["final"]["eval_accuracy"],
               "full s": full["train_seconds"] if seed in timed else "(shared CPU)"}
        for column in list(RUNS)[1:]:
            run = result[column][seed]
            row[f"{column} %"] = 100 * run["final"]["eval_accuracy"]
            row[f"{column} gap"] = row[f"{column} %"] - row["full %"]
            row[f"{column} s"] = run["train_seconds"]
            row[f"{column} speed-up"] = full["train_seconds"] / run["train_seconds"] if seed in timed else ""
        rows.append(row)
    means = {"seed": f"mean of {', '.join(map(str, SEEDS))}", "full %": statistics.mean(r["full %"] for r in rows)}
    timed_means = {"seed": f"mean of {', '.join(map(str, timed))} (timed alone)",
                   "full %": statistics.mean(r["full %"] for r in rows if r["seed"] in timed),
                   "full s": statistics.mean(r["full s"] for r in rows if r["seed"] in timed)}
    for column in list(RUNS)[1:]:
        for key in (f"{column} %", f"{column} gap", f"{column} s"):
            means[key] = statistics.mean(r[key] for r in rows)
            timed_means[key] = statistics.mean(r[key] for r in rows if r["seed"] in timed)
        timed_means[f"{column} speed-up"] = statistics.mean(r[f"{column} speed-up"] for r in rows if r["seed"] in timed)
    rows += [means, timed_means]
    columns = ["seed", "full %", "full s"] + [f"{c} {k}" for c in list(RUNS)[1:] for k in ("%", "gap", "s", "speed-up")]
    info = stamp()
    title = ("MiniLM on Rotten Tomatoes, 2 epochs, batch 32: accuracy gap (points) and speed-up over full fine-tuning "
             "per seed, from the committed finetune.py result files")
    sources = {column: {seed: f"{name}.json: {method}" for seed, (name, method) in runs.items()}
               for column, runs in RUNS.items()}
    write_results("seeds_minilm", {"stamp": info, "title": title, "sources": sources, "shared_cpu": sorted(SHARED_CPU),
                                   "rows": rows},
                  f"**{title}** (summarized at commit {info['commit']})\n\n" + markdown_table(rows, columns))


if __name__ == "__main__":
    main()
