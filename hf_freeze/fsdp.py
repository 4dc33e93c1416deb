"""FSDP2 (`torch.distributed.fsdp.fully_shard`) with a moving frozen prefix.

FSDP2 shards every parameter as a `DTensor` and keeps `requires_grad` per parameter, so a block frozen mid-run
simply stops producing gradients: FSDP2 reduce-scatters only the gradients that exist, and the frozen block's
sharded optimizer state is dropped (`optim.release_parameters`). FSDP1 (`FullyShardedDataParallel`) flattens a
block's parameters into one `FlatParameter` with one `requires_grad` (pytorch#104690), so it is refused.

Everything hf_freeze reads from the weights or the gradients goes through this module under FSDP2:
- `is_fsdp2` / `check_fsdp`: FSDP is recognised from the model itself (its `FSDPModule`s), never from the
  environment: Accelerate leaves `ACCELERATE_USE_FSDP=true` behind after an FSDP run, and on a CPU it ignores
  `fsdp=` and trains plain DDP.
- `local_tensor` / `full_tensor`: a shard, or the whole tensor gathered from every rank (a collective: every rank
  must call it at the same point, in the same order).
- `sharded_square_sums`: per-unit sums of squared gradients over the local shards, summed across the ranks that
  hold the other shards, so every rank computes the same norms and takes the same decision.
- `all_ranks_agree`, `check_same_decision`: lockstep choices (the cache must make every rank run the same
  FSDP modules, in the same order, or their all-gathers would pair up wrongly), and an error, never a silent
  split, when ranks would decide differently.
- `ReduceScatterMeter`: counts the bytes FSDP2 reduce-scatters per optimizer step (`set_custom_reduce_scatter`).
- `rank_memory`: the bytes this rank holds in parameter shards, gradient shards and optimizer state.
- `model_class`: the model's own class (`fully_shard` swaps in a `FSDP<Model>` subclass).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

logger = logging.getLogger(__name__)

try:  # torch >= 2.6 exports both publicly
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch builds without distributed support
    class FSDPModule:  # type: ignore[no-redef]
        """Stands in for `torch.distributed.fsdp.FSDPModule` where torch has no distributed support."""

    class DTensor:  # type: ignore[no-redef]
        """Stands in for `torch.distributed.tensor.DTensor` where torch has no distributed support."""


FSDP1_REFUSAL = (
    "hf_freeze cannot freeze a growing prefix under FSDP1 (`fsdp_version: 1`, `FullyShardedDataParallel`): FSDP1 "
    "flattens each wrapped block's parameters into one FlatParameter with a single `requires_grad`, so freezing "
    "part of the model mid-run breaks it (pytorch#104690). Use FSDP2, which keeps `requires_grad` per parameter: "
    "`TrainingArguments(fsdp=True, fsdp_config={'version': 2})` or `fsdp_version: 2` in the `accelerate launch` "
    "config; or DDP."
)


def is_fsdp2(model: nn.Module | None) -> bool:
    """Whether `model` (or one of its modules) was sharded with FSDP2's `fully_shard`."""
    if model is None:
        return False
    return any(isinstance(module, FSDPModule) for module in model.modules())


def is_fsdp1(model: nn.Module | None) -> bool:
    """Whether `model` is (or holds) an FSDP1 `FullyShardedDataParallel` wrapper."""
    if model is None or not dist.is_available():
        return False
    from torch.distributed.fsdp import FullyShardedDataParallel

    return any(isinstance(module, FullyShardedDataParallel) for module in model.modules())


def requested_fsdp_version(args: Any) -> int | None:
    """The FSDP version `TrainingArguments` ask for (`fsdp=` with `fsdp_config['version']`, 2 by default in
    transformers 5), or `None` when they ask for no FSDP."""
    if not getattr(args, "fsdp", None):
        return None
    config = getattr(args, "fsdp_config", None) or {}
    return int(config.get("version", config.get("fsdp_version", 2)))


def check_fsdp(args: Any, model: nn.Module | None) -> bool:
    """Refuse FSDP1; return whether the model really is sharded with FSDP2.

    Args:
        args (`TrainingArguments`): the Trainer's arguments.
        model (`nn.Module`, *optional*): the model as the Trainer prepared it.

    Raises:
        `ParallelModeError`: FSDP1 asked for or in use.
    """
    from .distributed import ParallelModeError

    if is_fsdp1(model) or requested_fsdp_version(args) == 1:
        raise ParallelModeError(FSDP1_REFUSAL)
    if is_fsdp2(model):
        return True
    if requested_fsdp_version(args) == 2 and model is not None and getattr(args, "world_size", 1) > 1:
        logger.warning(
            "hf_freeze: FSDP2 was asked for (`fsdp=`), but the model holds no FSDP2 module: Accelerate trains it "
            "with plain DDP (Accelerate 1.15 enables FSDP on GPU set-ups only). Freezing proceeds as under DDP."
        )
    return False


def reshard(model: nn.Module) -> None:
    """Put every FSDP2 module of `model` back to its sharded parameters, between iterations.

    A forward stopped part-way (hf_freeze finds the embeddings, and checks block outputs, that way) leaves the root's
    gathered parameters registered on the modules and its group marked as in a forward, which `reshard()` alone
    does not undo; freezing those parameters would miss the sharded ones that FSDP2 and the optimizer use. The root
    gets `reset_iter_state()` (torch's recovery after an aborted forward), the others `reshard()`.
    """
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        try:
            module.reset_iter_state()
        except (RuntimeError, AttributeError):  # not a root (or torch < 2.13)
            module.reshard()


def model_class(model: nn.Module) -> type:
    """The model's own class: FSDP2 turns `BertForX` into a `FSDPBertForX(FSDPModule, BertForX)` in place."""
    cls = type(model)
    if issubclass(cls, FSDPModule):
        return next(c for c in cls.__mro__ if not issubclass(c, FSDPModule))
    return cls


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a `DTensor`; any other tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a `DTensor` gathered from every rank (a collective), any other tensor itself."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def sharded_square_sums(unit_grads: list[list[torch.Tensor]]) -> torch.Tensor:
    """Per unit, the sum of squared gradient entries, over every rank's shard.

    Each rank adds up its local shards; one all-reduce per sharded mesh dimension then sums the shards the other
    ranks hold (replicated dimensions, as in HSDP, are not summed twice). Every rank gets the same numbers.

    Args:
        unit_grads: per unit, its gradients (`DTensor`s sharded by FSDP2, or plain tensors).

    Returns:
        A float32 tensor of one sum of squares per unit.
    """
    device = next((local_tensor(g).device for grads in unit_grads for g in grads), torch.device("cpu"))
    sharded_sums = torch.zeros(len(unit_grads), dtype=torch.float32, device=device)
    whole_sums = torch.zeros_like(sharded_sums)  # plain tensors: the same whole gradient on every rank
    mesh_dims: dict[tuple[Any, tuple[int, ...]], None] = {}
    for unit, grads in enumerate(unit_grads):
        for grad in grads:
            local = local_tensor(grad.detach())
            square = torch.linalg.vector_norm(local.float()).to(device) ** 2 if local.numel() else 0.0
            if not isinstance(grad, DTensor):
                whole_sums[unit] += square
                continue
            if any(p.is_partial() for p in grad.placements):
                raise RuntimeError("A gradient still holds partial sums (not reduce-scattered yet); read the "
                                   "gradient norms after the backward's reduction (`on_pre_optimizer_step`).")
            sharded_sums[unit] += square
            mesh_dims[(grad.device_mesh, tuple(i for i, p in enumerate(grad.placements) if p.is_shard()))] = None
    if len(mesh_dims) > 1:
        raise RuntimeError(f"Gradients are sharded over {len(mesh_dims)} different device meshes / placements; "
                           "hf_freeze reads gradient norms under one FSDP2 mesh only.")
    for mesh, sharded in mesh_dims:
        for dim in sharded:
            dist.all_reduce(sharded_sums, group=mesh.get_group(dim))
    return sharded_sums + whole_sums


def is_distributed() -> bool:
    """A process group of more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main_rank() -> bool:
    """Rank 0, or a single process."""
    return not is_distributed() or dist.get_rank() == 0


def all_ranks_agree(*flags: bool, device: torch.device | str = "cpu") -> tuple[bool, ...]:
    """Each flag AND-ed over every rank (one small all-reduce); the flags themselves outside a process group."""
    if not is_distributed():
        return flags
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    values = torch.tensor([1 if flag else 0 for flag in flags], dtype=torch.int32, device=device)
    dist.all_reduce(values, op=dist.ReduceOp.MIN)
    return tuple(bool(v) for v in values.tolist())


def check_same_decision(decision: Any, what: str = "freeze decision") -> Any:
    """Return `decision` when every rank took the same one; raise on every rank otherwise.

    Under FSDP2 each rank computes its own decision from gradient norms that were reduced across ranks, so they
    agree; a disagreement means the ranks' signals diverged and applying any one decision would hide it.

    Raises:
        `RuntimeError`: naming each rank's decision.
    """
    if not is_distributed():
        return decision
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, decision)
    if any(other != gathered[0] for other in gathered[1:]):
        raise RuntimeError(
            f"FSDP ranks disagree on the {what} (rank: decision {dict(enumerate(gathered))}). Every rank must freeze "
            "the same prefix: their signals differ, e.g. a policy that reads a per-rank quantity. Use a gradient or "
            "schedule policy (gradient norms are reduced across ranks), and call freeze_prefix on every rank alike."
        )
    return decision


def rank_memory(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Bytes this rank holds: parameter shards, gradient shards and optimizer state (local shards of DTensors).

    Returns:
        `{"parameter_bytes", "gradient_bytes", "optimizer_bytes"}`.
    """
    from .optim import optimizer_state_bytes

    params = list(model.parameters())
    return {
        "parameter_bytes": _local_bytes(params),
        "gradient_bytes": _local_bytes(p.grad for p in params if p.grad is not None),
        "optimizer_bytes": 0 if optimizer is None else optimizer_state_bytes(optimizer),
    }


def _local_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(local_tensor(t).numel() * t.element_size() for t in tensors)


class StepBytes:
    """Bytes a communication hook counts during the current optimizer step (`pending_bytes`), closed into
    `step_bytes` by `end_step`: the base of this module's `ReduceScatterMeter` and DDP's `AllReduceMeter`."""

    def __init__(self) -> None:
        self.pending_bytes = 0
        self.step_bytes: list[int] = []

    def end_step(self) -> int:
        """Close the current optimizer step; returns the bytes counted during it."""
        sent, self.pending_bytes = self.pending_bytes, 0
        self.step_bytes.append(sent)
        return sent


class ReduceScatterMeter(StepBytes):
    """Counts the bytes FSDP2 reduce-scatters per optimizer step (the gradients of the parameters that train).

    Example:
        ```python
        meter = ReduceScatterMeter()
        meter.attach(model)        # every FSDPModule of a model sharded with fully_shard
        ...                        # forward, backward
        meter.end_step()           # bytes of this step go to meter.step_bytes
        ```
    """

    def __init__(self) -> None:
        super().__init__()
        self.attached_to: nn.Module | None = None

    def attach(self, model: nn.Module) -> None:
        """Count the reduce-scatters of every FSDP2 module of `model` (from their next backward)."""
        comm = _counting_reduce_scatter(self)
        for module in model.modules():
            if isinstance(module, FSDPModule):
                try:
                    module.set_custom_reduce_scatter(comm)
                except ValueError:  # several parameter groups (per-parameter meshes): left uncounted
                    logger.debug("hf_freeze: reduce-scatters of %s not counted.", type(module).__name__)
        self.attached_to = model


def _counting_reduce_scatter(meter: ReduceScatterMeter):
    """FSDP2's default reduce-scatter, counting the bytes of each input (the unsharded gradients). Built on first use:
    the default class lives in a private torch module."""
    from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultReduceScatter

    class CountingReduceScatter(DefaultReduceScatter):
        def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
            meter.pending_bytes += input_tensor.numel() * input_tensor.element_size()
            return super().__call__(output_tensor, input_tensor, group, op, async_op)

    return CountingReduceScatter()
