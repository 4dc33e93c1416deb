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
