"""KV caches whose leading layers live elsewhere: the shared prefix's cache holds them, the suffix's skips them.

A decoding batch runs the base's frozen layers once for every row (with one cache), then each model's own layers
(with another). Each model's forward still builds its masks and positions from `past_key_values`, so the layers it
does not run are `SkippedLayer`s that report the batch's sequence length (`Clock.past`) and refuse updates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .requests import ServingError


@dataclass
class Clock:
    """Tokens already in the KV caches of one decoding batch (shared by its `SkippedLayer`s)."""

    past: int = 0


class SkippedLayer(DynamicLayer):
    """KV-cache layer of a block that another forward runs: reports the sequence length (so masks and positions
    are built as usual) and refuses updates."""

    def __init__(self, clock: Clock) -> None:
        super().__init__()
        self.clock = clock

    def get_seq_length(self) -> int:
        return self.clock.past

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.clock.past + query_length, 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        raise RuntimeError("A block whose KV cache lives in the shared prefix ran in a suffix forward.")


def partial_cache(model: nn.Module, num_blocks: int, skipped: int, clock: Clock) -> DynamicCache:
    """A `DynamicCache` for `model` whose layers `[0, skipped)` are `SkippedLayer`s.

    Raises:
        `ServingError`: the model's cache has layers other than full attention (sliding windows, ...).
    """
    cache = DynamicCache(config=model.config)
    while len(cache.layers) < num_blocks:
        cache.layers.append(DynamicLayer())
    kinds = {type(layer).__name__ for layer in cache.layers}
    if any(type(layer) is not DynamicLayer for layer in cache.layers):
        raise ServingError(f"Generation through a shared prefix needs full-attention KV caches; "
                           f"{type(model).__name__} uses {sorted(kinds)}.")
    for i in range(skipped):
        cache.layers[i] = SkippedLayer(clock)
    return cache


def fill_layer(layer: DynamicLayer, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Give an empty cache layer these keys and values (`[rows, heads, tokens, head_dim]`)."""
    layer.update(keys, values)
