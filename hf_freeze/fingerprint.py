"""Fingerprints of the frozen prefix: one streaming hash per unit, chained over units.

Unit 0 is the embeddings, unit `i + 1` is block `i` (see `BlockLayout.unit_modules`). Each unit's digest hashes
its tensors one at a time (name relative to the unit's module, dtype, shape, bytes), so a prefix of several GB is
read once, one tensor at a time, and never copied whole. The prefix fingerprint at boundary `k` chains the digests
of units `0..k`: `chain(k) = H(chain(k - 1) || digest(k))`. The same code fingerprints the prefix for the cache
(which also mixes in a description of the model) and for suffix-only checkpoints (which bind to the base's prefix).

Digests of *frozen* units are remembered, in this module (a `WeakKeyDictionary` keyed by the model, nothing on the
model object), together with a *stamp* of the tensors they describe: for each tensor its identity, storage address,
shape, dtype, device and autograd version counter. A remembered digest is used only while the unit's stamp is
unchanged, so any change to its weights invalidates it:
- every in-place write (`copy_`, `add_`, an optimizer step, `load_state_dict`, which copies in place under
  `no_grad`) bumps the tensor's version counter;
- a replaced tensor (`load_state_dict(assign=True)`, a new `nn.Parameter`, a swapped submodule) is another object;
- `param.data = other` points the same object at another storage: another address.
Writes *through* `.data` (`param.data.copy_(x)`) bypass the version counter and are not seen: call
`forget_digests(model)` after one.
Under FSDP2, hashing a sharded unit gathers it (a collective every rank must call alike): the ranks agree, with one
small all-reduce, on which remembered digests still hold, and recompute a unit when any rank's stamp changed.
Digests of trainable units are always recomputed. Parameters that Accelerate offloaded (they sit on the `meta`
device until their hook loads them) are read from the hook's weights map and stamped by its in-memory tensor (CPU
offload) or by their file entry (disk offload, written once by Accelerate and never changed by training).
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .fsdp import DTensor, all_ranks_agree, full_tensor, is_distributed, is_fsdp2
from .layout import BlockLayout

_DIGEST_SIZE = 16


@dataclass
class _Remembered:
    """A digest (or chained fingerprint) and the stamp of the tensors it was computed from."""

    stamp: tuple
    refs: list[weakref.ref]  # the stamped tensors: a dead one means its id (in the stamp) may now name another
    value: str

    def holds(self, stamp: tuple) -> bool:
        return stamp == self.stamp and all(ref() is not None for ref in self.refs)


@dataclass
class _Memo:
    units: dict[int, _Remembered] = field(default_factory=dict)
    chains: dict[tuple[str, int], _Remembered] = field(default_factory=dict)


_MEMOS: weakref.WeakKeyDictionary[nn.Module, _Memo] = weakref.WeakKeyDictionary()


def tensor_bytes_digest(hasher: hashlib._Hash, tensor: torch.Tensor) -> None:
    """Feed one tensor (dtype, shape, raw bytes) into `hasher`, moving it to the CPU alone if needed. A tensor sharded
    by FSDP2 is gathered whole first (a collective), so every rank and an unsharded copy hash the same bytes."""
    tensor = full_tensor(tensor.detach())
    hasher.update(str(tensor.dtype).encode())
    hasher.update(str(tuple(tensor.shape)).encode())
    if tensor.numel() == 0:
        return
    data = tensor.to("cpu").contiguous()
    if data.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr():
        data = data.clone()  # `.numpy()` pins a storage's size, and FSDP2 frees and refills its gathered parameters'
    hasher.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())


def unit_digest(layout: BlockLayout, unit: int) -> str:
    """Hash of the parameters and persistent buffers of one unit (0 = embeddings, `i + 1` = block `i`)."""
    hasher = hashlib.blake2b(digest_size=_DIGEST_SIZE)
    for position, module in enumerate(layout.unit_modules(unit)):
        for name, tensor in _unit_tensors(module):
            hasher.update(f"{position}:{name}".encode())
            tensor_bytes_digest(hasher, tensor)
    return hasher.hexdigest()


def unit_digests(model: nn.Module, layout: BlockLayout, upto_boundary: int, *, frozen_boundary: int | None = None
                 ) -> list[str]:
    """Digests of units `0..upto_boundary` (embeddings and blocks `[0, upto_boundary)`).

    Digests of units inside `frozen_boundary` are remembered while their weights are unchanged (see the module
    docstring); the others are always recomputed.
    """
    memo = _MEMOS.setdefault(model, _Memo())
    frozen_units = min(upto_boundary, -1 if frozen_boundary is None else frozen_boundary)  # 0..frozen_units frozen
    stamps = [unit_stamp(layout, unit) for unit in range(frozen_units + 1)]
    holds = [memo.units.get(unit) is not None and memo.units[unit].holds(stamp)
             for unit, (stamp, _) in enumerate(stamps)]
    if holds and _sharded(model):
        # Hashing a sharded unit gathers it (collectives): every rank must hash the same units, but whether a
        # stamp still holds may differ per rank (an unsharded copy's address is the allocator's choice).
        holds = list(all_ranks_agree(*holds))
    digests = []
    for unit in range(upto_boundary + 1):
        if unit > frozen_units:
            digests.append(unit_digest(layout, unit))
            continue
        if not holds[unit]:
            stamp, refs = stamps[unit]
            memo.units[unit] = _Remembered(stamp, refs, unit_digest(layout, unit))
        digests.append(memo.units[unit].value)
    return digests


def _sharded(model: nn.Module) -> bool:
    """Whether `model` is sharded by FSDP2 across several ranks (its digests then take collectives)."""
    return is_distributed() and is_fsdp2(model)


def unit_stamp(layout: BlockLayout, unit: int) -> tuple[tuple, list[weakref.ref]]:
    """What changes whenever a tensor of `unit` changes (identity, storage address, shape, dtype, device, version
    counter), without reading the values; and weak references to those tensors."""
    stamp: list[Any] = []
    refs: list[weakref.ref] = []
    for position, module in enumerate(layout.unit_modules(unit)):
        for owner, name, tensor in _unit_tensor_owners(module):
            if tensor.device.type == "meta":
                tensor = _offloaded_stamp_tensor(owner, name.rpartition(".")[2], tensor)
                if not isinstance(tensor, torch.Tensor):  # disk offload: the loader's file entry, written once
                    loader, key = tensor
                    refs.append(weakref.ref(loader))
                    stamp.append((position, name, "disk", id(loader), key))
                    continue
            refs.append(weakref.ref(tensor))
            stamp.append((position, name, id(tensor), _storage_address(tensor), tensor._version, tuple(tensor.shape),
                          tensor.dtype, tensor.device))
    return tuple(stamp), refs


def _storage_address(tensor: torch.Tensor) -> int:
    """Where `tensor`'s values live: for a DTensor sharded by FSDP2 (whose own `data_ptr()` is 0), its local shard's.
    The DTensor itself is stamped by identity and version: FSDP2 keeps the one sharded parameter for the whole run,
    and its version counter moves with every in-place write (an optimizer step), while the local shard that
    `to_local()` returns is a new object at each call."""
    if isinstance(tensor, DTensor):
        with torch.no_grad():
            return tensor.to_local().data_ptr()
    return tensor.data_ptr()


def chain_digests(digests: list[str], seed: str = "") -> str:
    """`H(... H(H(seed || d0) || d1) ... || dk)`: the fingerprint of a prefix from its unit digests."""
    chained = seed
    for digest in digests:
        chained = hashlib.blake2b(f"{chained}|{digest}".encode(), digest_size=_DIGEST_SIZE).hexdigest()
    return chained


def prefix_fingerprint(
    model: nn.Module, layout: BlockLayout, boundary: int, *, seed: str = "", frozen_boundary: int | None = None
) -> str:
    """Chained fingerprint of the embeddings and blocks `[0, boundary)` of `model`.

    Args:
        model: the model that owns `layout`.
        layout: its `BlockLayout`.
        boundary: `0` (embeddings only) to `layout.num_blocks`.
        seed: mixed in first (the cache passes a description of the model; checkpoints pass nothing).
        frozen_boundary: units up to this boundary are frozen and their digests may be remembered.
    """
    if not 0 <= boundary <= layout.num_blocks:
        raise ValueError(f"A prefix fingerprint needs 0 <= boundary <= {layout.num_blocks}, got {boundary}.")
    frozen = frozen_boundary is not None and boundary <= frozen_boundary
    if not frozen or _sharded(model):  # under FSDP2 the ranks agree on what is remembered in `unit_digests`
        return chain_digests(unit_digests(model, layout, boundary, frozen_boundary=frozen_boundary), seed)
    # The cache asks once per batch: chain a frozen prefix once while its weights stay the same.
    stamps = [unit_stamp(layout, unit) for unit in range(boundary + 1)]
    stamp = tuple(s for s, _ in stamps)
    memo = _MEMOS.setdefault(model, _Memo())
    remembered = memo.chains.get((seed, boundary))
    if remembered is None or not remembered.holds(stamp):
        fingerprint = chain_digests(unit_digests(model, layout, boundary, frozen_boundary=frozen_boundary), seed)
        remembered = memo.chains[(seed, boundary)] = _Remembered(stamp, [r for _, refs in stamps for r in refs],
                                                                 fingerprint)
    return remembered.value


def prefix_fingerprints(
    model: nn.Module, layout: BlockLayout, boundaries: Iterable[int], *, seed: str = "",
    frozen_boundary: int | None = None,
) -> dict[int, str]:
    """`prefix_fingerprint` of several boundaries, from one pass over the units up to the largest."""
    wanted = sorted(set(boundaries))
    if not wanted:
        return {}
    if not 0 <= wanted[0] <= wanted[-1] <= layout.num_blocks:
        raise ValueError(f"A prefix fingerprint needs 0 <= boundary <= {layout.num_blocks}, got {wanted}.")
    fingerprints = {}
    chained = seed
    for unit, digest in enumerate(unit_digests(model, layout, wanted[-1], frozen_boundary=frozen_boundary)):
        chained = chain_digests([digest], chained)
        if unit in wanted:
            fingerprints[unit] = chained
    return fingerprints


def forget_digests(model: nn.Module) -> None:
    """Drop what is remembered about `model`'s weights. Needed only after a write through `.data` (which the
    version counters do not see); `unfreeze` calls it to free the memory."""
    _MEMOS.pop(model, None)


def _unit_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Parameters and persistent buffers of `module`, by name relative to it; offloaded ones from their hook."""
    for owner, full_name, tensor in _unit_tensor_owners(module):
        yield full_name, _materialized(owner, full_name.rpartition(".")[2], tensor)


def _unit_tensor_owners(module: nn.Module) -> Iterator[tuple[nn.Module, str, torch.Tensor]]:
    """(owning module, name relative to `module`, tensor) of its parameters and persistent buffers, each once."""
    seen: set[int] = set()
    for owner_name, owner in module.named_modules():
        local = {name: p for name, p in owner.named_parameters(recurse=False)}
        non_persistent = getattr(owner, "_non_persistent_buffers_set", set())
        local.update({name: b for name, b in owner.named_buffers(recurse=False) if name not in non_persistent})
        for name, tensor in sorted(local.items()):
            if tensor is None or id(tensor) in seen:
                continue
            seen.add(id(tensor))
            yield owner, (f"{owner_name}.{name}" if owner_name else name), tensor


def _offloaded_stamp_tensor(owner: nn.Module, name: str, tensor: torch.Tensor) -> Any:
    """What stands for an offloaded (`meta`) tensor in a stamp: the hook's in-memory tensor (CPU offload), or the
    file entry it is read from (disk offload), or the meta tensor itself when no hook holds it."""
    weights_map = getattr(getattr(owner, "_hf_hook", None), "weights_map", None)
    if weights_map is None:
        return tensor
    dataset, prefix = getattr(weights_map, "dataset", weights_map), getattr(weights_map, "prefix", "")
    key = prefix + name
    in_memory = getattr(dataset, "state_dict", dataset)
    if isinstance(in_memory, dict) and isinstance(in_memory.get(key), torch.Tensor):
        return in_memory[key]
    index = getattr(dataset, "index", None)
    if isinstance(index, dict) and key in index:
        return dataset, key
    return tensor


def _materialized(owner: nn.Module, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """The real values of `tensor`: itself, or, when Accelerate offloaded it to `meta`, its entry in the hook's
    weights map (CPU or disk)."""
    if tensor.device.type != "meta":
        return tensor
    hook = getattr(owner, "_hf_hook", None)
    weights_map = getattr(hook, "weights_map", None)
    if weights_map is not None and name in weights_map:
        return weights_map[name]
    raise ValueError(
        f"Cannot fingerprint `{name}` of {type(owner).__name__}: it is on the `meta` device and no Accelerate "
        "offload hook holds its values. Load the model's weights (or dispatch it with `device_map`) first."
    )
