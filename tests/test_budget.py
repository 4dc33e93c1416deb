"""The budget policy's cost model and planner (hf_freeze/budget.py)."""

import pytest
import torch
from conftest import tiny_model

from hf_freeze import get_layout
from hf_freeze.budget import FreezePlan, StepCostModel, plan_timeline

# two blocks of cost 1 and a head of cost 1: a full step costs 3 * 3 = 9
TWO_BLOCKS = StepCostModel(block_costs=(1.0, 1.0), head_cost=1.0)


def test_step_costs_count_trained_recomputed_and_cached_units():
    assert TWO_BLOCKS.full() == TWO_BLOCKS.step(None) == 9
    assert TWO_BLOCKS.step(1) == 3 * 2 + 1  # block 1 and the head train, block 0 runs forward
    assert TWO_BLOCKS.step(1, cached_at=1) == 6  # block 0's output is read from the cache
    assert TWO_BLOCKS.step(2, cached_at=1) == 3 + 1  # advanced through block 1 only
    uncached = StepCostModel((1.0, 1.0), 1.0, cached=False)
    assert uncached.step(1, cached_at=1) == uncached.step(1) == 7


def test_run_cost_reads_the_cache_one_epoch_after_a_boundary_was_stored():
    # 2 epochs of 2 steps: step 0 full, then boundary 2 (miss, 3 + 2), then two hits at boundary 2 (3 each)
    boundaries = [None, 2, 2, 2]
    assert TWO_BLOCKS.run(boundaries, steps_per_epoch=2) == 9 + 5 + 5 + 3  # step 2 meets step 0's (nothing stored)
    assert TWO_BLOCKS.speedup(boundaries, 2) == pytest.approx(36 / 22)


def test_plan_meets_the_target_as_late_as_it_can():
    costs = StepCostModel(block_costs=(1.0,) * 6, head_cost=0.2)
    plan = plan_timeline(costs, 3.0, max_steps=900, steps_per_epoch=300, max_boundary=5, shape="ramp")
    assert plan.predicted_speedup >= 3.0
    assert plan.steps == tuple(sorted(plan.steps)) and len(plan.steps) == 6
    later = FreezePlan(tuple(s + 3 for s in plan.steps), 0.0)
    assert costs.speedup(later.boundaries(900), 300) < 3.0  # freezing any later misses the target
    assert plan.boundary_at(plan.steps[0] - 1) is None and plan.boundary_at(plan.steps[-1]) == 5
    assert plan_timeline(costs, 2.0, 900, 300, 5, shape="ramp").steps[-1] > plan.steps[-1]  # smaller target: later
    switch = plan_timeline(costs, 3.0, 900, 300, 5, shape="switch")
    assert len(set(switch.steps)) == 1 and switch.predicted_speedup >= 3.0
    assert plan.steps[0] < switch.steps[0] < plan.steps[-1]  # all blocks train longer than the ramp's lowest


def test_plan_starts_at_freeze_start_and_refuses_an_unreachable_target():
    costs = StepCostModel(block_costs=(1.0,) * 6, head_cost=0.2)
    assert plan_timeline(costs, 2.0, 900, 300, 5, start=90, shape="ramp").steps[0] > 90
    with pytest.raises(ValueError, match="No freeze plan reaches target_speedup=20"):
        plan_timeline(costs, 20.0, 900, 300, 5)
    with pytest.raises(ValueError, match="Unknown plan shape 'zigzag'"):
        plan_timeline(costs, 2.0, 900, 300, 5, shape="zigzag")


def test_cost_model_of_a_real_layout_counts_blocks_and_a_tied_head():
    model = tiny_model("llama", "causal")
    costs = StepCostModel.from_model(model, get_layout(model))
    assert costs.block_costs == tuple(float(sum(p.numel() for p in b.parameters())) for b in model.model.layers)
    assert costs.head_cost >= model.lm_head.weight.numel()  # tied to the embeddings, still a matmul per token
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
