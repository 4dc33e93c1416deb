"""The freeze decision, judged over seeds and workloads: speed-up against accuracy gap for every method.

Reads the per-run result files that `finetune.py --runs-dir benchmarks/results/decision/runs` wrote (one file per
workload, seed and method; nothing is re-run or timed here) and writes, per workload, a table of the mean and spread
over seeds of the accuracy gap to full fine-tuning on the same seed (paired) and of the speed-up (wall-clock of
`trainer.train()`, per-epoch evaluation included, full fine-tuning's over the method's, on the same seed; and
against the mean of the full runs of every seed, which do the same work), and a Pareto plot.

    python benchmarks/decision.py     # writes benchmarks/results/decision.{json,md} and decision_<workload>.png
"""

from __future__ import annotations

import json
import re
import statistics
from collections import defaultdict
from pathlib import Path

from common import RESULTS, markdown_table, stamp, write_results

RUNS = RESULTS / "decision" / "runs"
RUN_NAME = re.compile(r"^(?P<workload>[a-z0-9]+)_seed(?P<seed>\d+)_(?P<method>.+)\.json$")
WORKLOADS = {
    "rt": "MiniLM on Rotten Tomatoes (sentiment, 10,201 train / 2,551 test, batch 32)",
    "debates": "MiniLM on the 2016 debates (speaker's party, 3 classes, 858 train / 215 test, 64 tokens, batch 16)",
    "smollm2": "SmolLM2-135M as a causal LM on Rotten Tomatoes snippets (480 train / 200 test, 64 tokens, batch 8)",
}
# file name of the method -> label in tables and plots
LABELS = {
    "full": "full fine-tuning",
    "lora": "LoRA r=8 (lr 5e-4)",
    "cache_fixed": "static: fixed 2L/3 blocks from the start",
    "cache_schedule": "PipeTransformer: geometric schedule",
    "cache_schedule_schedulelinear_freeze_start0.1": "Composer: linear schedule from 10%",
    "cache_gradnorm": "default: gradnorm (AutoFreeze's rule)",
    "cache_budget_target_speedup3.0_budget_planswitch": "budget 3x, switch",
    "cache_budget_target_speedup3.0_budget_planswitch_boundary_dropout0.1": "budget 3x, switch + boundary dropout 0.1",
    "cache_budget_target_speedup3.0_budget_planswitch_active_lr_scale3.0": "budget 3x, switch + active_lr_scale 3",
    "cache_budget_target_speedup2.0_budget_planswitch": "budget 2x, switch",
    "cache_budget_target_speedup3.0_budget_planramp": "budget 3x, ramp",
    "cache_budget_target_speedup3.0_budget_planramp_boundary_dropout0.1": "budget 3x, ramp + boundary dropout 0.1",
}


def load_runs() -> dict[str, dict[str, dict[int, dict]]]:
    """workload -> method -> seed -> run result."""
    runs: dict = defaultdict(lambda: defaultdict(dict))
    for path in sorted(RUNS.glob("*.json")):
        match = RUN_NAME.match(path.name)
        if match:
            runs[match["workload"]][match["method"]][int(match["seed"])] = json.loads(path.read_text())
    return runs


def score_of(run: dict) -> tuple[str, float]:
    """("accuracy %", value) for classifiers, ("perplexity", value) for causal LMs."""
    final = run["final"]
    if "eval_accuracy" in final:
        return "accuracy %", 100 * final["eval_accuracy"]
    return "perplexity", final["eval_perplexity"]


def time_to_target(run: dict, target: float, higher_is_better: bool) -> float | None:
    """Wall-clock seconds of `train()` until an evaluation first reached `target` (`None`: never)."""
    for evaluation in run["evals"]:
        value = evaluation.get("eval_accuracy")
        value = 100 * value if value is not None else evaluation.get("eval_perplexity")
        if value is not None and (value >= target if higher_is_better else value <= target):
            return evaluation.get("wall_seconds")
    return None


def summarize(workload: str, methods: dict[str, dict[int, dict]]) -> tuple[list[dict], list[dict]]:
    full = methods["full"]
    mean_full_wall = statistics.mean(run["wall_seconds"] for run in full.values())
    rows, points = [], []
    for method, by_seed in methods.items():
        seeds = sorted(s for s in by_seed if s in full)
        if not seeds:
            continue
        name, _ = score_of(full[seeds[0]])
        higher = name == "accuracy %"
        gaps, speedups, step_speedups, targets = [], [], [], []
        for seed in seeds:
            run, reference = by_seed[seed], full[seed]
            gap = score_of(run)[1] - score_of(reference)[1]
            gaps.append(gap if higher else 100 * gap / score_of(reference)[1])  # perplexity: % change
            speedups.append(reference["wall_seconds"] / run["wall_seconds"])
            step_speedups.append(reference["train_seconds"] / run["train_seconds"])
            target = score_of(reference)[1] - 0.5 if higher else score_of(reference)[1] * 1.01
            reached = time_to_target(run, target, higher)
            targets.append(None if reached is None else reference["wall_seconds"] / reached)
            points.append({"method": method, "seed": seed, "gap": gaps[-1], "speedup": speedups[-1]})
        reached = [t for t in targets if t is not None]
        rows.append({
            "method": LABELS.get(method, method),
            "seeds": ",".join(map(str, seeds)),
            name: statistics.mean(score_of(by_seed[s])[1] for s in seeds),
            "gap": statistics.mean(gaps),
            "gap sd": statistics.stdev(gaps) if len(gaps) > 1 else float("nan"),
            "worst gap": min(gaps) if higher else max(gaps),
            "speed-up": statistics.mean(speedups),
            "speed-up range": f"{min(speedups):.2f}-{max(speedups):.2f}",
            # every seed's full run does the same work: their mean is a steadier yardstick on a noisy machine
            "vs mean full": statistics.mean(mean_full_wall / by_seed[s]["wall_seconds"] for s in seeds),
            "step-time speed-up": statistics.mean(step_speedups),
            "to target (speed-up)": f"{statistics.mean(reached):.2f} ({len(reached)}/{len(seeds)})" if reached
            else f"never (0/{len(seeds)})",
            "final boundary": ",".join(str(by_seed[s].get("final_boundary")) for s in seeds),
            "_key": method,
        })
    rows.sort(key=lambda r: -r["speed-up"])
    return rows, points


def plot(workload: str, rows: list[dict], points: list[dict], gap_label: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(8.5, 5.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = "os^D"  # a new marker each time the colours wrap, so no two methods look alike
    for index, row in enumerate(rows):
        color, marker = colors[index % len(colors)], markers[index // len(colors) % len(markers)]
        mine = [p for p in points if p["method"] == row["_key"]]
        axis.scatter([p["speedup"] for p in mine], [p["gap"] for p in mine], color=color, marker=marker, alpha=0.35,
                     s=18)
        axis.scatter([row["speed-up"]], [row["gap"]], color=color, marker=marker, s=70, edgecolor="black",
                     label=f"{row['method']} ({len(mine)} seeds)")
    axis.axhline(0, color="gray", lw=0.8)
    if gap_label.startswith("accuracy"):
        axis.axhline(-0.5, color="red", lw=0.8, ls="--", label="-0.5 point")
    axis.axvline(3, color="red", lw=0.8, ls=":", label="3x")
    axis.set_xlabel("speed-up over full fine-tuning (wall-clock of trainer.train(), evaluation included)")
    axis.set_ylabel(gap_label)
    axis.set_title(WORKLOADS.get(workload, workload), fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = RESULTS / f"decision_{workload}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    runs = load_runs()
    info = stamp()
    sections, payload = [], {"stamp": info, "workloads": {}}
    for workload, methods in runs.items():
        if "full" not in methods:
            continue
        rows, points = summarize(workload, methods)
        name = score_of(next(iter(methods["full"].values())))[0]
        gap_label = "accuracy gap (points)" if name == "accuracy %" else "perplexity change (%)"
        image = plot(workload, rows, points, gap_label)
        columns = ["method", "seeds", name, "gap", "gap sd", "worst gap", "speed-up", "speed-up range",
                   "vs mean full", "step-time speed-up", "to target (speed-up)", "final boundary"]
        sections.append(f"### {WORKLOADS.get(workload, workload)}\n\ngap: {gap_label}, paired with full fine-tuning "
                        f"on the same seed; plot `{image.relative_to(RESULTS.parent.parent)}`\n\n"
                        + markdown_table(rows, columns))
        payload["workloads"][workload] = {"rows": rows, "points": points}
    title = ("The freeze decision at 3 epochs: mean over seeds of the gap to full fine-tuning and of the wall-clock "
             "speed-up of trainer.train() (per-epoch evaluation included); 'to target': the speed-up at which the "
             "method first evaluated within 0.5 point (1% perplexity) of full fine-tuning's final score")
    write_results("decision", {**payload, "title": title},
                  f"**{title}** (x86_64 2-core CPU, torch threads 2; summarized at commit {info['commit']})\n\n"
                  + "\n\n".join(sections))


if __name__ == "__main__":
    main()
