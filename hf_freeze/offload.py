"""Models spread with `device_map`, and moving the frozen prefix off the accelerators.

- `check_trainable_placement`: a parameter that trains must live on a device; one Accelerate offloaded (it sits
  on `meta` and its hook loads it for each forward, from CPU or disk) would never be updated, so it is refused.
- `offload_frozen_blocks`: once blocks are frozen they never change, so their weights can leave the accelerator:
  Accelerate's `cpu_offload` / `disk_offload` hooks put them on `meta` and load them back only for the forwards
  that still run them (cache misses, evaluation without the cache). The embeddings stay: they run every step.
- `onload_frozen_blocks` undoes it (before serving); `materialized_state_dict` gives the real weights for saving.

Fingerprints of offloaded weights are read from the hooks' weights maps (`fingerprint.py`), so the cache and
checkpoints see the same prefix before and after the move.
"""

from __future__ import annotations

import logging
import os

import torch
from accelerate.hooks import AlignDevicesHook, add_hook_to_module, attach_align_device_hook, remove_hook_from_module
from accelerate.utils import OffloadedWeightsLoader, offload_state_dict, set_module_tensor_to_device
from torch import nn

from .config import OFFLOAD_TARGETS
from .fingerprint import _materialized
from .layout import BlockLayout, execution_device

logger = logging.getLogger(__name__)

_OFFLOADED_ATTR = "_hf_freeze_offloaded"


def check_trainable_placement(model: nn.Module) -> None:
    """Refuse a model whose trainable parameters Accelerate offloaded (to CPU or disk).

    Raises:
        `ValueError`: naming the offloaded trainable parameters, the device map entry, and the fixes.
    """
    offloaded = [name for name, p in model.named_parameters() if p.requires_grad and p.device.type == "meta"]
    if not offloaded:
        return
    device_map = getattr(model, "hf_device_map", None) or {}
    where = {k: v for k, v in device_map.items() if any(n == k or n.startswith(k + ".") for n in offloaded)}
    raise ValueError(
        f"{len(offloaded)} trainable parameters (e.g. {offloaded[0]}) are offloaded by Accelerate (device map "
        f"entries {where or 'unknown'}); their hooks reload them for each forward, so training would never update "
        "them. Put the blocks that train on a GPU or on 'cpu' in `device_map` (offload only the front blocks), or "
        "freeze the offloaded blocks before training (`FreezeConfig(policy='fixed', boundary=k)` or "
        "`freeze_prefix(model, k)`)."
    )


def offload_frozen_blocks(model: nn.Module, layout: BlockLayout, boundary: int, target: str,
                          offload_dir: str | None = None) -> dict[str, int]:
    """Move the weights of frozen blocks `[0, boundary)` off their device with Accelerate's offload hooks.

    Blocks already offloaded (by an earlier call or by the user's `device_map`) are left alone.

    Args:
        model: the model (the offloaded blocks are remembered on it for `onload_frozen_blocks`).
        layout: its `BlockLayout`.
        boundary: blocks `[0, boundary)` are frozen.
        target (`str`): `"cpu"` (weights kept in CPU memory) or `"disk"` (memory-mapped files in `offload_dir`).
        offload_dir (`str`, *optional*): folder for `"disk"`; one sub-folder per block.

    Returns:
        `{"offloaded_bytes": ..., "accelerator_bytes_freed": ...}`: bytes of the weights moved, and of those that
        were on an accelerator (not the CPU).

    Example:
        ```python
        freeze_prefix(model, 4)
        offload_frozen_blocks(model, get_layout(model), 4, "cpu")
        ```
    """
    if target not in OFFLOAD_TARGETS[1:]:
        raise ValueError(f"`target` must be one of {list(OFFLOAD_TARGETS[1:])}, got {target!r}.")
    if target == "disk" and not offload_dir:
        raise ValueError("Offloading the frozen blocks to disk needs a folder: set `offload_dir`.")
    done: dict[int, tuple[nn.Module, torch.device]] = model.__dict__.setdefault(_OFFLOADED_ATTR, {})
    moved = freed = 0
    for index in range(boundary):
        block = layout.blocks[index]
        tensors = list(block.parameters())
        if index in done or any(t.device.type == "meta" for t in tensors):
            continue
        device = execution_device(block)
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        if target == "cpu":
            weights = {name: tensor.detach().to("cpu") for name, tensor in block.state_dict().items()}
        else:
            folder = os.path.join(offload_dir, f"block{index}")
            offload_state_dict(folder, block.state_dict())
            weights = OffloadedWeightsLoader(save_folder=folder)
        # Replace the dispatch hook (if any). The block's own hook keeps its execution device (where the states that
        # replace it are injected) and moves inputs there; the submodules' hooks load their weights for a forward.
        remove_hook_from_module(block, recurse=True)
        add_hook_to_module(block, AlignDevicesHook(execution_device=device, io_same_device=True))
        attach_align_device_hook(block, execution_device=device, offload=True, weights_map=weights)
        done[index] = (block, device)
        moved += nbytes
        freed += nbytes if device.type != "cpu" else 0
    if moved:
        logger.info("hf_freeze: moved %.1f MB of frozen block weights to %s (%.1f MB off the accelerators).",
                    moved / 2**20, target, freed / 2**20)
    if freed and torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"offloaded_bytes": moved, "accelerator_bytes_freed": freed}


def onload_frozen_blocks(model: nn.Module) -> int:
    """Bring the blocks `offload_frozen_blocks` moved back onto their execution devices and drop its hooks.

    Returns:
        The number of blocks brought back.
    """
    done: dict[int, tuple[nn.Module, torch.device]] = model.__dict__.pop(_OFFLOADED_ATTR, {})
    for block, device in done.values():
        values = {name: tensor for name, tensor in _materialized_items(block)}
        remove_hook_from_module(block, recurse=True)
        for name, value in values.items():
            set_module_tensor_to_device(block, name, device, value=value)
    return len(done)


def offloaded_blocks(model: nn.Module) -> list[int]:
    """Indices of the blocks `offload_frozen_blocks` moved off their device."""
    return sorted(model.__dict__.get(_OFFLOADED_ATTR, {}))


def materialized_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """`model.state_dict()` with offloaded (`meta`) tensors replaced by their values from Accelerate's hooks."""
    return dict(_materialized_items(model))


def _materialized_items(module: nn.Module):
    owners = dict(module.named_modules())
    for name, tensor in module.state_dict(keep_vars=True).items():
        owner_name, _, local = name.rpartition(".")
        yield name, _materialized(owners[owner_name], local, tensor).detach()
