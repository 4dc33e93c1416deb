"""The `hf_freeze.cache` package: its public names, and the old top-level modules gone."""

import importlib

import pytest

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


@pytest.mark.parametrize("old", ["hf_freeze.keys", "hf_freeze.prefix", "hf_freeze.boundary_states"])
def test_the_old_top_level_modules_are_gone(old):
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module(old)
