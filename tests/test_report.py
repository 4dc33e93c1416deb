"""Step timer, phases, the text report and the timeline plot."""

from types import SimpleNamespace

import pytest
from conftest import tiny_model

from hf_freeze import freeze_prefix
from hf_freeze.report import StepRecord, StepTimerCallback, format_phases, format_timeline, phases, plot_timeline


def records():
    # epoch 1: 3 steps unfrozen, then 2 at boundary 2; epoch 2: 2 steps at boundary 2, 1 at boundary 3
    spec = [(0, 1.0, None), (0, 1.2, None), (0, 0.9, None), (0, 0.5, 2), (0, 0.7, 2), (1, 0.4, 2), (1, 0.6, 2),
            (1, 0.2, 3)]
    return [StepRecord(step=i + 1, epoch=e, seconds=s, boundary=b) for i, (e, s, b) in enumerate(spec)]


def test_phases_split_on_boundary_and_epoch_with_median_and_total():
    rows = phases(records())
    assert [(r["epoch"], r["boundary"], r["steps"], r["count"]) for r in rows] == [
        (1, "none", "1-3", 3), (1, 2, "4-5", 2), (2, 2, "6-7", 2), (2, 3, "8-8", 1)]
    assert [r["median_step_s"] for r in rows] == pytest.approx([1.0, 0.6, 0.5, 0.2])
    assert [r["total_s"] for r in rows] == pytest.approx([3.1, 1.2, 1.0, 0.2])


def test_phase_summary_reports_speed_against_the_full_step():
    text = format_phases(phases(records()), baseline_step_s=1.0)
    lines = text.splitlines()
    assert "vs full step" in lines[0] and len(lines) == 5
    assert lines[1].split()[:3] == ["1", "none", "1-3"] and lines[1].endswith("1.00x faster")
    assert lines[4].endswith("5.00x faster")  # 1.0 s full step / 0.2 s median at boundary 3
    assert "faster" not in format_phases(phases(records()))  # no baseline, no ratio


def test_timeline_text_names_what_froze():
    assert format_timeline([]) == "  (no block was frozen)"
    text = format_timeline([
        {"step": 0, "epoch": 0.0, "seconds": 0.0, "boundary": 0, "reason": "fixed"},
        {"step": 12, "epoch": 0.5, "seconds": 3.2, "boundary": 3, "reason": "gradnorm"},
    ])
    assert "froze the embeddings - fixed" in text and "step    12" in text
    assert "froze the embeddings and blocks 0-2 - gradnorm" in text


def test_step_timer_records_each_step_with_the_boundary_it_ran_at():
    model = tiny_model("bert", "seq")
    timer = StepTimerCallback()
    for step, freeze_at in ((1, None), (2, 1), (3, None)):
        if freeze_at is not None:
            freeze_prefix(model, freeze_at)
        state = SimpleNamespace(global_step=step, epoch=step / 2)
        timer.on_step_begin(None, state, None, model=model)
        timer.on_step_end(None, state, None, model=model)
    assert [(r.step, r.epoch, r.boundary) for r in timer.records] == [(1, 0, None), (2, 0, 1), (3, 1, 1)]
    assert all(r.seconds >= 0 for r in timer.records)


def test_plot_is_written_as_a_png(tmp_path):
    path = plot_timeline(records(), tmp_path / "plots" / "timeline.png", baseline_step_s=1.0, num_blocks=4)
    assert path == tmp_path / "plots" / "timeline.png"
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000
