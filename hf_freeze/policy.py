"""When to freeze: policies that turn training progress (and per-block signals) into a new boundary.

Policies count *units* in forward order: unit 0 is the embeddings, unit `i + 1` is block `i`. Freezing `u` units
means boundary `u - 1` (the embeddings and blocks `[0, u - 1)`). A policy never moves the boundary back and never
freezes past `max_boundary` (by default every block but the last, so a policy never freezes the whole encoder
unless the user asks). Policies touch no model: the callback feeds them numbers and applies their decisions.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .budget import FreezePlan, StepCostModel, plan_timeline
from .config import FreezeConfig


@dataclass(frozen=True)
class Progress:
    """Where training is: optimizer steps completed out of `max_steps`, and the fractional epoch."""

    step: int
    max_steps: int
    epoch: float = 0.0
    steps_per_epoch: int | None = None

    @property
    def fraction(self) -> float:
        return self.step / max(self.max_steps, 1)


@dataclass(frozen=True)
class FreezeDecision:
    """A policy's verdict: move the boundary to `boundary`, because `reason`, as measured by `signal`."""

    boundary: int
    reason: str
    signal: dict[str, float] = field(default_factory=dict)


class FreezePolicy(ABC):
    """Decides when the next blocks are frozen.

    Subclasses set `name`, implement `decide_blocks`, and, if they need per-unit gradient norms, set
    `needs_gradient_norms = True` and implement `observe`; if they plan by the model's step costs, set
    `needs_step_costs = True` and implement `use_costs`. With `config.freeze_embeddings_at_start`, `decide`
    freezes the embeddings before the first step and leaves the blocks to `decide_blocks`.
    """

    name: ClassVar[str]
    needs_gradient_norms: ClassVar[bool] = False
    needs_step_costs: ClassVar[bool] = False

    def __init__(self, config: FreezeConfig, num_blocks: int) -> None:
        self.config = config
        self.num_blocks = num_blocks
        self.max_boundary = resolve_max_boundary(config, num_blocks)

    def observe(self, unit_norms: Sequence[float | None]) -> None:
        """Record one optimizer step's gradient norm per unit (`None` for frozen units)."""

    def use_costs(self, costs: StepCostModel) -> None:
        """The model's step costs per boundary (`budget.StepCostModel`), for policies that plan by cost."""

    def decide(self, progress: Progress, boundary: int | None) -> FreezeDecision | None:
        """The new boundary after the step `progress.step`, or `None` to keep the current one."""
        if boundary is None and self.freezes_embeddings_at_start:
            return FreezeDecision(0, "embeddings frozen from the start (freeze_embeddings_at_start)")
        return self.decide_blocks(progress, boundary)

    @property
    def freezes_embeddings_at_start(self) -> bool:
        return self.config.freeze_embeddings_at_start

    @abstractmethod
    def decide_blocks(self, progress: Progress, boundary: int | None) -> FreezeDecision | None:
        """The policy's own rule: the new boundary after `progress.step`, or `None` to keep the current one."""

    def interval_steps(self, max_steps: int) -> int:
        """Optimizer steps between two decisions."""
        if self.config.interval_steps is not None:
            return self.config.interval_steps
        return max(1, round(self.config.interval * max_steps))

    def is_decision_step(self, progress: Progress) -> bool:
        return progress.step > 0 and progress.step % self.interval_steps(progress.max_steps) == 0

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state, saved in checkpoints so a resumed run decides exactly as an unbroken one."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""

    @property
    def max_units(self) -> int:
        return self.max_boundary + 1


class FixedPolicy(FreezePolicy):
    """Freeze `config.boundary` blocks (and the embeddings) before the first step: the common manual practice."""

    name = "fixed"

    def __init__(self, config: FreezeConfig, num_blocks: int) -> None:
        super().__init__(config, num_blocks)
        assert config.boundary is not None  # FreezeConfig guarantees it for policy="fixed"
        if config.boundary > num_blocks:
            raise ValueError(
                f"`boundary={config.boundary}` is past the last block: the model has {num_blocks} blocks. Use a "
                f"boundary between 0 and {num_blocks}."
            )
        self.max_boundary = config.boundary

    @property
    def freezes_embeddings_at_start(self) -> bool:
        return False  # the boundary itself is frozen before the first step

    def decide_blocks(self, progress: Progress, boundary: int | None) -> FreezeDecision | None:
        if boundary is not None and boundary >= self.max_boundary:
            return None
        return FreezeDecision(self.max_boundary, f"fixed: freeze {self.max_boundary} blocks from the start")


class SchedulePolicy(FreezePolicy):
    """A deterministic schedule by training progress.

    - `geometric` (PipeTransformer): every interval, freeze `schedule_fraction` of the remaining freezable units
      (at least one).
    - `linear` (Composer): the frozen fraction of the freezable units grows linearly from 0 at `freeze_start` to
      `freeze_level` at the end of training.
    """

    name = "schedule"

    def decide_blocks(self, progress: Progress, boundary: int | None) -> FreezeDecision | None:
        if not self.is_decision_step(progress) or progress.fraction < self.config.freeze_start:
            return None
        frozen = units_of(boundary)
        if self.config.schedule == "geometric":
            target = frozen + math.ceil(self.config.schedule_fraction * (self.max_units - frozen))
        else:
            ramp = (progress.fraction - self.config.freeze_start) / (1 - self.config.freeze_start)
            target = math.floor(self.config.freeze_level * self.max_units * min(ramp, 1.0) + 1e-9)
        target = min(target, self.max_units)
        if target <= frozen:
            return None
        return FreezeDecision(
            target - 1,
            f"schedule ({self.config.schedule}) at {progress.fraction:.0%} of training",
            {"progress": progress.fraction},
        )


class GradNormPolicy(FreezePolicy):
    """AutoFreeze-style: freeze the front units whose gradient norm has stopped changing.

    Per-unit gradient norms are averaged over each interval. At the end of an interval, each active unit's
    relative change from the previous interval is compared with the `percentile`-th percentile of the changes of
    all active units; the longest run of units at or below it, starting at the current boundary, is frozen.
    """

    name = "gradnorm"
    needs_gradient_norms = True

    def __init__(self, config: FreezeConfig, num_blocks: int) -> None:
        super().__init__(config, num_blocks)
        units = num_blocks + 1
        self.window_sum = [0.0] * units
        self.window_steps = 0
        self.previous_mean: list[float] | None = None

    def observe(self, unit_norms: Sequence[float | None]) -> None:
        for unit, norm in enumerate(unit_norms):
            if norm is not None:
                self.window_sum[unit] += norm
        self.window_steps += 1

    def decide_blocks(self, progress: Progress, boundary: int | None) -> FreezeDecision | None:
        if not self.is_decision_step(progress) or self.window_steps == 0:
            return None
        mean = [s / self.window_steps for s in self.window_sum]
        previous, self.previous_mean = self.previous_mean, mean
        self.window_sum, self.window_steps = [0.0] * len(mean), 0
        if previous is None or progress.fraction < self.config.freeze_start:
            return None
        frozen = units_of(boundary)
        changes = [abs(m - p) / max(p, 1e-12) for m, p in zip(mean, previous)]
        threshold = percentile(changes[frozen:], self.config.percentile)
        target = frozen
        while target < self.max_units and changes[target] <= threshold:
            target += 1
        if target == frozen:
            return None
        signal = {f"change/unit{u}": changes[u] for u in range(frozen, target)}
        signal["threshold"] = threshold
        return FreezeDecision(
            target - 1,
            f"gradnorm: gradient-norm change of units {frozen}..{target - 1} at or below the "
            f"{self.config.percentile:g}th percentile ({threshold:.3g}) of active units",
            signal,
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "window_sum": list(self.window_sum),
            "window_steps": self.window_steps,
            "previous_mean": None if self.previous_mean is None else list(self.previous_mean),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.window_sum = list(state["window_sum"])
        self.window_steps = int(state["window_steps"])
        self.previous_mean = None if state["previous_mean"] is None else list(state["previous_mean"])


class BudgetPolicy(FreezePolicy):
    """Meet a speed-up the user names: plan the timeline once, from the model's step costs, then follow it.

    The plan (`budget.plan_timeline`) freezes every unit up to `max_boundary` at once (`budget_plan="switch"`)
    or one at a time at evenly spaced steps from `freeze_start` (`"ramp"`), ending at the latest step at which the
    run still comes out `target_speedup` times faster than full fine-tuning by the cost model
    (`budget.StepCostModel`: parameters trained, run forward, or read from the cache).
    """

    name = "budget"
    needs_step_costs = True

    def __init__(self, config: FreezeConfig, num_blocks: int) -> None:
        super().__init__(config, num_blocks)
        self.costs: StepCostModel | None = None
        self.plan: FreezePlan | None = None

    @property
    def freezes_embeddings_at_start(self) -> bool:
        return False  # the plan places the embeddings itself

    def use_costs(self, costs: StepCostModel) -> None:
        self.costs = costs

    def is_decision_step(self, progress: Progress) -> bool:
        return self.plan is not None and progress.step in self.plan.steps

    def decide_blocks(self, progress: Progress, boundary: int | None) -> FreezeDecision | None:
        if self.plan is None:
            if self.costs is None:
                raise RuntimeError("The budget policy needs the model's step costs: FreezeCallback calls use_costs.")
            steps_per_epoch = progress.steps_per_epoch or progress.max_steps
            self.plan = plan_timeline(self.costs, self.config.target_speedup, progress.max_steps, steps_per_epoch,
                                      self.max_boundary, start=math.ceil(self.config.freeze_start * progress.max_steps),
                                      shape=self.config.budget_plan)
        target = self.plan.boundary_at(progress.step)
        if target is None or units_of(target) <= units_of(boundary):
            return None
        return FreezeDecision(
            target,
            f"budget ({self.config.budget_plan}): plan for {self.config.target_speedup:g}x (cost model predicts "
            f"{self.plan.predicted_speedup:.2f}x) freezes boundary {target} at step {progress.step}",
            {"predicted_speedup": self.plan.predicted_speedup},
        )

    def state_dict(self) -> dict[str, Any]:
        return {} if self.plan is None else {"steps": list(self.plan.steps), "speedup": self.plan.predicted_speedup}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.plan = FreezePlan(tuple(state["steps"]), float(state["speedup"]))


POLICIES: dict[str, type[FreezePolicy]] = {
    p.name: p for p in (GradNormPolicy, SchedulePolicy, FixedPolicy, BudgetPolicy)
}


def build_policy(config: FreezeConfig, num_blocks: int) -> FreezePolicy:
    """The policy `config.policy` names, for a model with `num_blocks` blocks."""
    if config.policy not in POLICIES:
        raise ValueError(f"Unknown freeze policy {config.policy!r}; choose one of {sorted(POLICIES)}.")
    return POLICIES[config.policy](config, num_blocks)


def resolve_max_boundary(config: FreezeConfig, num_blocks: int) -> int:
    """`config.max_boundary`, defaulting to all blocks but the last, checked against the model."""
    if config.max_boundary is None:
        return max(num_blocks - 1, 0)
    if config.max_boundary > num_blocks:
        raise ValueError(
            f"`max_boundary={config.max_boundary}` is past the last block: the model has {num_blocks} blocks. Use "
            f"at most {num_blocks} (which leaves only the head training)."
        )
    return config.max_boundary


def units_of(boundary: int | None) -> int:
    """Number of frozen units at `boundary` (embeddings count as one)."""
    return 0 if boundary is None else boundary + 1


def percentile(values: Sequence[float], q: float) -> float:
    """The `q`-th percentile with linear interpolation (numpy's default), without numpy."""
    ordered = sorted(values)
    if not ordered:
        return 0.0
    position = (len(ordered) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)
