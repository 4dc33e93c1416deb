"""Policies are pure: numbers in, decisions out. No model needed."""

import random

import pytest

from hf_freeze import FreezeConfig, Progress, build_policy
from hf_freeze.policy import POLICIES, GradNormPolicy, percentile, units_of


def drive(policy, max_steps, norms_at, boundary=None):
    """Run a policy through a training run; returns the boundary after every step."""
    history = []
    for step in range(1, max_steps + 1):
        if policy.needs_gradient_norms:
            policy.observe([None] * units_of(boundary) + norms_at(step)[units_of(boundary):])
        decision = policy.decide(Progress(step, max_steps), boundary)
        if decision is not None:
            assert boundary is None or decision.boundary > boundary, "a policy must only move the boundary forward"
            boundary = decision.boundary
        history.append(boundary)
    return history


def test_registry_matches_config_choices():
    from hf_freeze.config import POLICY_NAMES

    assert tuple(POLICIES) == POLICY_NAMES


def test_unknown_policy_name_lists_the_choices():
    config = FreezeConfig()
    config.policy = "magic"  # bypass __post_init__ as a loaded, hand-edited config could
    with pytest.raises(ValueError, match=r"choose one of \['budget', 'fixed', 'gradnorm', 'schedule'\]"):
        build_policy(config, 6)


def test_max_boundary_past_last_block_is_an_error():
    with pytest.raises(ValueError, match="past the last block: the model has 6 blocks"):
        build_policy(FreezeConfig(max_boundary=7), 6)


def test_fixed_boundary_past_last_block_is_an_error():
    with pytest.raises(ValueError, match="past the last block"):
        build_policy(FreezeConfig(policy="fixed", boundary=9), 6)


def test_fixed_freezes_before_the_first_step_and_never_again():
    policy = build_policy(FreezeConfig(policy="fixed", boundary=4), 6)
    decision = policy.decide(Progress(0, 100), None)
    assert decision.boundary == 4
    assert policy.decide(Progress(50, 100), 4) is None


def test_fixed_may_freeze_every_block_when_asked():
    assert build_policy(FreezeConfig(policy="fixed", boundary=6), 6).decide(Progress(0, 10), None).boundary == 6


def test_gradnorm_freezes_the_converged_prefix_and_keeps_the_changing_front_active():
    # Units 0..3 (embeddings, blocks 0-2) barely change; unit 4 (block 3) changes fastest of all, so it and the
    # units behind it stay active even though units 5 and 6 change less than it.
    def norms(step):
        return [1.0 + 0.001 * step] * 4 + [float(step) ** 3, float(step) ** 2, float(step)]

    history = drive(GradNormPolicy(FreezeConfig(interval_steps=10), 6), 60, norms)
    assert history[18] is None  # the first interval has nothing to compare with
    assert history[19] == 3  # embeddings + blocks 0, 1, 2
    assert history[-1] == 3


def test_gradnorm_never_freezes_past_max_boundary_even_if_everything_converged():
    history = drive(GradNormPolicy(FreezeConfig(interval_steps=5, percentile=100), 6), 200, lambda s: [1.0] * 7)
    assert max(b for b in history if b is not None) <= 5  # default: all blocks but the last
    assert history[-1] == 5


def test_gradnorm_waits_for_freeze_start():
    config = FreezeConfig(interval_steps=5, percentile=100, freeze_start=0.5)
    history = drive(GradNormPolicy(config, 6), 100, lambda s: [1.0] * 7)
    assert all(b is None for b in history[:49])
    assert history[-1] is not None


@pytest.mark.parametrize("policy", ["gradnorm", "schedule"])
def test_automatic_policies_freeze_only_the_embeddings_before_the_first_step(policy):
    config = FreezeConfig(policy=policy, interval_steps=5, percentile=100, freeze_start=0.5,
                          freeze_embeddings_at_start=True)
    history = drive(build_policy(config, 6), 100, lambda s: [1.0] * 7)
    assert history[0] == 0  # embeddings, even before freeze_start: that knob is about blocks
    assert all(b == 0 for b in history[:49])
    assert history[-1] > 0


def test_gradnorm_state_round_trip_gives_identical_decisions():
    rng = random.Random(0)
    table = [[rng.random() for _ in range(7)] for _ in range(101)]
    config = FreezeConfig(interval_steps=7, percentile=60)
    reference = drive(GradNormPolicy(config, 6), 100, lambda s: table[s])

    first = GradNormPolicy(config, 6)
    prefix = drive(first, 40, lambda s: table[s])
    resumed = GradNormPolicy(config, 6)
    resumed.load_state_dict(first.state_dict())
    boundary, rest = prefix[-1], []
    for step in range(41, 101):
        resumed.observe([None] * units_of(boundary) + table[step][units_of(boundary):])
        decision = resumed.decide(Progress(step, 100), boundary)
        boundary = decision.boundary if decision else boundary
        rest.append(boundary)
    assert prefix + rest == reference


@pytest.mark.parametrize("seed", range(20))
def test_any_policy_keeps_a_growing_prefix_within_bounds(seed):
    rng = random.Random(seed)
    config = FreezeConfig(
        policy=rng.choice(["gradnorm", "schedule"]),
        schedule=rng.choice(["geometric", "linear"]),
        interval=rng.choice([0.02, 0.1, 0.3]),
        percentile=rng.uniform(0, 100),
        freeze_start=rng.uniform(0, 0.8),
        max_boundary=rng.choice([None, 2, 6]),
    )
    policy = build_policy(config, 6)
    history = drive(policy, 150, lambda s: [rng.random() for _ in range(7)])
    seen = [b for b in history if b is not None]
    assert seen == sorted(seen)
    assert all(0 <= b <= policy.max_boundary for b in seen)


def test_geometric_schedule_freezes_a_third_of_the_rest_each_interval():
    policy = build_policy(FreezeConfig(policy="schedule", schedule="geometric", interval_steps=10), 12)
    history = drive(policy, 40, lambda s: [])
    # freezable units: embeddings + 11 blocks = 12; ceil(12/3)=4 units, then ceil(8/3)=3, then ceil(5/3)=2 ...
    assert [history[9], history[19], history[29], history[39]] == [3, 6, 8, 9]


def test_linear_schedule_ramps_from_freeze_start_to_freeze_level():
    config = FreezeConfig(policy="schedule", schedule="linear", interval_steps=10, freeze_start=0.5, freeze_level=1)
    history = drive(build_policy(config, 6), 100, lambda s: [])
    assert all(b is None for b in history[:59])
    assert history[-1] == 5  # all 6 freezable units (embeddings + blocks 0-4) at the end


def test_percentile_matches_numpy_linear_interpolation():
    numpy = pytest.importorskip("numpy")
    values = [0.3, 0.1, 0.9, 0.4, 0.5]
    for q in (0, 10, 50, 75, 100):
        assert percentile(values, q) == pytest.approx(float(numpy.percentile(values, q)))
