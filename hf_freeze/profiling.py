"""Measure what freezing saves: bytes of activations kept for backward, and optimizer state bytes."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .optim import optimizer_state_bytes

__all__ = ["SavedTensorBytes", "count_saved_tensor_bytes", "optimizer_state_bytes"]


@dataclass
class SavedTensorBytes:
    """Running total of the bytes autograd saved for backward inside `count_saved_tensor_bytes()`."""

    total: int = 0


@contextlib.contextmanager
def count_saved_tensor_bytes() -> Iterator[SavedTensorBytes]:
    """Count the bytes of every tensor autograd saves for backward while the context is open.

    Example:
        ```python
        with count_saved_tensor_bytes() as saved:
            loss = model(**batch).loss
        print(saved.total)
        ```
    """
    counter = SavedTensorBytes()

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        counter.total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield counter
