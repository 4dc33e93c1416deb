"""StateCache: LRU order, the byte budget, oversize entries, hit and miss counters."""

import pytest
import torch

from hf_freeze.serving import StateCache


def _states(tokens: int) -> torch.Tensor:
    return torch.zeros(tokens, 4)  # 16 bytes per token


def test_lru_eviction_keeps_the_budget_and_the_recently_used():
    cache = StateCache(max_bytes=3 * 32)
    for i in range(3):
        assert cache.put(("fp", 1, (i,)), _states(2))
    assert cache.nbytes == 96 and len(cache) == 3
    assert cache.get(("fp", 1, (0,))) is not None  # 0 is now the most recently used
    cache.put(("fp", 1, (3,)), _states(2))  # evicts 1, the least recently used
    assert cache.get(("fp", 1, (1,))) is None
    assert all(cache.get(("fp", 1, (i,))) is not None for i in (0, 2, 3))
    assert cache.nbytes == 96 and cache.evictions == 1
    assert (cache.hits, cache.misses) == (4, 1)


def test_keys_differ_by_fingerprint_boundary_and_tokens():
    cache = StateCache(max_bytes=1024)
    cache.put(("a", 2, (5, 6)), _states(2))
    assert cache.get(("b", 2, (5, 6))) is None and cache.get(("a", 3, (5, 6))) is None
    assert cache.get(("a", 2, (5, 7))) is None and cache.get(("a", 2, (5, 6))) is not None


def test_an_entry_larger_than_the_budget_is_not_stored_and_replacing_an_entry_counts_once():
    cache = StateCache(max_bytes=40)
    assert not cache.put(("fp", 1, (1,)), _states(3))
    assert len(cache) == 0 and cache.nbytes == 0
    cache.put(("fp", 1, (2,)), _states(2))
    cache.put(("fp", 1, (2,)), _states(2))
    assert cache.nbytes == 32 and len(cache) == 1


def test_a_bad_budget_is_refused():
    with pytest.raises(ValueError, match="max_bytes"):
        StateCache(-1)
