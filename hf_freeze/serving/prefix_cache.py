"""An LRU cache of boundary states for repeated inputs, bounded in bytes, with hit and miss counters.

A served input that was seen before at the same boundary of the same base skips the frozen prefix: the entry
holds its unpadded `[tokens, hidden]` states, keyed by `(base fingerprint, boundary, token ids)`.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable

import torch

StateKey = tuple[str, int, tuple[int, ...]]


class StateCache:
    """Least-recently-used boundary states, at most `max_bytes` of tensor data.

    Args:
        max_bytes (`int`): budget for the stored states (keys are not counted); `0` disables the cache.

    Example:
        ```python
        cache = StateCache(64 * 2**20)
        key = ("fingerprint", 4, (101, 2023, 102))
        cache.get(key)                    # None (a miss)
        cache.put(key, torch.zeros(3, 384))
        cache.get(key).shape, cache.hits  # (torch.Size([3, 384]), 1)
        ```
    """

    def __init__(self, max_bytes: int) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"`max_bytes` must be an int >= 0 (0 disables the cache), got {max_bytes!r}.")
        self.max_bytes = max_bytes
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.nbytes = 0
        self._entries: OrderedDict[Hashable, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: StateKey) -> torch.Tensor | None:
        """The states stored under `key` (marked most recently used), or `None`; counts a hit or a miss."""
        with self._lock:
            states = self._entries.get(key)
            if states is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return states

    def put(self, key: StateKey, states: torch.Tensor) -> bool:
        """Store `states` (detached) under `key`, evicting least recently used
        entries until the budget holds. Returns `False` when one entry alone exceeds the budget (not stored)."""
        size = states.numel() * states.element_size()
        if size > self.max_bytes:
            return False
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.nbytes -= old.numel() * old.element_size()
            while self.nbytes + size > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self.nbytes -= evicted.numel() * evicted.element_size()
                self.evictions += 1
            self._entries[key] = states.detach()
            self.nbytes += size
            return True

    def clear(self) -> None:
        """Drop every entry (counters are kept)."""
        with self._lock:
            self._entries.clear()
            self.nbytes = 0
