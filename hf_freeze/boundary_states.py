"""Boundary states for a whole batch: read from the cache where valid, computed by the prefix runner elsewhere.

For each example of a batch:
- a cache entry at the current boundary `k` is a *hit*, read and re-padded;
- an entry at an older boundary `b < k` is *advanced*: only blocks `[b, k)` run, from the cached states;
- otherwise it is a *miss*: the frozen prefix runs for those examples only.
States are stored unpadded and re-padded into the batch's own padding (zeros at padded positions, which the
model's attention mask keeps out of every real position).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .cache import PrefixCache
from .keys import example_digests
from .layout import execution_device
from .prefix import PrefixRunner


@dataclass
class CacheStats:
    """Counters of cache use since the start of training (logged as `cache/*`)."""

    hits: int = 0
    advanced: int = 0
    misses: int = 0
    stored: int = 0
    not_stored: int = 0
    hit_tokens: int = 0
    read_seconds: float = 0.0
    compute_seconds: float = 0.0
    computed_tokens: int = 0
    seconds_per_token: dict[int, float] = field(default_factory=dict)  # frozen-prefix cost by boundary

    def saved_seconds(self) -> float:
        """Estimated prefix compute time the hits avoided, net of the time spent reading them."""
        cost = max(self.seconds_per_token.values(), default=0.0)
        return max(self.hit_tokens * cost - self.read_seconds, 0.0)

    def as_logs(self, cache: PrefixCache) -> dict[str, float]:
        return {
            "cache/hits": float(self.hits),
            "cache/advanced": float(self.advanced),
            "cache/misses": float(self.misses),
            "cache/entries": float(len(cache)),
            "cache/bytes": float(cache.nbytes),
            "cache/saved_seconds": round(self.saved_seconds(), 3),
        }


class BoundaryStates:
    """Produces the padded `[batch, seq, hidden]` boundary states of a batch.

    Args:
        runner (`PrefixRunner`): runs the frozen prefix.
        cache (`PrefixCache`): stores per-example states.
        label_names (`Iterable[str]`): batch entries that are targets, not model inputs of the prefix.
    """

    def __init__(self, runner: PrefixRunner, cache: PrefixCache, label_names: Iterable[str]) -> None:
        self.runner = runner
        self.cache = cache
        self.label_names = set(label_names) | {"labels", "label", "label_ids"}
        self.stats = CacheStats()
        self.state_dtype: torch.dtype | None = None

    def states_for(
        self, inputs: Mapping[str, Any], keys: torch.Tensor, boundary: int, *, store: bool = True
    ) -> torch.Tensor:
        """The batch's states at `boundary`; computed entries are stored when `store` is set."""
        model_inputs = {k: v for k, v in inputs.items() if k not in self.label_names}
        digests = example_digests(model_inputs, exclude=())
        real = _real_positions(model_inputs)
        device = execution_device(self.runner.layout.blocks[boundary - 1])
        per_example: list[torch.Tensor | None] = [None] * len(digests)
        to_advance: dict[int, list[int]] = defaultdict(list)
        missing: list[int] = []

        started = time.perf_counter()
        for i, (key, digest) in enumerate(zip(keys.tolist(), digests)):
            entry = self.cache.get(key, digest, boundary)
            if entry is None:
                missing.append(i)
            elif entry.boundary == boundary:
                per_example[i] = entry.states
                self.stats.hits += 1
                self.stats.hit_tokens += entry.states.shape[0]
            else:
                per_example[i] = entry.states
                to_advance[entry.boundary].append(i)
        self.stats.read_seconds += time.perf_counter() - started

        for start_boundary, rows in sorted(to_advance.items()):
            start = _pad([per_example[i] for i in rows], real[rows], self._dtype(boundary), device)
            states = self.runner.boundary_states(_rows(model_inputs, rows), boundary, start=(start_boundary, start))
            self._keep(per_example, rows, states, real, keys, digests, boundary, store)
            self.stats.advanced += len(rows)
        if missing:
            started = time.perf_counter()
            states = self.runner.boundary_states(_rows(model_inputs, missing), boundary)
            elapsed = time.perf_counter() - started
            tokens = int(real[missing].sum())
            self.stats.compute_seconds += elapsed
            self.stats.computed_tokens += tokens
            self.stats.seconds_per_token[boundary] = elapsed / max(tokens, 1)
            self._keep(per_example, missing, states, real, keys, digests, boundary, store)
            self.stats.misses += len(missing)

        started = time.perf_counter()
        padded = _pad(per_example, real, self._dtype(boundary), device)
        self.stats.read_seconds += time.perf_counter() - started
        return padded

    def read_cost_per_token(self, keys: torch.Tensor, inputs: Mapping[str, Any], boundary: int) -> float | None:
        """Time to read and re-pad this batch's cached entries, per token; `None` when they are not all cached."""
        model_inputs = {k: v for k, v in inputs.items() if k not in self.label_names}
        digests = example_digests(model_inputs, exclude=())
        real = _real_positions(model_inputs)
        started = time.perf_counter()
        entries = [self.cache.get(k, d, boundary) for k, d in zip(keys.tolist(), digests)]
        if any(e is None or e.boundary != boundary for e in entries):
            return None
        _pad([e.states for e in entries], real, self._dtype(boundary), execution_device(self.runner.layout.blocks[0]))
        return (time.perf_counter() - started) / max(int(real.sum()), 1)

    def _keep(self, per_example, rows, states, real, keys, digests, boundary, store) -> None:
        self.state_dtype = states.dtype
        states = states.detach()
        for row, i in enumerate(rows):
            per_example[i] = states[row][real[i].to(states.device)]
            if store:
                stored = self.cache.put(int(keys[i]), digests[i], boundary, per_example[i])
                self.stats.stored += stored
                self.stats.not_stored += not stored

    def _dtype(self, boundary: int) -> torch.dtype:
        if self.state_dtype is None:
            self.state_dtype = next(self.runner.layout.blocks[boundary - 1].parameters()).dtype
        return self.state_dtype


def _real_positions(inputs: Mapping[str, Any]) -> torch.Tensor:
    """`[batch, seq]` booleans: True at real (non-padding) tokens."""
    mask = inputs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        return mask.detach().cpu().bool()
    reference = inputs.get("input_ids", inputs.get("inputs_embeds"))
    if not isinstance(reference, torch.Tensor):
        raise ValueError("The prefix cache needs `input_ids` or `inputs_embeds` (and optionally attention_mask).")
    return torch.ones(reference.shape[:2], dtype=torch.bool)


def _rows(inputs: Mapping[str, Any], rows: list[int]) -> dict[str, Any]:
    """The sub-batch of examples `rows` (tensors whose first dimension is the batch are indexed)."""
    batch = _real_positions(inputs).shape[0]
    if rows == list(range(batch)):
        return dict(inputs)
    index = torch.tensor(rows)
    def select(value: Any) -> Any:
        is_batched = isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch
        return value.index_select(0, index.to(value.device)) if is_batched else value

    return {k: select(v) for k, v in inputs.items()}


def _pad(
    per_example: list[torch.Tensor | None], real: torch.Tensor, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Scatter unpadded `[tokens_i, hidden]` states into a zero `[batch, seq, hidden]` tensor at the real positions."""
    hidden = next(s for s in per_example if s is not None).shape[-1]
    out = torch.zeros(*real.shape, hidden, dtype=dtype, device=device)
    out[real.to(device)] = torch.cat([s.to(device, dtype) for s in per_example])  # type: ignore[union-attr]
    return out
