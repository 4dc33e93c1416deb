"""Per-unit signals a policy reads: gradient norms of the embeddings and of each block."""

from __future__ import annotations

import torch

from .layout import BlockLayout
from .policy import units_of


@torch.no_grad()
def unit_gradient_norms(layout: BlockLayout, boundary: int | None) -> list[float | None]:
    """L2 norm of the gradients of each unit (embeddings, block 0, ...); `None` for frozen units.

    Call it where gradients are final: after unscaling and the data-parallel all-reduce, which is
    `TrainerCallback.on_pre_optimizer_step`. Every rank then sees the same numbers.

    Raises:
        `RuntimeError`: no active unit has any gradient although some of their parameters train (gradients that
            live elsewhere, as under DeepSpeed ZeRO, or no backward yet): reading them as 0.0 would make a
            gradient policy freeze everything it may.
    """
    norms: list[float | None] = [None] * units_of(boundary)
    trainable = False
    for unit in range(units_of(boundary), layout.num_units):
        params = [p for m in layout.unit_modules(unit) for p in m.parameters()]
        trainable = trainable or any(p.requires_grad for p in params)
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            norms.append(0.0)
            continue
        per_tensor = [torch.linalg.vector_norm(g.detach().float()).cpu() for g in grads]
        norms.append(float(torch.linalg.vector_norm(torch.stack(per_tensor))))
    if trainable and all(n == 0.0 for n in norms[units_of(boundary):]) and not _any_grad(layout, boundary):
        raise RuntimeError(
            "No active block has a gradient (every `p.grad` is None) where hf_freeze reads them. Gradients sharded "
            "away from `p.grad` (DeepSpeed ZeRO, FSDP) are not supported: use DDP, or a policy that reads no "
            "gradients (`policy='schedule'` or `'fixed'`)."
        )
    return norms


def _any_grad(layout: BlockLayout, boundary: int | None) -> bool:
    return any(p.grad is not None for u in range(units_of(boundary), layout.num_units)
               for m in layout.unit_modules(u) for p in m.parameters())
