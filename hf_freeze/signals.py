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
    """
    norms: list[float | None] = [None] * units_of(boundary)
    for unit in range(units_of(boundary), layout.num_units):
        grads = [p.grad for m in layout.unit_modules(unit) for p in m.parameters() if p.grad is not None]
        if not grads:
            norms.append(0.0)
            continue
        per_tensor = [torch.linalg.vector_norm(g.detach().float()).cpu() for g in grads]
        norms.append(float(torch.linalg.vector_norm(torch.stack(per_tensor))))
    return norms
