"""Data parallelism with a growing frozen prefix.

- `check_parallel_mode`: the training modes hf_freeze refuses up front (DeepSpeed, FSDP1, `nn.DataParallel`, DDP
  that would hang after a freeze), each with why and what to use instead; FSDP2 is `fsdp.py`'s.
- `rebuild_ddp`: a new `DistributedDataParallel` over the same module and settings. DDP registers only the
  parameters that require grad when it is built, so after a freeze the rebuilt wrapper all-reduces the active
  parameters only, and `find_unused_parameters` is no longer needed for the frozen ones.
- `AllReduceMeter`: a DDP communication hook that counts the bytes each optimizer step all-reduces.
- `RankStableSampler`: keeps every training example on the same rank for the whole run (shuffled within the rank
  each epoch), so each rank's prefix cache hits from the second epoch on instead of about `1 / world_size`.
- `check_same_boundary`, `check_cache_world`: refuse ranks that disagree, and disk caches written by another
  world size or sharding.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.data import Sampler

from .atomic import write_text_atomic
from .freezing import uses_activation_checkpointing
from .fsdp import StepBytes, check_fsdp

CACHE_WORLD_FILE = "world.json"


class ParallelModeError(ValueError):
    """A distributed or multi-device training mode that hf_freeze cannot freeze under."""


def check_parallel_mode(args: Any, model: nn.Module | None = None, *, rebuilds_ddp: bool) -> None:
    """Refuse, before the first step, the training modes in which freezing a prefix mid-run would go wrong.

    Args:
        args (`TrainingArguments`): the Trainer's arguments.
        model (`nn.Module`, *optional*): the model (to see whether it uses activation checkpointing).
        rebuilds_ddp (`bool`): whether the caller rebuilds the DDP wrapper after each freeze (`FreezeTrainer` does;
            a plain `Trainer` with `FreezeCallback` does not).

    Raises:
        `ParallelModeError`: DeepSpeed, FSDP1, `nn.DataParallel`, or DDP without `find_unused_parameters` where the
            wrapper is not rebuilt.
    """
    if getattr(args, "deepspeed", None) or _env_flag("ACCELERATE_USE_DEEPSPEED"):
        raise ParallelModeError(
            "hf_freeze does not support DeepSpeed: ZeRO builds its partitioned fp32 master weights and optimizer "
            "state from the parameters that require grad when the engine starts, so a block frozen mid-run stays in "
            "them and AdamW's momentum keeps moving it (seen in a 2-rank ZeRO-2 run with deepspeed 0.19.8; DeepSpeed "
            "#2615), and gradients live in ZeRO's partitions "
            "(`p.grad` is None; `deepspeed.utils.safe_get_full_grad`). Use FSDP2 (`fsdp_config={'version': 2}`) or "
            "DDP; or freeze a fixed prefix with `freeze_prefix(model, k)` before the Trainer builds the engine and "
            "train without hf_freeze's callback."
        )
    if check_fsdp(args, model):  # FSDP1 refused; FSDP2 recognised from the model, not the environment
        return  # no DDP wrapper: the checks below are DDP's
    if getattr(args, "n_gpu", 1) > 1 and getattr(args, "world_size", 1) <= 1:
        raise ParallelModeError(
            f"{args.n_gpu} GPUs are visible without a distributed launcher, so Trainer would wrap the model in "
            "`nn.DataParallel`, which copies the prefix cache's full-batch states into every replica. Launch with "
            "`accelerate launch` or `torchrun --nproc_per_node N` (DDP), or make one GPU visible "
            "(`CUDA_VISIBLE_DEVICES=0`)."
        )
    if getattr(args, "world_size", 1) <= 1 or rebuilds_ddp or args.ddp_find_unused_parameters:
        return
    checkpointing = uses_activation_checkpointing(model) or bool(
        getattr(args, "activation_checkpointing", False) or getattr(args, "gradient_checkpointing", False))
    if args.ddp_find_unused_parameters is False or checkpointing:
        raise ParallelModeError(
            "Freezing blocks during a DistributedDataParallel run with a plain Trainer needs "
            "`find_unused_parameters=True` (frozen parameters stop receiving gradients, and the DDP wrapper is not "
            "rebuilt). Set `TrainingArguments(ddp_find_unused_parameters=True)`, or use FreezeTrainer, which rebuilds "
            "DDP over the active blocks after each freeze."
        )


def rebuild_ddp(wrapper: nn.parallel.DistributedDataParallel, *, find_unused_parameters: bool | None = None
                ) -> nn.parallel.DistributedDataParallel:
    """A new `DistributedDataParallel` around `wrapper.module`, with `wrapper`'s settings.

    Its gradient buckets hold only the parameters that require grad now, so after a freeze the frozen prefix is no
    longer all-reduced. Every rank must call it at the same step (it broadcasts rank 0's parameters and buffers).

    Args:
        wrapper: the DDP wrapper in use.
        find_unused_parameters: override the wrapper's setting (default: keep it).

    Returns:
        The new wrapper; the old one must no longer be called.
    """
    kwargs = dict(
        device_ids=wrapper.device_ids,
        output_device=wrapper.output_device,
        find_unused_parameters=wrapper.find_unused_parameters if find_unused_parameters is None
        else find_unused_parameters,
        gradient_as_bucket_view=wrapper.gradient_as_bucket_view,
        static_graph=getattr(wrapper, "static_graph", False),
        process_group=wrapper.process_group,
    )
    if not wrapper.broadcast_buffers:  # passed only when off: torch 2.13 deprecates the argument
        kwargs["broadcast_buffers"] = False
    cap = getattr(wrapper, "bucket_bytes_cap", None)
    if cap:
        kwargs["bucket_cap_mb"] = cap / 2**20
    return nn.parallel.DistributedDataParallel(wrapper.module, **kwargs)


class AllReduceMeter(StepBytes):
    """A DDP communication hook that all-reduces as DDP's default does and counts the bytes sent.

    Example:
        ```python
        meter = AllReduceMeter()
        meter.attach(ddp_model)
        ...  # forward, backward
        meter.end_step()  # bytes of this step go to meter.step_bytes
        ```
    """

    def attach(self, wrapper: nn.parallel.DistributedDataParallel) -> None:
        """Register the hook on a DDP wrapper that has not run a backward yet."""
        wrapper.register_comm_hook(self, _counting_allreduce)


def _counting_allreduce(meter, bucket):  # no annotations: DDP checks them, and they are strings in this module
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    buffer = bucket.buffer()
    meter.pending_bytes += buffer.numel() * buffer.element_size()
    return allreduce_hook(None, bucket)


class RankStableSampler(Sampler[int]):
    """Deals each example to one rank for the whole run; shuffles within the rank every epoch.

    A fixed seeded permutation of the dataset is cut into `num_replicas` interleaved shards of equal length (as
    `DistributedSampler` pads, the first few examples of the permutation repeat when the dataset does not divide
    evenly); epoch `e` yields this rank's shard in a new order drawn from `seed + e`. Every epoch still covers the
    dataset exactly once across ranks (plus that padding), but an example always lands on the same rank, where its
    cached boundary states are.

    Args:
        num_examples (`int`): length of the dataset.
        num_replicas (`int`): world size.
        rank (`int`): this process's rank.
        seed (`int`, defaults to 0): the permutation's seed; the same on every rank.
    """

    def __init__(self, num_examples: int, num_replicas: int, rank: int, seed: int = 0) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"`rank` must be in [0, {num_replicas}), got {rank}.")
        self.num_examples, self.num_replicas, self.rank, self.seed = num_examples, num_replicas, rank, seed
        self.epoch = 0
        self.shard_size = math.ceil(num_examples / num_replicas)
        order = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed)).tolist()
        padded = (order * math.ceil(self.shard_size * num_replicas / max(num_examples, 1)))[
            : self.shard_size * num_replicas]
        self.shard = padded[rank::num_replicas]

    def set_epoch(self, epoch: int) -> None:
        """Called by the Trainer (through Accelerate) before each epoch."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + 1 + self.epoch)
        return iter([self.shard[i] for i in torch.randperm(len(self.shard), generator=generator).tolist()])

    def __len__(self) -> int:
        return self.shard_size


def check_same_boundary(boundary: int | None) -> None:
    """Raise on every rank if the ranks' frozen boundaries differ (they would build different DDP buckets and
    hang or silently train different models). A no-op outside a process group."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, boundary)
    if len(set(gathered)) > 1:
        raise RuntimeError(
            f"Data-parallel ranks disagree on the frozen boundary (rank: boundary {dict(enumerate(gathered))}). "
            "Every rank must freeze the same prefix: let FreezeCallback decide (it applies rank 0's decision "
            "everywhere) rather than calling freeze_prefix on some ranks only."
        )


def check_cache_world(directory: str, world_size: int, rank_stable: bool, *, is_main: bool) -> None:
    """Record, or check, the data-parallel layout a disk cache folder was written with.

    A cache folder holds one sub-folder per rank; which examples a rank holds depends on the world size and on
    the sharding. Reusing it with another layout would silently miss (or, with another sharding, hit 1 time in
    `world_size`), so it is refused.

    Raises:
        `ValueError`: the folder was written with another world size or sharding.
    """
    path = os.path.join(directory, CACHE_WORLD_FILE)
    wanted = {"world_size": world_size, "sharding": "rank_stable" if rank_stable else "per_epoch"}
    if os.path.isfile(path):
        with open(path) as handle:
            found = json.load(handle)
        if found != wanted:
            raise ValueError(
                f"The cache folder {directory} was written by a run with {found}, this run has {wanted}. Each rank "
                "caches the examples it is dealt, so the folder only fits the same layout: point `cache_dir` at a "
                "new folder, or delete this one."
            )
    elif is_main:
        write_text_atomic(path, json.dumps(wanted))


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


class ActiveBlocksDDP:
    """Keeps a Trainer's DDP wrapper built over the active parameters only, and measures what it all-reduces.

    `wrapper_for` is called at every training step with the wrapper the Trainer would use; when the frozen boundary
    has moved since the current wrapper was built, all ranks rebuild it together (`rebuild_ddp`). After the first
    step of a wrapper that has `find_unused_parameters=True`, if every trainable parameter received a gradient on
    every rank, it is rebuilt once more without it (the graph walk is then skipped every step), unless the user
    set `ddp_find_unused_parameters` explicitly. When the Trainer hands it another wrapper than before (a second
    `train()` that wrapped the model again, or `auto_find_batch_size` retrying), it starts over from that one
    instead of keeping the wrapper it built for the previous loop.

    Args:
        keep_find_unused (`bool`): never change `find_unused_parameters` (the user set it).
    """

    def __init__(self, keep_find_unused: bool = False) -> None:
        self.keep_find_unused = keep_find_unused
        self.meter = AllReduceMeter()
        self.wrapper: nn.parallel.DistributedDataParallel | None = None
        self.built_at: int | None | str = "unknown"  # boundary the current wrapper was built at
        self.rebuilds = 0
        self._drop_find_unused = False
        self._probe = False  # look at the gradients after the first step of a wrapper
        self._given: nn.Module | None = None  # the wrapper the Trainer handed last

    def wrapper_for(self, wrapped: nn.Module, boundary: int | None) -> nn.Module:
        """The DDP wrapper to call this step (rebuilt if needed); `wrapped` itself when it is not DDP."""
        if self.wrapper is not None and wrapped is not self._given and wrapped is not self.wrapper:
            # the Trainer wrapped the model again: the wrapper built for its previous loop must not be called
            self.wrapper, self.built_at, self._drop_find_unused, self._probe = None, "unknown", False, False
        self._given = wrapped
        if not isinstance(wrapped, nn.parallel.DistributedDataParallel) and self.wrapper is None:
            return wrapped
        current = self.wrapper if self.wrapper is not None else wrapped
        if self.wrapper is None and self.built_at == "unknown" and boundary is None:
            self.built_at = None
            self.meter.attach(current)
            self._probe = True
        elif boundary != self.built_at or self._drop_find_unused:
            check_same_boundary(boundary)
            current = rebuild_ddp(current, find_unused_parameters=False if self._drop_find_unused else None)
            self.meter.attach(current)
            self.built_at, self._drop_find_unused, self._probe = boundary, False, True
            self.rebuilds += 1
        self.wrapper = current
        return current

    def after_backward(self, sync_step: bool) -> None:
        """Close the optimizer step's byte count; decide whether `find_unused_parameters` can go."""
        if not sync_step or self.wrapper is None:
            return
        self.meter.end_step()
        if not self._probe or self.keep_find_unused or not self.wrapper.find_unused_parameters:
            return
        self._probe = False
        trainable = [p for p in self.wrapper.module.parameters() if p.requires_grad]
        used = torch.tensor(float(all(p.grad is not None for p in trainable)))
        torch.distributed.all_reduce(used, op=torch.distributed.ReduceOp.MIN)
        self._drop_find_unused = bool(used.item())
