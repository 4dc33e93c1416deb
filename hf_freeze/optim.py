"""Release frozen parameters from an optimizer, and keep its checkpoints loadable.

Frozen parameters leave the optimizer's param groups and their state (AdamW's `exp_avg`, `exp_avg_sq`, `step`) is
freed. The groups themselves stay, so learning-rate schedulers, which hold one learning rate per group, are not
disturbed. `optimizer.state_dict()` still describes the *original* layout (frozen parameters listed, without state)
so that a fresh optimizer built by `Trainer` on resume, which lists every parameter, loads it unchanged; the
callback then re-freezes and prunes again. Under FSDP2 the parameters stay listed and only their state goes
(`torch.distributed.checkpoint` saves optimizer state by parameter name, for the groups as they are).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .fsdp import DTensor, local_tensor

_FULL_GROUPS = "_hf_freeze_full_groups"


def release_parameters(optimizer: torch.optim.Optimizer, params: Iterable[nn.Parameter]) -> int:
    """Remove `params` from `optimizer`'s param groups and drop their state.

    Args:
        optimizer (`torch.optim.Optimizer`): a torch optimizer, or a wrapper with an `.optimizer` attribute
            (Accelerate's `AcceleratedOptimizer`).
        params (`Iterable[nn.Parameter]`): the parameters to release.

    Returns:
        `int`: bytes of optimizer state freed.
    """
    inner = unwrap_optimizer(optimizer)
    params = list(params)
    if any(isinstance(p, DTensor) for p in params):
        # FSDP2: the parameters stay listed (a frozen parameter never gets a gradient again, and torch optimizers
        # skip parameters without one), so the layout that torch.distributed.checkpoint saves and loads by name is
        # unchanged; only their sharded state is dropped.
        return sum(state_bytes(inner.state.pop(p, {})) for p in params)
    _remember_full_layout(inner)
    released = {id(p) for p in params}
    freed = 0
    for group in inner.param_groups:
        kept = [p for p in group["params"] if id(p) not in released]
        if len(kept) != len(group["params"]):
            for p in group["params"]:
                if id(p) in released:
                    freed += state_bytes(inner.state.pop(p, {}))
            group["params"] = kept
    return freed


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the optimizer's per-parameter state tensors."""
    return sum(state_bytes(s) for s in unwrap_optimizer(optimizer).state.values())


def state_bytes(state: dict[str, Any]) -> int:
    """Bytes of one parameter's state tensors on this rank (the local shard of a `DTensor`)."""
    return sum(local_tensor(v).numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))


def unwrap_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside Accelerate's (or another library's) wrapper."""
    while hasattr(optimizer, "optimizer") and isinstance(optimizer.optimizer, torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def _remember_full_layout(optimizer: torch.optim.Optimizer) -> None:
    if hasattr(optimizer, _FULL_GROUPS):
        return
    setattr(optimizer, _FULL_GROUPS, [list(group["params"]) for group in optimizer.param_groups])
    optimizer.register_state_dict_post_hook(_export_full_layout)
    optimizer.register_load_state_dict_pre_hook(_import_full_layout)


def _export_full_layout(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    """Rewrite a pruned state dict as if the released parameters were still listed (with no state)."""
    full_groups = getattr(optimizer, _FULL_GROUPS)
    old_ids = _ids_in_order(group["params"] for group in optimizer.param_groups)
    new_ids = _ids_in_order(full_groups)
    state = {new_ids[key]: state_dict["state"][old] for key, old in old_ids.items() if old in state_dict["state"]}
    groups = []
    for saved, full in zip(state_dict["param_groups"], full_groups):
        groups.append({**saved, "params": [new_ids[id(p)] for p in full]})
        groups[-1].pop("param_names", None)
    return {"state": state, "param_groups": groups}


def _import_full_layout(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    """Load a full-layout state dict into a pruned optimizer by dropping the entries of released parameters."""
    full_groups = getattr(optimizer, _FULL_GROUPS)
    saved_sizes = [len(g["params"]) for g in state_dict["param_groups"]]
    if saved_sizes != [len(g) for g in full_groups]:
        return state_dict  # not our layout; let torch report any mismatch
    saved_ids = {}
    for saved, full in zip(state_dict["param_groups"], full_groups):
        saved_ids.update({id(p): i for p, i in zip(full, saved["params"])})
    current = _ids_in_order(group["params"] for group in optimizer.param_groups)
    saved_state = state_dict["state"]
    state = {new: saved_state[saved_ids[key]] for key, new in current.items() if saved_ids[key] in saved_state}
    groups = []
    for saved, group in zip(state_dict["param_groups"], optimizer.param_groups):
        groups.append({**saved, "params": [current[id(p)] for p in group["params"]]})
    return {"state": state, "param_groups": groups}


def _ids_in_order(groups: Iterable[Iterable[nn.Parameter]]) -> dict[int, int]:
    """The integer ids `Optimizer.state_dict()` assigns: parameters numbered in group order."""
    ids: dict[int, int] = {}
    for group in groups:
        for p in group:
            ids.setdefault(id(p), len(ids))
    return ids
