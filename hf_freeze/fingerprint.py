"""Fingerprints of the frozen prefix: one streaming hash per unit, chained over units.

Unit 0 is the embeddings, unit `i + 1` is block `i` (see `BlockLayout.unit_modules`). Each unit's digest hashes
its tensors one at a time (name relative to the unit's module, dtype, shape, bytes), so a prefix of several GB is
read once, one tensor at a time, and never copied whole. The prefix fingerprint at boundary `k` chains the digests
of units `0..k`: `chain(k) = H(chain(k - 1) || digest(k))`. The same code fingerprints the prefix for the cache
(which also mixes in a description of the model) and for suffix-only checkpoints (which bind to the base's prefix).

Digests of *frozen* units are remembered on the model (a frozen unit never changes) and forgotten by
`freeze.unfreeze`; digests of trainable units are always recomputed. Parameters that Accelerate offloaded (they sit
on the `meta` device until their hook loads them) are read from the hook's weights map.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch
from torch import nn

from .fsdp import full_tensor
from .layout import BlockLayout

_DIGEST_SIZE = 16
_MEMO_ATTR = "_hf_freeze_unit_digests"


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

    Units inside `frozen_boundary` (frozen, so unchanging) are remembered on `model`; `forget_digests` clears them.
    """
    memo: dict = model.__dict__.setdefault(_MEMO_ATTR, {})
    frozen_units = -1 if frozen_boundary is None else frozen_boundary  # units 0..frozen_boundary are frozen
    digests = []
    for unit in range(upto_boundary + 1):
        if unit <= frozen_units and unit in memo:
            digests.append(memo[unit])
            continue
        digest = unit_digest(layout, unit)
        if unit <= frozen_units:
            memo[unit] = digest
        digests.append(digest)
    return digests


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
    memo: dict = model.__dict__.setdefault(_MEMO_ATTR, {})
    key = ("chain", seed, boundary)
    if frozen and key in memo:  # the cache asks for every example it reads or stores: chain a frozen prefix once
        return memo[key]
    fingerprint = chain_digests(unit_digests(model, layout, boundary, frozen_boundary=frozen_boundary), seed)
    if frozen:
        memo[key] = fingerprint
    return fingerprint


def forget_digests(model: nn.Module) -> None:
    """Drop the remembered digests of `model` (its prefix was unfrozen and may change)."""
    model.__dict__.pop(_MEMO_ATTR, None)


def _unit_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Parameters and persistent buffers of `module`, by name relative to it; offloaded ones from their hook."""
    seen: set[int] = set()
    for owner_name, owner in module.named_modules():
        local = {name: p for name, p in owner.named_parameters(recurse=False)}
        non_persistent = getattr(owner, "_non_persistent_buffers_set", set())
        local.update({name: b for name, b in owner.named_buffers(recurse=False) if name not in non_persistent})
        for name, tensor in sorted(local.items()):
            if tensor is None or id(tensor) in seen:
                continue
            seen.add(id(tensor))
            full_name = f"{owner_name}.{name}" if owner_name else name
            yield full_name, _materialized(owner, name, tensor)


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
