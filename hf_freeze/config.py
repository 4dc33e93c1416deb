"""`FreezeConfig`: which policy decides when to freeze, its knobs, and the prefix cache's knobs.

The dataclass doubles as a command-line schema: `transformers.HfArgumentParser(FreezeConfig)` turns every field
into a `--flag` with the help text below, which is how the recipes expose it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

POLICY_NAMES = ("gradnorm", "schedule", "fixed", "budget")
SCHEDULE_KINDS = ("geometric", "linear")
TIED_WEIGHTS_MODES = ("untie", "freeze")
CACHE_MODES = ("auto", "on", "off")
CACHE_DTYPES = ("auto", "float32", "bfloat16", "float16")
STALE_CACHE_MODES = ("rebuild", "error")
OFFLOAD_TARGETS = ("none", "cpu", "disk")
BUDGET_PLANS = ("switch", "ramp")


@dataclass
class FreezeConfig:
    """What decides the frozen prefix, and how the prefix cache behaves.

    The boundary `k` means: the embeddings and blocks `[0, k)` are frozen. Policies only move it forward.

    Example:
        ```python
        from hf_freeze import FreezeCallback, FreezeConfig

        config = FreezeConfig(policy="gradnorm", interval=0.05, percentile=50)
        trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[FreezeCallback(config)])
        ```
    """

    policy: str = field(
        default="gradnorm",
        metadata={"help": f"When to freeze: one of {POLICY_NAMES}.", "choices": POLICY_NAMES},
    )
    interval: float = field(
        default=0.05,
        metadata={
            "help": "Fraction of the run's optimizer steps between two freeze decisions (gradnorm: also the window "
            "over which gradient norms are accumulated). 0.05 means 20 decisions per run."
        },
    )
    interval_steps: int | None = field(
        default=None, metadata={"help": "The decision interval in optimizer steps; overrides `interval`."}
    )
    percentile: float = field(
        default=40.0,
        metadata={
            "help": "gradnorm: a block is converged when the relative change of its gradient norm between two "
            "intervals is at or below this percentile of the changes of all active blocks (0-100)."
        },
    )
    freeze_start: float = field(
        default=0.0,
        metadata={
            "help": "No policy freezes before this fraction of training (0-1), except the embeddings under "
            "`freeze_embeddings_at_start`; `fixed` ignores it."
        },
    )
    freeze_embeddings_at_start: bool = field(
        default=False,
        metadata={
            "help": "gradnorm and schedule: freeze the embeddings (boundary 0) before the first step and decide "
            "about the blocks only. Off by default: on MiniLM / Rotten Tomatoes (three seeds) it was neither more "
            "accurate nor faster than letting the policy treat the embeddings like a block."
        },
    )
    schedule: str = field(
        default="geometric",
        metadata={
            "help": f"schedule policy: one of {SCHEDULE_KINDS}. geometric freezes `schedule_fraction` of the "
            "remaining freezable blocks every interval (PipeTransformer); linear grows the frozen fraction "
            "linearly from `freeze_start` to `freeze_level` at the end of training (Composer).",
            "choices": SCHEDULE_KINDS,
        },
    )
    schedule_fraction: float = field(
        default=1 / 3, metadata={"help": "geometric schedule: fraction of the remaining blocks frozen per interval."}
    )
    freeze_level: float = field(
        default=1.0, metadata={"help": "linear schedule: fraction of the freezable blocks frozen at the end (0-1)."}
    )
    boundary: int | None = field(
        default=None, metadata={"help": "fixed policy: freeze the embeddings and this many blocks from the start."}
    )
    target_speedup: float = field(
        default=3.0,
        metadata={"help": "budget policy: plan the freeze timeline so that the run is this many times faster than "
                          "full fine-tuning by the model's cost estimate (see hf_freeze.budget)."},
    )
    budget_plan: str = field(
        default="switch",
        metadata={"help": f"budget policy: the plan's shape, one of {BUDGET_PLANS}. switch: every block trains, then "
                          "the whole prefix freezes at once; ramp: the units freeze one at a time at evenly spaced "
                          "steps from `freeze_start`.", "choices": BUDGET_PLANS},
    )
    boundary_dropout: float = field(
        default=0.0,
        metadata={
            "help": "Dropout probability applied, in training only, to the hidden states entering the first active "
            "block. Frozen blocks run in eval mode, so the blocks above them no longer see the dropout noise they "
            "trained with; this gives some back. 0 turns it off."
        },
    )
    active_lr_scale: float = field(
        default=1.0,
        metadata={
            "help": "As the prefix grows, multiply the learning rate of what still trains by active_lr_scale ** "
            "(frozen units / units), so fewer trainable blocks take larger steps (1: the schedule is left alone)."
        },
    )
    active_lr_rewarm: bool = field(
        default=False,
        metadata={
            "help": "At each freeze, put the learning rate of what still trains back to the schedule's peak; it then "
            "follows the schedule's shape down from there (under Trainer's linear decay: a fresh linear decay to zero "
            "over the steps left). Combines with `active_lr_scale`, which sets the peak."
        },
    )
    shareable_prefix: bool = field(
        default=False,
        metadata={
            "help": "Keep the frozen prefix bit-identical to the base's, on any policy: when units freeze, their "
            "weights as training began are put back and the blocks above adapt to them for the rest of the run. "
            "The fine-tune then saves suffix-only on its base (`save_suffix`) and is served through the base's "
            "shared prefix. Costs a CPU copy of the freezable units until each freezes (see hf_freeze.shareable)."
        },
    )
    max_boundary: int | None = field(
        default=None,
        metadata={
            "help": "The most blocks an automatic policy may freeze. Default: all but the last block. Set it to the "
            "number of blocks to allow training only the head."
        },
    )
    tied_weights: str = field(
        default="untie",
        metadata={
            "help": "A parameter shared by a frozen module and a trainable one (an lm_head tied to the input "
            "embeddings): 'untie' gives the frozen module its own copy so the head keeps training; 'freeze' "
            "freezes it for both.",
            "choices": TIED_WEIGHTS_MODES,
        },
    )
    blocks_path: str | None = field(
        default=None,
        metadata={"help": "Dotted path of the transformer blocks' ModuleList when automatic detection fails."},
    )
    # ---- prefix cache (FreezeTrainer only) ----
    cache: str = field(
        default="auto",
        metadata={
            "help": "Prefix cache: 'auto' turns it on when reading a cached state is measured to be cheaper than "
            "recomputing the frozen prefix; 'on' always; 'off' never.",
            "choices": CACHE_MODES,
        },
    )
    cache_dir: str | None = field(
        default=None, metadata={"help": "Keep the cache on disk (memory-mapped) in this folder; default: in memory."}
    )
    cache_max_bytes: int = field(
        default=4 * 2**30, metadata={"help": "Byte budget of the cache; examples that do not fit are recomputed."}
    )
    cache_dtype: str = field(
        default="auto",
        metadata={
            "help": f"Storage precision of cached states, one of {CACHE_DTYPES}. 'auto' stores in the model's own "
            "dtype, which never rounds its states (also under bf16/fp16 autocast, whose block outputs are rounded "
            "already); float16/bfloat16 halve the bytes of a float32 model and round its states.",
            "choices": CACHE_DTYPES,
        },
    )
    cache_eval: bool = field(default=True, metadata={"help": "Also cache the boundary states of evaluation examples."})
    on_stale_cache: str = field(
        default="rebuild",
        metadata={
            "help": "A cache_dir written by another model or other frozen weights: 'rebuild' empties it, 'error' "
            "refuses to start.",
            "choices": STALE_CACHE_MODES,
        },
    )

    # ---- scale: device_map, data parallelism ----
    offload_frozen: str = field(
        default="none",
        metadata={
            "help": "Once blocks are frozen, move their weights off the accelerators with Accelerate's offload hooks: "
            "'cpu' (CPU memory) or 'disk' (files in `offload_dir`); they are loaded back only for the forwards that "
            "still run them (cache misses, evaluation). 'none' keeps them in place. Single-process runs only.",
            "choices": OFFLOAD_TARGETS,
        },
    )
    offload_dir: str | None = field(
        default=None, metadata={"help": "Folder for offload_frozen='disk' (one sub-folder per block)."}
    )
    rank_stable_sharding: bool | None = field(
        default=None,
        metadata={
            "help": "FreezeTrainer under data parallelism: keep each training example on the same rank for the whole "
            "run (shuffled within the rank every epoch), so each rank's cache hits from the second epoch on. "
            "Default: on when the cache is not 'off' and there are several ranks."
        },
    )
    ddp_rebuild: bool = field(
        default=True,
        metadata={
            "help": "FreezeTrainer under DDP: rebuild the DDP wrapper after each freeze so that frozen parameters "
            "leave the gradient buckets (all-reduce shrinks with the prefix)."
        },
    )

    def __post_init__(self) -> None:
        _check_choice("policy", self.policy, POLICY_NAMES)
        _check_choice("schedule", self.schedule, SCHEDULE_KINDS)
        _check_choice("tied_weights", self.tied_weights, TIED_WEIGHTS_MODES)
        _check_choice("cache", self.cache, CACHE_MODES)
        _check_choice("cache_dtype", self.cache_dtype, CACHE_DTYPES)
        _check_choice("on_stale_cache", self.on_stale_cache, STALE_CACHE_MODES)
        _check_choice("offload_frozen", self.offload_frozen, OFFLOAD_TARGETS)
        _check_choice("budget_plan", self.budget_plan, BUDGET_PLANS)
        if self.offload_frozen == "disk" and not self.offload_dir:
            raise ValueError("offload_frozen='disk' needs `offload_dir`: the folder where frozen blocks are written.")
        if not 0 < self.interval <= 1:
            raise ValueError(f"`interval` is a fraction of training in (0, 1], got {self.interval}.")
        if self.interval_steps is not None and self.interval_steps < 1:
            raise ValueError(f"`interval_steps` must be at least 1, got {self.interval_steps}.")
        if not 0 <= self.percentile <= 100:
            raise ValueError(f"`percentile` must be between 0 and 100, got {self.percentile}.")
        if not 0 <= self.freeze_start < 1:
            raise ValueError(f"`freeze_start` is a fraction of training in [0, 1), got {self.freeze_start}.")
        if not 0 < self.schedule_fraction <= 1:
            raise ValueError(f"`schedule_fraction` must be in (0, 1], got {self.schedule_fraction}.")
        if not 0 <= self.freeze_level <= 1:
            raise ValueError(f"`freeze_level` must be in [0, 1], got {self.freeze_level}.")
        if self.target_speedup <= 1:
            raise ValueError(f"`target_speedup` is a speed-up over full fine-tuning and must exceed 1, got "
                             f"{self.target_speedup}.")
        if self.active_lr_scale <= 0:
            raise ValueError(f"`active_lr_scale` multiplies the learning rate and must be positive, got "
                             f"{self.active_lr_scale}.")
        if not 0 <= self.boundary_dropout < 1:
            raise ValueError(f"`boundary_dropout` is a probability in [0, 1), got {self.boundary_dropout}.")
        if self.policy == "fixed" and self.boundary is None:
            raise ValueError("policy='fixed' needs `boundary`: the number of blocks to freeze from the start.")
        for name in ("boundary", "max_boundary"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"`{name}` counts frozen blocks and cannot be negative, got {value}.")
        if self.cache_max_bytes <= 0:
            raise ValueError(
                f"`cache_max_bytes` must be positive, got {self.cache_max_bytes}; use cache='off' to disable the cache."
            )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy, the form stored in checkpoints and model cards."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> FreezeConfig:
        """Build a config from `to_dict()` output; unknown keys are an error that names them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown FreezeConfig fields {unknown}; valid fields are {sorted(known)}.")
        return cls(**values)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {list(choices)}, got {value!r}.")
