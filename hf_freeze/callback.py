"""`FreezeCallback`: a drop-in `TrainerCallback` that freezes converged blocks as a growing prefix.

It only translates Trainer events into calls: gradient norms go to the policy in `on_pre_optimizer_step` (where
they are unscaled and all-reduced), decisions are taken in `on_step_end` and applied with `freeze_prefix`, and the
policy's state and the freeze timeline travel in `trainer.state` (and therefore in every checkpoint).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any

import torch
from safetensors import safe_open
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, HubStrategy
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from .budget import StepCostModel
from .checkpoint import record_trainer_checkpoint, verify_trainer_checkpoint
from .config import FreezeConfig
from .distributed import ParallelModeError, check_parallel_mode
from .freezing import freeze_prefix, frozen_boundary, frozen_parameters, get_layout
from .fsdp import check_same_decision, is_fsdp2
from .offload import check_trainable_placement, offload_frozen_blocks
from .optim import release_parameters
from .policy import FreezeDecision, FreezePolicy, Progress, build_policy, units_of
from .shareable import BasePrefix, base_prefix_for
from .signals import unit_gradient_norms

logger = logging.getLogger(__name__)


class FreezeCallback(TrainerCallback, ExportableState):
    """Freeze the embeddings and the front blocks of the model as they converge.

    Args:
        config (`FreezeConfig` or `dict`, *optional*): the policy and its knobs; defaults to `FreezeConfig()`
            (the `gradnorm` policy).

    Each freeze is logged as `freeze/boundary` and friends through the Trainer's logs, written to the Python
    logger, and appended to `timeline`, which is also kept in `trainer.state.stateful_callbacks["FreezeCallback"]`
    and therefore in checkpoints; `trainer.train(resume_from_checkpoint=...)` restores the boundary and the policy.

    Reporting integrations (TensorBoard, W&B, ...) see the `freeze/*` metrics when this callback runs before them;
    `Trainer` puts user callbacks after its integrations, so either use `FreezeTrainer` (which does it for you) or
    read the freezes from `trainer.state.log_history` / `callback.timeline`.

    Example:
        ```python
        from hf_freeze import FreezeCallback, FreezeConfig

        trainer = Trainer(model, args, train_dataset=train, callbacks=[FreezeCallback(FreezeConfig(policy="gradnorm"))])
        trainer.train()
        ```
    """

    def __init__(self, config: FreezeConfig | dict[str, Any] | None = None) -> None:
        if isinstance(config, dict):
            config = FreezeConfig.from_dict(config)
        self.config = config or FreezeConfig()
        self.timeline: list[dict[str, Any]] = []
        self.policy: FreezePolicy | None = None
        self.resume_checkpoint: str | None = None  # set by FreezeTrainer.train(resume_from_checkpoint=...)
        self.rebuilds_ddp = False  # FreezeTrainer sets it: it rebuilds DDP over the active blocks after each freeze
        self.caches_prefix = False  # FreezeTrainer sets it: frozen states are read from its cache (budget's costs)
        self._dropout_handle: torch.utils.hooks.RemovableHandle | None = None
        self._base_prefix: BasePrefix | None = None  # shareable_prefix: the base's weights of the units to freeze
        self._model: torch.nn.Module | None = None
        self._sharded = False  # the model is sharded with FSDP2
        self._pending_logs: dict[str, float] = {}
        self._train_start = time.perf_counter()

    # ---- Trainer events ----

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        model, optimizer = kwargs["model"], kwargs.get("optimizer")
        self._model = model
        self._train_start = time.perf_counter()
        layout = get_layout(model, self.config.blocks_path)
        self.policy = build_policy(self.config, layout.num_blocks)
        if self.policy.needs_step_costs:
            self.policy.use_costs(StepCostModel.from_model(model, layout, cached=self.caches_prefix))
        check_parallel_mode(args, model, rebuilds_ddp=self.rebuilds_ddp)
        self._sharded = is_fsdp2(model)
        if self.config.offload_frozen != "none" and args.world_size > 1:
            raise ParallelModeError(
                f"offload_frozen={self.config.offload_frozen!r} is for single-process runs (a model spread with "
                "`device_map`); under data parallelism every rank holds a full replica. Set offload_frozen='none'."
            )
        if state.global_step > 0:  # resumed: the checkpoint's files as they were saved, before any step
            checkpoint = self._resumed_folder(args, state)
            if os.path.isdir(checkpoint) and verify_trainer_checkpoint(checkpoint):
                logger.info("hf_freeze: %s matches the sha256 recorded when it was saved.", checkpoint)
        self._restore(args, state, model, optimizer)
        if self.config.shareable_prefix:
            self._base_prefix = base_prefix_for(model, layout, frozen_boundary(model), self.policy.max_boundary,
                                                resumed=state.global_step > 0)
        if optimizer is not None and frozen_boundary(model) is not None:
            release_parameters(optimizer, frozen_parameters(model))  # frozen before the Trainer built its optimizer
        self._maybe_freeze(args, state, control, model, optimizer, kwargs.get("lr_scheduler"))
        self._place_boundary_dropout(model)  # a boundary restored from a checkpoint, or frozen before training
        self._offload(model)
        check_trainable_placement(model)

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self.policy is not None and self.policy.needs_gradient_norms:
            _unscale_gradients(kwargs.get("optimizer"))
            layout = get_layout(kwargs["model"])
            norms = unit_gradient_norms(layout, frozen_boundary(kwargs["model"]))
            if all(n is None or math.isfinite(n) for n in norms):
                self.policy.observe(norms)
            else:  # an fp16 overflow: the scaler skips this step, and so does the policy
                logger.debug("hf_freeze: non-finite gradient norms at step %d ignored.", state.global_step)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._maybe_freeze(args, state, control, kwargs["model"], kwargs.get("optimizer"), kwargs.get("lr_scheduler"))

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        # the sha256 of what a resume reads; FSDP2 ranks write their shards themselves, so only a process that saved
        # the whole checkpoint records it; a checkpoint being pushed is uploading while this would write into it
        folder = _checkpoint_folder(args, state.global_step)
        pushed = args.push_to_hub and args.hub_strategy in (HubStrategy.CHECKPOINT, HubStrategy.ALL_CHECKPOINTS)
        if state.is_world_process_zero and not self._sharded and not pushed and os.path.isdir(folder):
            record_trainer_checkpoint(folder)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self._base_prefix is not None:
            self._base_prefix.release()

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kwargs):
        pending = self.pop_pending_logs()
        if logs is not None and pending:
            logs.update(pending)
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1].update(pending)  # Trainer appended a copy of `logs` before calling us

    # ---- state ----

    def state(self) -> dict[str, Any]:
        """What `Trainer` stores in checkpoints (`ExportableState`)."""
        return {
            "args": {"config": self.config.to_dict()},
            "attributes": {
                "timeline": list(self.timeline),
                "boundary": None if self._model is None else frozen_boundary(self._model),
                "policy_state": None if self.policy is None else self.policy.state_dict(),
            },
        }

    def pop_pending_logs(self) -> dict[str, float]:
        """Metrics of freezes not yet logged (the `Trainer` subclass merges them into its own logs)."""
        logs, self._pending_logs = self._pending_logs, {}
        return logs

    # ---- internals ----

    def _resumed_folder(self, args: TrainingArguments, state: TrainerState) -> str:
        """The checkpoint a resumed run loaded: the one FreezeTrainer was given, else Trainer's folder of that step."""
        return self.resume_checkpoint or _checkpoint_folder(args, state.global_step)

    def _restore(self, args: TrainingArguments, state: TrainerState, model: torch.nn.Module, optimizer) -> None:
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        if isinstance(saved, list):
            saved = saved[0] if saved else None
        attributes = (saved or {}).get("attributes", {})
        if attributes.get("policy_state") is not None:
            self.policy.load_state_dict(attributes["policy_state"])
        self.timeline = list(attributes.get("timeline", self.timeline))
        boundary = attributes.get("boundary")
        current = frozen_boundary(model)
        if boundary is not None and (current is None or current < boundary):
            result = freeze_prefix(model, boundary, optimizer=optimizer, tied_weights=self.config.tied_weights)
            logger.info("hf_freeze: restored boundary %d from the checkpoint.", boundary)
            if result.untied:
                # The resumed model was built tied, so loading the checkpoint wrote two different tensors into one
                # parameter; now that it is untied again, read both sides back from the checkpoint.
                checkpoint = self._resumed_folder(args, state)
                names = [n for n, p in model.named_parameters() if not p.requires_grad] + list(result.untied)
                reload_parameters(model, checkpoint, names)

    def _maybe_freeze(self, args, state: TrainerState, control: TrainerControl, model, optimizer,
                      lr_scheduler=None) -> None:
        epochs = getattr(state, "num_train_epochs", 0) or 0
        progress = Progress(step=state.global_step, max_steps=state.max_steps, epoch=state.epoch or 0.0,
                            steps_per_epoch=math.ceil(state.max_steps / epochs) if epochs else None)
        decision = self.policy.decide(progress, frozen_boundary(model))
        if self.policy.is_decision_step(progress) or state.global_step == 0:
            if self._sharded:  # FSDP2: every rank decided from the same reduced norms; a split is an error
                check_same_decision(None if decision is None else decision.boundary)
            else:
                decision = _same_on_every_rank(decision)
        if decision is None:
            return
        result = freeze_prefix(model, decision.boundary, optimizer=optimizer, tied_weights=self.config.tied_weights)
        if self._base_prefix is not None:  # before anything reads the new prefix (cache, fingerprints)
            self._base_prefix.restore(get_layout(model), range(units_of(result.previous_boundary),
                                                               units_of(result.boundary)))
        self._place_boundary_dropout(model)
        self._scale_learning_rate(lr_scheduler, result.previous_boundary, result.boundary)
        self._record(decision, result, state, progress)
        moved = self._offload(model)
        if moved is not None:
            self.timeline[-1].update(moved)
            self._pending_logs.update({f"freeze/{k}": float(v) for k, v in moved.items()})
        control.should_log = control.should_log or state.global_step > 0

    def _scale_learning_rate(self, lr_scheduler, previous: int | None, boundary: int) -> None:
        """`active_lr_scale` and `active_lr_rewarm`: move the schedule's base rates (and the current rates) to the new
        boundary's factor, and with re-warming scale them so the current rate is back at the (scaled) peak. The factor
        lives in the scheduler's `base_lrs`, which Trainer checkpoints, so a resumed run keeps it."""
        rewarm = self.config.active_lr_rewarm
        if (self.config.active_lr_scale == 1 and not rewarm) or lr_scheduler is None:
            return
        inner = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate wraps the torch scheduler
        units = self.policy.num_blocks + 1
        scale, groups = self.config.active_lr_scale, inner.optimizer.param_groups
        step = scale ** ((units_of(boundary) - units_of(previous)) / units)  # the scale's move to this boundary
        ratios = [step] * len(groups)
        if rewarm:
            # the peak is the group's initial rate (torch keeps it in the group, so it is checkpointed) at this
            # boundary's scale; scaling the base by peak / current keeps the schedule's shape for the rest of the run
            peak = scale ** (units_of(boundary) / units)
            ratios = [group.get("initial_lr", base) * peak / group["lr"] if group["lr"] > 0 else step
                      for group, base in zip(groups, inner.base_lrs)]
        inner.base_lrs = [base * ratio for base, ratio in zip(inner.base_lrs, ratios)]
        for group, ratio in zip(groups, ratios):
            group["lr"] *= ratio
        inner._last_lr = [group["lr"] for group in groups]  # what Trainer logs

    def _place_boundary_dropout(self, model: torch.nn.Module) -> None:
        """Keep `boundary_dropout`'s hook on the first active block (moved at each freeze)."""
        if self._dropout_handle is not None:
            self._dropout_handle.remove()
            self._dropout_handle = None
        boundary, layout = frozen_boundary(model), get_layout(model)
        if self.config.boundary_dropout > 0 and boundary is not None and boundary < layout.num_blocks:
            self._dropout_handle = layout.blocks[boundary].register_forward_pre_hook(
                _dropout_on_input(self.config.boundary_dropout), with_kwargs=True)

    def _offload(self, model: torch.nn.Module) -> dict[str, int] | None:
        """Move the frozen blocks off their device when `offload_frozen` asks for it; what was moved, or `None`."""
        boundary = frozen_boundary(model)
        if self.config.offload_frozen == "none" or boundary is None:
            return None
        return offload_frozen_blocks(model, get_layout(model), boundary, self.config.offload_frozen,
                                     self.config.offload_dir)

    def _record(self, decision: FreezeDecision, result, state: TrainerState, progress: Progress) -> None:
        event = {
            "step": progress.step,
            "epoch": round(progress.epoch, 4),
            "seconds": round(time.perf_counter() - self._train_start, 3),
            "boundary": result.boundary,
            "previous_boundary": result.previous_boundary,
            "frozen_parameters": result.newly_frozen_parameters,
            "optimizer_bytes_released": result.optimizer_bytes_released,
            "reason": decision.reason,
            "signal": decision.signal,
            **({"base_restored": True} if self._base_prefix is not None else {}),
        }
        self.timeline.append(event)
        self._pending_logs.update(
            {
                "freeze/boundary": float(result.boundary),
                "freeze/frozen_parameters": float(sum(e["frozen_parameters"] for e in self.timeline)),
                "freeze/optimizer_bytes_released": float(result.optimizer_bytes_released),
            }
        )
        if isinstance(state.stateful_callbacks, dict) and type(self).__name__ in state.stateful_callbacks:
            state.stateful_callbacks[type(self).__name__] = self.state()
        previous = "nothing" if result.previous_boundary is None else f"boundary {result.previous_boundary}"
        logger.info(
            "hf_freeze: step %d (epoch %.2f): froze the embeddings and blocks [0, %d) (was %s): %s",
            progress.step, progress.epoch, result.boundary, previous, decision.reason,
        )


def _checkpoint_folder(args: TrainingArguments, step: int) -> str:
    """Where `Trainer` saves the checkpoint of `step`."""
    return os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}")


def reload_parameters(model: torch.nn.Module, checkpoint: str, names: list[str]) -> None:
    """Copy the tensors `names` from a checkpoint folder's safetensors file(s) into the model's parameters."""
    single = os.path.join(checkpoint, SAFE_WEIGHTS_NAME)
    index = os.path.join(checkpoint, SAFE_WEIGHTS_INDEX_NAME)
    if os.path.isfile(single):
        files = dict.fromkeys(names, single)
    elif os.path.isfile(index):
        with open(index) as handle:
            weight_map = json.load(handle)["weight_map"]
        files = {n: os.path.join(checkpoint, weight_map[n]) for n in names if n in weight_map}
    else:
        raise FileNotFoundError(
            f"Resuming a run whose lm_head was untied from the frozen embeddings needs the checkpoint's weights, "
            f"but {checkpoint} has no safetensors file. Pass `resume_from_checkpoint` to FreezeTrainer.train, or "
            "load the model itself from the checkpoint folder."
        )
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, path in files.items():
            with safe_open(path, framework="pt") as handle:
                if name in handle.keys():
                    parameters[name].copy_(handle.get_tensor(name))


def _dropout_on_input(p: float):
    """Forward pre-hook: dropout on a block's input hidden states while the block trains."""

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if not (module.training and torch.is_grad_enabled()):
            return None
        if args and isinstance(args[0], torch.Tensor):
            return (torch.nn.functional.dropout(args[0], p, training=True), *args[1:]), kwargs
        if isinstance(kwargs.get("hidden_states"), torch.Tensor):
            return args, {**kwargs, "hidden_states": torch.nn.functional.dropout(kwargs["hidden_states"], p, True)}
        return None

    return hook


def _same_on_every_rank(decision: FreezeDecision | None) -> FreezeDecision | None:
    """Rank 0's decision, so that data-parallel replicas never disagree on the frozen prefix."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return decision
    if torch.distributed.get_world_size() == 1:
        return decision
    holder = [decision]
    torch.distributed.broadcast_object_list(holder, src=0)
    return holder[0]


def _unscale_gradients(optimizer: Any) -> None:
    """Under fp16 mixed precision, unscale the gradients before they are read, unless the Trainer already did
    (it does when it clips or measures the gradient norm); the scaler's `step` then does not unscale them again."""
    scaler = getattr(optimizer, "scaler", None)  # accelerate's AcceleratedOptimizer carries the GradScaler
    if scaler is None or not scaler.is_enabled():
        return
    try:
        scaler.unscale_(optimizer.optimizer)
    except RuntimeError as error:
        if "already been called" not in str(error):
            raise
