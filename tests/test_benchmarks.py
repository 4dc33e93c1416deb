"""The benchmarks' arithmetic: ideal step costs at every boundary the runs used, boundary 0 measured like the rest."""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import NUM_BLOCKS, tiny_batch, tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import decision  # noqa: E402
import finetune  # noqa: E402
import step_time  # noqa: E402

from hf_freeze import find_layout, frozen_boundary  # noqa: E402


def fake_rows(boundaries):
    """step_time.py's rows: full step 2.0 s (another process), frozen and ideal steps cheaper with every block."""
    return [{"boundary k": k, "full s": 2.0, "frozen s": 1.8 - 0.2 * k, "ideal s": 1.6 - 0.2 * k,
             **({"cached s": 1.6 - 0.2 * k} if k >= 1 else {})} for k in boundaries]


def test_boundary_0_is_measured_not_borrowed_from_the_lowest_boundary(tmp_path, monkeypatch):
    args = SimpleNamespace(model="minilm", task="classification", batch_size=32)
    results = {
        "full": {"train_seconds": 100.0, "steps": 100, "boundaries": [None] * 100},
        "cache:gradnorm": {"train_seconds": 50.0, "steps": 100, "boundaries": [0] * 40 + [2] * 30 + [5] * 30},
    }
    asked = []

    def run(command, **kwargs):  # stands in for `python benchmarks/step_time.py ...`
        boundaries = [int(b) for b in command[command.index("--boundaries") + 1: command.index("--repeats")]]
        asked.append(boundaries)
        name = command[command.index("--name") + 1]
        (tmp_path / f"{name}.json").write_text(json.dumps({"rows": fake_rows(boundaries)}))

    monkeypatch.setattr(finetune.subprocess, "run", run)
    monkeypatch.setattr(finetune, "RESULTS", tmp_path)
    costs = finetune.ideal_step_costs(args, results)
    assert asked == [[0, 2, 5]]
    scale = 1.0 / 2.0  # this benchmark's full step (1 s) over step_time's (2 s)
    assert costs == pytest.approx({-1: 1.0, 0: 1.6 * scale, 2: 1.2 * scale, 5: 0.6 * scale})
    ideal = finetune.ideal_seconds(results["cache:gradnorm"]["boundaries"], costs)
    assert ideal == pytest.approx(40 * 0.8 + 30 * 0.6 + 30 * 0.3)


def test_a_boundary_without_a_measurement_is_an_error_not_a_guess():
    with pytest.raises(ValueError, match=r"No ideal step time was measured at boundaries \[0\]"):
        finetune.step_costs(fake_rows([2, 5]), 1.0, [0, 2, 5])
    with pytest.raises(KeyError):
        finetune.ideal_seconds([None, 3], {-1: 1.0, 2: 0.5})


@pytest.mark.parametrize("boundary", [0, 2])
def test_the_ideal_model_holds_only_the_active_blocks_and_trains(boundary):
    base = tiny_model("bert", "seq")
    ideal = step_time.suffix_only(base, boundary)
    assert find_layout(ideal).num_blocks == NUM_BLOCKS - boundary
    assert frozen_boundary(ideal) == 0  # the embeddings are frozen (a table lookup), every kept block trains
    trainable = {n.split(".")[0] for n, p in ideal.named_parameters() if p.requires_grad}
    assert trainable == {"bert", "classifier"}
    seconds = step_time.time_step(ideal, [dict(tiny_batch(ideal, "seq"), keys=None)], repeats=1)
    assert seconds > 0


def fake_run(accuracy, wall, evals=()):
    return {"final": {"eval_accuracy": accuracy}, "wall_seconds": wall, "train_seconds": wall - 10,
            "evals": [{"eval_accuracy": a, "wall_seconds": w} for a, w in evals], "final_boundary": 5}


def test_decision_pairs_each_seed_with_its_own_full_run():
    key = "cache_budget_target_speedup3.0_budget_planswitch"
    methods = {
        "full": {1: fake_run(0.84, 300.0), 2: fake_run(0.82, 330.0)},
        key: {1: fake_run(0.835, 100.0, [(0.80, 40.0), (0.836, 90.0)]), 2: fake_run(0.81, 100.0, [(0.81, 60.0)])},
    }
    rows, points = decision.summarize("rt", methods)
    budget = next(r for r in rows if r["_key"] == key)
    assert budget["gap"] == pytest.approx((-0.5 - 1.0) / 2)  # 83.5 - 84 and 81 - 82, not a difference of means
    assert budget["worst gap"] == pytest.approx(-1.0)
    assert budget["speed-up"] == pytest.approx((3.0 + 3.3) / 2)
    assert budget["vs mean full"] == pytest.approx(315.0 / 100.0)  # both seeds against the mean full run (300, 330)
    # within 0.5 point: seed 1 at its second evaluation (300 / 90), seed 2 never (81 < 82 - 0.5)
    assert budget["to target (speed-up)"] == f"{300 / 90:.2f} (1/2)"
    assert len(points) == 4 and budget["method"] == "budget 3x, switch"


def test_frontier_keeps_improving_points_and_interpolates_between_them():
    # accuracy: epoch 2 (83) beats epoch 3 (82.5), which is dropped; flat after the best point
    front = decision.pareto_front([(300.0, 82.5), (100.0, 80.0), (200.0, 83.0), (120.0, 79.0)], True)
    assert front == [(100.0, 80.0), (200.0, 83.0)]
    assert decision.frontier_score(front, 150.0) == pytest.approx(81.5)
    assert decision.frontier_score(front, 250.0) == 83.0 and decision.frontier_score(front, 99.0) is None
    assert decision.frontier_seconds(front, 81.5, True) == pytest.approx((150.0, True))
    assert decision.frontier_seconds(front, 85.0, True) == (None, True)  # no full run got there
    assert decision.frontier_seconds(front, 70.0, True) == (100.0, False)  # at the first point at the latest


def test_frontier_for_perplexity_runs_downhill():
    front = decision.pareto_front([(100.0, 80.0), (200.0, 70.0), (300.0, 75.0)], False)
    assert front == [(100.0, 80.0), (200.0, 70.0)]
    assert decision.frontier_score(front, 150.0) == pytest.approx(75.0)
    assert decision.frontier_seconds(front, 75.0, False) == pytest.approx((150.0, True))
    assert decision.frontier_seconds(front, 65.0, False) == (None, True)
    assert decision.gap_of(78.75, 75.0, False) == pytest.approx(5.0)  # 5% higher perplexity: worse
    assert decision.gap_of(81.0, 80.0, True) == pytest.approx(1.0)


def epoch_run(wall, evals, final=None, key="eval_accuracy"):
    """A run whose evaluations (wall-clock, score) ran inside train(), plus the one finetune.py runs after it."""
    final = evals[-1][1] if final is None else final
    return {"final": {key: final}, "wall_seconds": wall, "train_seconds": wall - 10, "final_boundary": None,
            "evals": [{key: s, "wall_seconds": t} for t, s in evals] + [{key: final, "wall_seconds": wall + 20}]}


def test_frontier_gap_is_paired_per_seed_over_every_full_run():
    methods = {
        # seed 1: epochs at 100/200/300 s; a 1-epoch run with its own schedule adds (90 s, 0.81)
        "full": {1: epoch_run(300.0, [(100.0, 0.80), (200.0, 0.83), (300.0, 0.84)]),
                 2: epoch_run(300.0, [(100.0, 0.70), (200.0, 0.74), (300.0, 0.76)])},
        "full_epochs1": {1: epoch_run(90.0, [(90.0, 0.81)])},
        "cache_gradnorm": {1: epoch_run(150.0, [(150.0, 0.83)]), 2: epoch_run(80.0, [(80.0, 0.71)])},
    }
    rows, points = decision.summarize("rt", methods)
    row = next(r for r in rows if r["_key"] == "cache_gradnorm")
    # seed 1 at 150 s: frontier 81 + (83 - 81) * 60 / 110 (the 1-epoch run replaced the epoch-1 evaluation);
    # seed 2 at 80 s is before its first point (100 s, 70%): compared with that point and counted
    seed1 = 83 - (81 + 2 * 60 / 110)
    assert row["frontier gap"] == pytest.approx((seed1 + 1.0) / 2)
    assert row["before frontier"] == "1/2"
    # against run ends alone: seed 1's front is (90 s, 81) then (300 s, 84): 81 + 3 * 60 / 210 at 150 s; seed 2's
    # only end (300 s, 76) is after the method's 80 s and is what it is compared with
    assert row["run-end frontier gap"] == pytest.approx((83 - (81 + 3 * 60 / 210) + 71 - 76) / 2)
    # speed-up at equal score: seed 1 reaches 83% at 200 s (200 / 150), seed 2 reaches 71% at 125 s (125 / 80)
    assert row["speed-up at equal score"] == f"{(200 / 150 + 125 / 80) / 2:.2f}"
    assert next(r for r in rows if r["_key"] == "full_epochs1")["method"] == "full fine-tuning, 1 epoch"
    # full's own run sits on its frontier; the evaluation after train() (wall + 20 s) is not a point of its own
    assert next(r for r in rows if r["_key"] == "full")["frontier gap"] == pytest.approx(0.0)


def test_frontier_gap_of_a_perplexity_run_is_a_percent_change_against_the_lowest_perplexity_so_far():
    key = "eval_perplexity"
    methods = {"full": {1: epoch_run(300.0, [(100.0, 80.0), (200.0, 90.0), (300.0, 100.0)], key=key)},
               "cache_gradnorm": {1: epoch_run(250.0, [(250.0, 88.0)], key=key)}}
    rows, _ = decision.summarize("smollm2", methods)
    row = next(r for r in rows if r["_key"] == "cache_gradnorm")
    assert row["frontier gap"] == pytest.approx(10.0)  # 88 against the 80 reached at 100 s: 10% worse
    assert row["gap"] == pytest.approx(-12.0)  # against the 3-epoch run's final 100: 12% better
    assert row["speed-up at equal score"] == "<=0.40"  # the frontier was at 88 or better by 100 s


@pytest.mark.parametrize("method, args, expected", [
    ("full", {}, "full"),
    ("full:epochs=1", {}, "full_epochs1"),
    ("full:learning_rate=1e-4", {}, "full_learning_rate0.0001"),
    ("full", {"learning_rate": 1e-4}, "full_learning_rate0.0001"),
    ("full", {"epochs": 2.0}, "full_epochs2"),
    ("full:epochs=3", {}, "full"),  # the protocol's own epochs name the protocol's run
    ("lora", {"learning_rate": 1e-4}, "lora"),  # LoRA trains at --lora-learning-rate
    ('cache:budget:target_speedup=3.0,budget_plan="switch"', {}, "cache_budget_target_speedup3.0_budget_planswitch"),
    ("cache:gradnorm:percentile=30,epochs=1", {}, "cache_gradnorm_percentile30_epochs1"),
    ("full", {"dataset": "convention_speeches", "epochs": 10.0}, "full"),
    ("full:epochs=3", {"dataset": "convention_speeches", "epochs": 10.0}, "full_epochs3"),
])
def test_run_knobs_give_each_run_its_own_file(method, args, expected):
    namespace = SimpleNamespace(**{"epochs": 3.0, "learning_rate": 5e-5, "lora_learning_rate": 5e-4,
                                   "dataset": None, **args})
    resolved = finetune.resolve_method(method, namespace)
    assert finetune.method_file_name(resolved) == expected
    applied = finetune.with_run_knobs(namespace, resolved)
    kind, policy, run = finetune.split_method(resolved)
    assert applied.epochs == run.get("epochs", namespace.epochs)
    assert "epochs" not in policy and "learning_rate" not in policy


def test_full_fine_tuning_takes_run_knobs_only():
    with pytest.raises(ValueError, match="full takes only the run knobs"):
        finetune.split_method("full:percentile=30")


def test_a_one_epoch_full_run_lands_beside_the_protocols_run_not_over_it(tmp_path, monkeypatch):
    ran = []

    def run(command, **kwargs):  # stands in for the per-method subprocess
        ran.append(command[command.index("--run-one") + 1])
        Path(command[command.index("--out") + 1]).write_text(json.dumps({"final": {}}))

    monkeypatch.setattr(finetune.subprocess, "run", run)
    monkeypatch.setattr(finetune, "report", lambda args, results: None)
    (tmp_path / "rt_seed42_full.json").write_text(json.dumps({"final": {}, "protocol": True}))
    monkeypatch.setattr(sys, "argv", ["finetune.py", "--runs-dir", str(tmp_path), "--name", "rt_seed42", "--reuse",
                                      "--epochs", "1", "--methods", "full"])
    finetune.main()
    monkeypatch.setattr(sys, "argv", ["finetune.py", "--runs-dir", str(tmp_path), "--name", "rt_seed42", "--reuse",
                                      "--methods", "full", "full:epochs=1", "full:learning_rate=2e-4"])
    finetune.main()
    assert ran == ["full:epochs=1", "full:learning_rate=0.0002"]  # the 3-epoch run and the 1-epoch run reused
    assert json.loads((tmp_path / "rt_seed42_full.json").read_text())["protocol"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "rt_seed42_full.json", "rt_seed42_full_epochs1.json", "rt_seed42_full_learning_rate0.0002.json"]


def test_a_summary_under_reuse_covers_every_run_of_its_name(tmp_path, monkeypatch):
    summarized = {}

    def run(command, **kwargs):  # stands in for the per-method subprocess
        Path(command[command.index("--out") + 1]).write_text(json.dumps({"final": {}}))

    monkeypatch.setattr(finetune.subprocess, "run", run)
    monkeypatch.setattr(finetune, "report", lambda args, results: summarized.update(results))
    for name in ("rt_seed42_full", "rt_seed42_cache_gradnorm", "rt_seed420_full", "debates_seed42_full"):
        (tmp_path / f"{name}.json").write_text(json.dumps({"final": {}, "kept": name}))
    monkeypatch.setattr(sys, "argv", ["finetune.py", "--runs-dir", str(tmp_path), "--name", "decision/rt_seed42",
                                      "--reuse", "--methods", "full:epochs=1"])
    finetune.main()
    assert sorted(summarized) == ["cache_gradnorm", "full", "full:epochs=1"]  # other seeds and workloads left out
    assert summarized["cache_gradnorm"]["kept"] == "rt_seed42_cache_gradnorm"


def test_the_repeat_runs_ideal_gain_is_what_the_skipped_blocks_cost():
    import serving

    assert serving.repeat_ideal_gain(0.0, 0.0, 0.6) == 1.0
    assert serving.repeat_ideal_gain(0.9, 0.0, 0.5) == pytest.approx(1 / (1 - 0.45))
    # against a baseline that already hit 10%: the same hit rate gains nothing, more hits gain their share
    assert serving.repeat_ideal_gain(0.1, 0.1, 0.5) == 1.0
    assert serving.repeat_ideal_gain(0.9, 0.1, 0.5) == pytest.approx(0.95 / 0.55)
    assert serving.repeat_ideal_gain(0.9, 0.0, 0.0) == 1.0  # nothing skipped, nothing gained


def test_frontier_curve_stops_where_a_seed_has_no_frontier_yet():
    # the plot asks for speed-ups from 0.9 up to the earliest first point: full 300 s over 100 s = 3x; a seed whose
    # frontier starts later (150 s: 2x) bounds it, and no speed-up beyond it reaches for a frontier that is not there
    methods = {"full": {1: epoch_run(300.0, [(100.0, 0.80), (300.0, 0.84)]),
                        2: epoch_run(300.0, [(150.0, 0.70), (300.0, 0.76)])}}
    curve = decision.frontier_curve(methods, True, lowest_speedup=2.5)  # above seed 2's 2x: at most its point
    assert all(speedup <= 2.0 + 1e-9 for speedup, _ in curve)
    curve = decision.frontier_curve(methods, True, lowest_speedup=1.0)
    assert curve[0] == (1.0, pytest.approx(0.0)) and max(s for s, _ in curve) <= 2.0 + 1e-9
