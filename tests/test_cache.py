"""The `hf_freeze.cache` package: its public names (the top-level ones, and what the serving code builds on)."""

import hf_freeze
from hf_freeze import cache


def test_public_names_are_the_subpackage_modules_own():
    from hf_freeze.cache.batch import BatchCache
    from hf_freeze.cache.runner import PrefixRunner
    from hf_freeze.cache.store import PrefixCache, StaleCacheError

    assert hf_freeze.PrefixCache is cache.PrefixCache is PrefixCache
    assert hf_freeze.StaleCacheError is cache.StaleCacheError is StaleCacheError
    assert cache.PrefixRunner is PrefixRunner and cache.BatchCache is BatchCache
    assert callable(PrefixRunner.boundary_states) and callable(PrefixRunner.inject_states)  # the serving helper's
