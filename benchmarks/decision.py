"""The freeze decision, judged over seeds and workloads: speed-up against accuracy gap for every method.

Reads the per-run result files that `finetune.py --runs-dir benchmarks/results/decision/runs` wrote (one file per
workload, seed and method; nothing is re-run or timed here) and writes, per workload, a table of the mean and spread
over seeds of the accuracy gap to full fine-tuning on the same seed (paired) and of the speed-up (wall-clock of
`trainer.train()`, per-epoch evaluation included, full fine-tuning's over the method's, on the same seed; and
against the mean of the full runs of every seed, which do the same work), and a Pareto plot.

Full fine-tuning's frontier, per workload and seed: every evaluation inside `train()` of every full run of that
seed (the protocol's run, runs of fewer epochs with their own schedule, runs at other learning rates; files
`full`, `full_epochs<E>`, `full_learning_rate<R>`), at its wall-clock since `train()` began, and each run's end.
The frontier is the best score reached at the same or lower wall-clock, linearly interpolated between the points
that improve on every earlier one. A method's "frontier gap" is its score minus the frontier at its own
wall-clock (same seed; accuracy in points, perplexity in % change, lower being better there); "speed-up at equal
score" is the wall-clock at which the frontier first reaches the method's score over the method's own.

    python benchmarks/decision.py     # writes benchmarks/results/decision.{json,md} and decision_<workload>.png
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

from common import RESULTS, markdown_table, stamp, write_results

RUNS = RESULTS / "decision" / "runs"
RUN_NAME = re.compile(r"^(?P<workload>[a-z0-9]+)_seed(?P<seed>\d+)_(?P<method>.+)\.json$")
WORKLOADS = {
    "rt": "MiniLM on Rotten Tomatoes (sentiment, 10,201 train / 2,551 test, batch 32)",
    "debates": "MiniLM on the 2016 debates (speaker's party, 3 classes, 858 train / 215 test, 64 tokens, batch 16)",
    "smollm2": "SmolLM2-135M as a causal LM on Rotten Tomatoes snippets (480 train / 200 test, 64 tokens, batch 8)",
    "speeches": "MiniLM on the 2012 convention speeches (speaker's party, 2 classes, 151 train / 38 test, 256 tokens, "
                "batch 8, 10 epochs)",
}
# full runs the protocol asks for beside `full` (per seed): fewer epochs with their own schedule, other rates
FRONTIER_RUNS = ["full_epochs1", "full_epochs2", "full_learning_rate0.0001", "full_learning_rate0.0002"]
WORKLOAD_FRONTIER_RUNS = {"speeches": ["full_epochs1", "full_epochs2", "full_epochs3", "full_epochs5",
                                       "full_learning_rate0.0001", "full_learning_rate0.0002"]}
SEEDS = (42, 1, 2)
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
    "cache_gradnorm_shareable_prefixtrue": "default + shareable_prefix (the base's prefix restored at each freeze)",
    "cache_gradnorm_shareable_prefixtrue_active_lr_rewarmtrue": "default + shareable_prefix + active_lr_rewarm",
    "cache_gradnorm_shareable_prefixtrue_learning_rate0.0002": "default + shareable_prefix at the best full rate "
                                                               "(2e-4)",
    "cache_gradnorm_active_lr_scale3.0": "new: default + active_lr_scale 3",
    "cache_gradnorm_active_lr_rewarmtrue": "new: default + active_lr_rewarm",
    "cache_gradnorm_learning_rate0.0002": "new: default at the best full rate (2e-4)",
    "cache_budget_target_speedup3.0_budget_planswitch_learning_rate0.0002": "new: budget 3x, switch at the best full "
                                                                             "rate (2e-4)",
    "cache_budget_target_speedup3.0_budget_planswitch_active_lr_scale3.0_learning_rate0.0002":
        "new: budget 3x, switch + active_lr_scale 3 at the best full rate (2e-4)",
    "cache_schedule_learning_rate0.0002": "new: PipeTransformer's schedule at the best full rate (2e-4)",
}


def load_runs() -> dict[str, dict[str, dict[int, dict]]]:
    """workload -> method -> seed -> run result."""
    runs: dict = defaultdict(lambda: defaultdict(dict))
    for path in sorted(RUNS.glob("*.json")):
        match = RUN_NAME.match(path.name)
        if match:
            runs[match["workload"]][match["method"]][int(match["seed"])] = json.loads(path.read_text())
    return runs


def label_of(method: str) -> str:
    """The method's label: `LABELS`, or for full runs with run knobs `full fine-tuning, 1 epoch, lr 0.0001`."""
    if method in LABELS:
        return LABELS[method]
    knobs = re.fullmatch(r"full(?:_epochs(?P<epochs>[\d.]+))?(?:_learning_rate(?P<rate>[\d.e-]+))?", method)
    if not knobs:
        return method
    parts = ["full fine-tuning"]
    if knobs["epochs"]:
        parts.append(f"{knobs['epochs']} epoch{'' if knobs['epochs'] == '1' else 's'}")
    if knobs["rate"]:
        parts.append(f"lr {knobs['rate']}")
    return ", ".join(parts)


def is_full(method: str) -> bool:
    """Full fine-tuning, at the protocol's settings (`full`) or with run knobs (`full_epochs1`, ...)."""
    return method == "full" or method.startswith("full_")


def score_of(run: dict) -> tuple[str, float]:
    """("accuracy %", value) for classifiers, ("perplexity", value) for causal LMs."""
    final = run["final"]
    if "eval_accuracy" in final:
        return "accuracy %", 100 * final["eval_accuracy"]
    return "perplexity", final["eval_perplexity"]


def eval_score(evaluation: dict) -> float | None:
    """An evaluation's score in the tables' units (accuracy %, perplexity), `None` when it has neither."""
    if evaluation.get("eval_accuracy") is not None:
        return 100 * evaluation["eval_accuracy"]
    return evaluation.get("eval_perplexity")


def gap_of(score: float, reference: float, higher_is_better: bool) -> float:
    """`score` against `reference`: accuracy points (positive: better), perplexity % change (positive: worse)."""
    return score - reference if higher_is_better else 100 * (score / reference - 1)


def time_to_target(run: dict, target: float, higher_is_better: bool) -> float | None:
    """Wall-clock seconds of `train()` until an evaluation first reached `target` (`None`: never)."""
    for evaluation in run["evals"]:
        value = eval_score(evaluation)
        if value is not None and (value >= target if higher_is_better else value <= target):
            return evaluation.get("wall_seconds")
    return None


# ---- full fine-tuning's frontier (pure arithmetic, tested in tests/test_benchmarks.py) ----


def frontier_points(runs: Iterable[dict], ends_only: bool = False) -> list[tuple[float, float]]:
    """(wall-clock, score) of every evaluation during `train()` of full runs, and each run's end (`ends_only`: the
    ends alone, what a user gets by choosing the epochs or rate before training, with no pick among evaluations).

    The evaluation `finetune.py` runs after `train()` returned is left out as a point of its own (its wall-clock
    counts that evaluation); the run's end stands for it, at the run's wall-clock, with its final score.
    """
    points = []
    for run in runs:
        for evaluation in [] if ends_only else run["evals"]:
            seconds, value = evaluation.get("wall_seconds"), eval_score(evaluation)
            if seconds is not None and value is not None and seconds <= run["wall_seconds"]:
                points.append((seconds, value))
        points.append((run["wall_seconds"], score_of(run)[1]))
    return points


def pareto_front(points: Iterable[tuple[float, float]], higher_is_better: bool) -> list[tuple[float, float]]:
    """The points no earlier-or-equal point matches or beats, by time: scores strictly improve along it."""
    front: list[tuple[float, float]] = []
    for seconds, value in sorted(points, key=lambda p: (p[0], -p[1] if higher_is_better else p[1])):
        if not front or (value > front[-1][1] if higher_is_better else value < front[-1][1]):
            front.append((seconds, value))
    return front


def frontier_score(front: list[tuple[float, float]], seconds: float) -> float | None:
    """Full fine-tuning's best score at `seconds` or less, interpolated linearly between the points of `front`
    (flat after the last); `None` before its first point (no full run ends or evaluates that early)."""
    if not front or seconds < front[0][0]:
        return None
    for (t0, s0), (t1, s1) in zip(front, front[1:]):
        if seconds < t1:
            return s0 + (s1 - s0) * (seconds - t0) / (t1 - t0)
    return front[-1][1]


def frontier_seconds(front: list[tuple[float, float]], score: float,
                     higher_is_better: bool) -> tuple[float | None, bool]:
    """(wall-clock at which the frontier first reaches `score`, exact?).

    `(None, True)`: the frontier never reaches it (the method beats every full run). A score worse than the first
    point's gives `(first point's time, False)`: the frontier reaches it then at the latest (an upper bound).
    """
    def reaches(value: float) -> bool:
        return value >= score if higher_is_better else value <= score

    if not front or not reaches(front[-1][1]):
        return None, True
    if reaches(front[0][1]):
        return front[0][0], front[0][1] == score
    for (t0, s0), (t1, s1) in zip(front, front[1:]):
        if reaches(s1):
            return t0 + (t1 - t0) * (score - s0) / (s1 - s0), True
    raise AssertionError("unreachable: the last point reaches the score")


def frontier_gap(run: dict, front: list[tuple[float, float]], higher_is_better: bool) -> tuple[float, bool]:
    """(the run's score against the frontier at its wall-clock, within the frontier's range?).

    A run faster than the frontier's first point is compared with that point (a full run that took longer: the
    gap is then pessimistic for the method) and flagged.
    """
    reference = frontier_score(front, run["wall_seconds"])
    within = reference is not None
    return gap_of(score_of(run)[1], reference if within else front[0][1], higher_is_better), within


def equal_score_speedup(run: dict, front: list[tuple[float, float]],
                        higher_is_better: bool) -> tuple[float, bool]:
    """(frontier's wall-clock to the run's score over the run's wall-clock, exact?): `inf` where the frontier never
    reaches the score; not exact (an upper bound) where the score is worse than the frontier's first point."""
    seconds, exact = frontier_seconds(front, score_of(run)[1], higher_is_better)
    return (math.inf if seconds is None else seconds / run["wall_seconds"]), exact


def format_equal_score(values: list[tuple[float, bool]]) -> str:
    """Mean over seeds of the speed-up at equal score: `1.84`, `<=1.84` when a seed's value is an upper bound,
    `, above k/n` for seeds whose score no full run reached (left out of the mean)."""
    finite = [v for v, _ in values if math.isfinite(v)]
    above = len(values) - len(finite)
    text = ("<=" if any(not exact for v, exact in values if math.isfinite(v)) else "") + (
        f"{statistics.mean(finite):.2f}" if finite else "above")
    return text + (f", above {above}/{len(values)}" if above and finite else f" ({above}/{len(values)})" if above
                   else "")


def seed_fronts(methods: dict[str, dict[int, dict]], higher_is_better: bool,
                ends_only: bool = False) -> dict[int, list[tuple[float, float]]]:
    """seed -> full fine-tuning's frontier from every full run of that seed (`ends_only`: from their ends)."""
    seeds = {seed for method, by_seed in methods.items() if is_full(method) for seed in by_seed}
    return {seed: pareto_front(frontier_points((by_seed[seed] for method, by_seed in methods.items()
                                                if is_full(method) and seed in by_seed), ends_only), higher_is_better)
            for seed in sorted(seeds)}


def summarize(workload: str, methods: dict[str, dict[int, dict]]) -> tuple[list[dict], list[dict]]:
    full = methods["full"]
    mean_full_wall = statistics.mean(run["wall_seconds"] for run in full.values())
    name, _ = score_of(next(iter(full.values())))
    higher = name == "accuracy %"
    fronts, end_fronts = seed_fronts(methods, higher), seed_fronts(methods, higher, ends_only=True)
    rows, points = [], []
    for method, by_seed in methods.items():
        seeds = sorted(s for s in by_seed if s in full)
        if not seeds:
            continue
        gaps, speedups, step_speedups, targets, frontier_gaps, equal_scores, end_gaps = [], [], [], [], [], [], []
        for seed in seeds:
            run, reference = by_seed[seed], full[seed]
            gaps.append(gap_of(score_of(run)[1], score_of(reference)[1], higher))
            speedups.append(reference["wall_seconds"] / run["wall_seconds"])
            step_speedups.append(reference["train_seconds"] / run["train_seconds"])
            target = score_of(reference)[1] - 0.5 if higher else score_of(reference)[1] * 1.01
            reached = time_to_target(run, target, higher)
            targets.append(None if reached is None else reference["wall_seconds"] / reached)
            frontier_gaps.append(frontier_gap(run, fronts[seed], higher))
            equal_scores.append(equal_score_speedup(run, fronts[seed], higher))
            end_gaps.append(frontier_gap(run, end_fronts[seed], higher)[0])
            points.append({"method": method, "seed": seed, "gap": gaps[-1], "speedup": speedups[-1],
                           "frontier_gap": frontier_gaps[-1][0], "within_frontier": frontier_gaps[-1][1],
                           "equal_score_speedup": equal_scores[-1][0], "equal_score_exact": equal_scores[-1][1]})
        reached = [t for t in targets if t is not None]
        before = sum(not within for _, within in frontier_gaps)
        rows.append({
            "method": label_of(method),
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
            "frontier gap": statistics.mean(g for g, _ in frontier_gaps),
            "frontier gap sd": statistics.stdev(g for g, _ in frontier_gaps) if len(seeds) > 1 else float("nan"),
            "before frontier": f"{before}/{len(seeds)}",
            "run-end frontier gap": statistics.mean(end_gaps),
            "speed-up at equal score": format_equal_score(equal_scores),
            "final boundary": ",".join(str(by_seed[s].get("final_boundary")) for s in seeds),
            "_key": method,
        })
    rows.sort(key=lambda r: -r["speed-up"])
    return rows, points


def frontier_inventory(workload: str, methods: dict[str, dict[int, dict]]) -> str:
    """Which full runs the frontier is built from, and which of the protocol's are missing (per seed)."""
    have = [f"`{m}` (seeds {','.join(map(str, sorted(by_seed)))})" for m, by_seed in methods.items() if is_full(m)]
    wanted = ["full", *WORKLOAD_FRONTIER_RUNS.get(workload, FRONTIER_RUNS)]
    missing = [f"`{m}`" + (f" (seeds {','.join(map(str, absent))})" if len(absent) < len(SEEDS) else "")
               for m in wanted for absent in [[s for s in SEEDS if s not in methods.get(m, {})]] if absent]
    return (f"frontier from {', '.join(have)}: every per-epoch evaluation and each run's end; missing: "
            + (", ".join(missing) if missing else "none") + " (`bash benchmarks/queue_frontier.sh` runs them)")


def frontier_curve(methods: dict[str, dict[int, dict]], higher_is_better: bool,
                   lowest_speedup: float) -> list[tuple[float, float]]:
    """The frontier in the plot's coordinates: (speed-up over the same seed's `full` run, mean over seeds of the
    frontier's gap to that run), from `lowest_speedup` up to the speed-up of the earliest point every seed has."""
    full, fronts = methods["full"], seed_fronts(methods, higher_is_better)
    seeds = [s for s in full if fronts.get(s)]
    if not seeds:
        return []
    highest = min(full[s]["wall_seconds"] / fronts[s][0][0] for s in seeds)
    steps = 80
    curve = []
    for i in range(steps + 1):
        speedup = lowest_speedup + (highest - lowest_speedup) * i / steps
        scores = [frontier_score(fronts[s], full[s]["wall_seconds"] / speedup) for s in seeds]
        if None in scores:  # past a seed's first point (rounding at `highest`, or `lowest_speedup` above it)
            continue
        gaps = [gap_of(score, score_of(full[s])[1], higher_is_better) for score, s in zip(scores, seeds)]
        curve.append((speedup, statistics.mean(gaps)))
    return curve


def plot(workload: str, rows: list[dict], points: list[dict], gap_label: str,
         curve: list[tuple[float, float]] = ()) -> Path:
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
    if curve:
        axis.plot(*zip(*curve), color="black", lw=1.6, label="full fine-tuning's frontier (mean over seeds)")
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
        higher = name == "accuracy %"
        gap_label = "accuracy gap (points)" if higher else "perplexity change (%)"
        curve = frontier_curve(methods, higher, min(0.9, min(p["speedup"] for p in points) * 0.95))
        image = plot(workload, rows, points, gap_label, curve)
        columns = ["method", "seeds", name, "gap", "gap sd", "worst gap", "speed-up", "speed-up range",
                   "vs mean full", "step-time speed-up", "to target (speed-up)", "frontier gap", "frontier gap sd",
                   "before frontier", "speed-up at equal score", "run-end frontier gap", "final boundary"]
        inventory = frontier_inventory(workload, methods)
        sections.append(f"### {WORKLOADS.get(workload, workload)}\n\ngap: {gap_label}, paired with full fine-tuning "
                        f"on the same seed; plot `{image.relative_to(RESULTS.parent.parent)}`; {inventory}\n\n"
                        + markdown_table(rows, columns))
        fronts = {seed: front for seed, front in seed_fronts(methods, higher).items()}
        payload["workloads"][workload] = {"rows": rows, "points": points, "frontier": fronts,
                                          "frontier_inventory": inventory}
    title = ("The freeze decision at each workload's epochs (3; speeches 10): mean over seeds of the gap to full "
             "fine-tuning and of the wall-clock speed-up of trainer.train() (per-epoch evaluation included); 'to "
             "target': the speed-up at which the method first evaluated within 0.5 point (1% perplexity) of full "
             "fine-tuning's final score; 'frontier gap': the score minus full fine-tuning's best score at the same "
             "or lower wall-clock on the same seed (every full run's per-epoch evaluations and end, interpolated; "
             "accuracy points, perplexity % change); 'before frontier': seeds that finished before the frontier's "
             "first point, compared with that point; 'speed-up at equal score': the frontier's wall-clock to the "
             "method's score over the method's ('<=': a seed's score was below the first point, an upper bound; "
             "'above': no full run reached it); 'run-end frontier gap': the same against the frontier of full runs' "
             "final scores alone (epochs or rate chosen before training; no pick among test evaluations, whose best "
             "is biased upward on a small test split)")
    write_results("decision", {**payload, "title": title},
                  f"**{title}** (x86_64 2-core CPU, torch threads 2; summarized at commit {info['commit']})\n\n"
                  + "\n\n".join(sections))


if __name__ == "__main__":
    main()
