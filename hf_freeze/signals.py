"""Per-unit signals a policy reads: gradient norms of the embeddings and of each block."""

from __future__ import annotations

import torch

from .fsdp import DTensor, sharded_square_sums
from .layout import BlockLayout
from .policy import units_of


@torch.no_grad()
def unit_gradient_norms(layout: BlockLayout, boundary: int | None) -> list[float | None]:
    """L2 norm of the gradients of each unit (embeddings, block 0, ...); `None` for frozen units.

    Call it where gradients are final: after unscaling and the data-parallel all-reduce (or FSDP2's
    reduce-scatter), which is `TrainerCallback.on_pre_optimizer_step`. Every rank then sees the same numbers: under
    FSDP2 each rank holds a shard of each gradient, and the per-unit sums of squares are all-reduced (a collective,
    so every rank must call this at the same step).

    Raises:
        `RuntimeError`: no active unit has any gradient although some of their parameters train (gradients that
            live elsewhere, as under DeepSpeed ZeRO, or no backward yet): reading them as 0.0 would make a
            gradient policy freeze everything it may.
    """
    frozen = units_of(boundary)
    trainable = False
    unit_grads: list[list[torch.Tensor]] = []
    for unit in range(frozen, layout.num_units):
        params = [p for m in layout.unit_modules(unit) for p in m.parameters()]
        trainable = trainable or any(p.requires_grad for p in params)
        unit_grads.append([p.grad for p in params if p.grad is not None])
    if trainable and not any(unit_grads):
        raise RuntimeError(
            "No active block has a gradient (every `p.grad` is None) where hf_freeze reads them. Gradients kept "
            "away from `p.grad` (DeepSpeed ZeRO, FSDP1) are not supported: use DDP or FSDP2, or a policy that reads "
            "no gradients (`policy='schedule'` or `'fixed'`)."
        )
    if any(isinstance(g, DTensor) for grads in unit_grads for g in grads):
        # FSDP2: each rank holds a shard of every gradient; the sums of squares are reduced across ranks
        values = sharded_square_sums(unit_grads).sqrt().tolist()
        return [None] * frozen + [v if grads else 0.0 for v, grads in zip(values, unit_grads)]
    unit_norms: list[torch.Tensor | None] = []  # on the gradients' devices: read back once, not once per tensor
    for grads in unit_grads:
        if not grads:
            unit_norms.append(None)
            continue
        device = grads[0].device
        per_tensor = torch.stack([torch.linalg.vector_norm(g.detach().float()).to(device) for g in grads])
        unit_norms.append(torch.linalg.vector_norm(per_tensor))
    measured = [n for n in unit_norms if n is not None]
    values = iter(torch.stack([n.to(measured[0].device) for n in measured]).tolist() if measured else [])
    return [None] * frozen + [0.0 if n is None else next(values) for n in unit_norms]
