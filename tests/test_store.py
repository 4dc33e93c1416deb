"""PrefixCache (`hf_freeze/cache/store.py`): validity rules, fingerprints, budgets, disk format, failure modes."""

import errno
import json
import os

import pytest
import torch
from conftest import tiny_model

from hf_freeze import PrefixCache, StaleCacheError, freeze_prefix, get_layout, unfreeze
from hf_freeze.cache.store import INDEX_NAME, MANIFEST_NAME, STATES_NAME

DIGEST = b"d" * 16
OTHER = b"o" * 16


def make_cache(model=None, **kwargs):
    model = model or tiny_model("bert", "seq")
    freeze_prefix(model, 2)
    return PrefixCache(model, get_layout(model), **kwargs)


def states(tokens=5, fill=1.0):
    return torch.full((tokens, 32), fill) + torch.arange(tokens * 32, dtype=torch.float32).view(tokens, 32)


@pytest.fixture(params=["memory", "disk"])
def cache(request, tmp_path):
    return make_cache(directory=tmp_path / "cache" if request.param == "disk" else None)


def test_round_trip_is_exact_in_float32(cache):
    assert cache.put(7, DIGEST, 2, states())
    entry = cache.get(7, DIGEST, 2)
    assert entry.boundary == 2 and torch.equal(entry.states, states())
    assert cache.nbytes == states().numel() * 4


def test_changed_input_misses(cache):
    cache.put(7, DIGEST, 2, states())
    assert cache.get(7, OTHER, 2) is None


def test_entry_from_a_later_boundary_is_never_served_earlier(cache):
    cache.put(7, DIGEST, 2, states())
    assert cache.get(7, DIGEST, 1) is None
    assert cache.get(7, DIGEST, 3).boundary == 2  # older entries are served for advancing


def test_weights_changed_after_unfreeze_and_a_new_freeze_miss(cache, caplog):
    cache.put(7, DIGEST, 2, states())
    assert cache.get(7, DIGEST, 2) is not None
    unfreeze(cache.model)  # in one process: unfreeze, train the prefix further, freeze again
    with torch.no_grad():
        cache.layout.blocks[1].attention.self.query.weight.add_(1.0)
    freeze_prefix(cache.model, 2)
    assert cache.get(7, DIGEST, 2) is None
    assert "other frozen weights" in caplog.text
    assert cache.put(8, DIGEST, 2, states()) and cache.get(8, DIGEST, 2) is not None  # new weights, new entries


def test_disk_cache_reused_with_other_weights_replaces_the_fingerprint(tmp_path, caplog):
    one = states().numel() * 4
    old = make_cache(tiny_model("bert", "seq", seed=0), directory=tmp_path, max_bytes=int(2.5 * one))
    assert old.put(1, DIGEST, 2, states()) and old.put(2, DIGEST, 2, states())
    old.flush()
    model = tiny_model("bert", "seq", seed=1)  # same architecture, other weights: the model fingerprint matches
    reused = make_cache(model, directory=tmp_path, max_bytes=int(2.5 * one))
    assert len(reused) == 2 and reused.get(1, DIGEST, 2) is None
    # entries computed with the current weights are served; the stale ones are dropped and their bytes reclaimed
    assert reused.put(3, DIGEST, 2, states(fill=3.0)) and reused.put(4, DIGEST, 2, states(fill=4.0))
    assert "dropped" in caplog.text
    assert torch.equal(reused.get(3, DIGEST, 2).states, states(fill=3.0))
    assert torch.equal(reused.get(4, DIGEST, 2).states, states(fill=4.0))
    assert reused.get(2, DIGEST, 2) is None and len(reused) == 2 and reused.nbytes <= 2.5 * one
    reused.flush()
    reopened = PrefixCache(model, get_layout(model), directory=tmp_path)
    assert torch.equal(reopened.get(4, DIGEST, 2).states, states(fill=4.0))


def test_zero_length_entries_round_trip(cache, tmp_path):
    empty = torch.zeros(0, 32)
    assert cache.put(5, DIGEST, 2, empty) and cache.put(6, DIGEST, 2, states())
    assert cache.get(5, DIGEST, 2).states.shape == (0, 32)
    assert torch.equal(cache.get(6, DIGEST, 2).states, states())


def test_zero_length_entry_alone_in_a_disk_cache(tmp_path):
    model = tiny_model("bert", "seq")
    cache = make_cache(model, directory=tmp_path)
    assert cache.put(5, DIGEST, 2, torch.zeros(0, 32))
    cache.flush()
    assert PrefixCache(model, get_layout(model), directory=tmp_path).get(5, DIGEST, 2).states.shape == (0, 32)


def test_auto_dtype_stores_in_the_models_dtype():
    model = tiny_model("bert", "seq").to(torch.bfloat16)
    cache = make_cache(model)
    value = torch.randn(5, 32, dtype=torch.bfloat16)
    cache.put(1, DIGEST, 2, value)
    assert cache.dtype == torch.bfloat16 and torch.equal(cache.get(1, DIGEST, 2).states, value)
    assert make_cache(tiny_model("bert", "seq")).dtype == torch.float32


def test_byte_budget_is_respected(tmp_path, caplog):
    one = states().numel() * 4
    for directory in (None, tmp_path / "disk"):
        cache = make_cache(directory=directory, max_bytes=int(2.5 * one))
        assert cache.put(1, DIGEST, 2, states()) and cache.put(2, DIGEST, 2, states())
        assert not cache.put(3, DIGEST, 2, states())
        assert cache.nbytes <= 2.5 * one
        assert cache.put(1, DIGEST, 2, states(fill=2.0))  # replacing an entry of the same size still fits
        assert torch.equal(cache.get(1, DIGEST, 2).states, states(fill=2.0))
    assert "reached its budget" in caplog.text


def test_disk_cache_compacts_dead_bytes_to_make_room(tmp_path):
    one = states().numel() * 4
    cache = make_cache(directory=tmp_path / "disk", max_bytes=int(2.5 * one))
    assert cache.put(1, DIGEST, 2, states()) and cache.put(2, DIGEST, 2, states())
    assert cache.put(1, DIGEST, 2, states(tokens=3, fill=3.0))  # another size: over budget until compacted
    assert cache.nbytes == one + states(tokens=3).numel() * 4  # entry 1's old bytes were reclaimed
    assert torch.equal(cache.get(1, DIGEST, 2).states, states(tokens=3, fill=3.0))
    assert torch.equal(cache.get(2, DIGEST, 2).states, states())
    assert not cache.put(3, DIGEST, 2, states())  # the live entries leave no room, compacted or not
    assert cache.store.live_bytes == sum(entry["nbytes"] for entry in cache.store.index.values())


@pytest.mark.parametrize("budget", [0, -1])
def test_budget_must_be_positive(budget):
    with pytest.raises(ValueError, match="must be positive"):
        make_cache(max_bytes=budget)


def test_bfloat16_halves_the_bytes_and_rounds(tmp_path):
    exact = make_cache()
    half = make_cache(dtype="bfloat16", directory=tmp_path / "bf16")
    value = torch.randn(5, 32)
    exact.put(1, DIGEST, 2, value)
    half.put(1, DIGEST, 2, value)
    assert half.nbytes * 2 == exact.nbytes
    rounded = half.get(1, DIGEST, 2).states.float()
    assert torch.allclose(rounded, value, rtol=1e-2, atol=1e-2) and not torch.equal(rounded, value)


def test_disk_cache_survives_a_new_process(tmp_path):
    model = tiny_model("bert", "seq")
    cache = make_cache(model, directory=tmp_path)
    cache.put(1, DIGEST, 2, states())
    cache.flush()
    reopened = PrefixCache(model, get_layout(model), directory=tmp_path)
    assert torch.equal(reopened.get(1, DIGEST, 2).states, states())
    assert len(reopened) == 1


def test_unflushed_entries_are_simply_absent_after_a_crash(tmp_path):
    model = tiny_model("bert", "seq")
    cache = make_cache(model, directory=tmp_path)
    cache.put(1, DIGEST, 2, states())
    cache.flush()
    cache.put(2, DIGEST, 2, states())  # no flush: the index on disk does not list it
    reopened = PrefixCache(model, get_layout(model), directory=tmp_path)
    assert reopened.get(2, DIGEST, 2) is None and reopened.get(1, DIGEST, 2) is not None


def test_cache_of_another_model_is_rebuilt_or_refused(tmp_path, caplog):
    first = make_cache(tiny_model("bert", "seq"), directory=tmp_path)
    first.put(1, DIGEST, 2, states())
    first.flush()
    other = tiny_model("roberta", "seq")
    with pytest.raises(StaleCacheError, match="written for another model.*on_stale_cache='rebuild'"):
        make_cache(other, directory=tmp_path, on_stale="error")
    rebuilt = make_cache(other, directory=tmp_path)
    assert len(rebuilt) == 0 and rebuilt.get(1, DIGEST, 2) is None
    assert "rebuilding the cache" in caplog.text


def test_corrupt_entry_reads_as_a_miss(tmp_path, caplog):
    model = tiny_model("bert", "seq")
    cache = make_cache(model, directory=tmp_path)
    cache.put(1, DIGEST, 2, states())
    cache.put(2, DIGEST, 2, states(fill=3.0))
    cache.flush()
    with open(tmp_path / STATES_NAME, "r+b") as handle:
        handle.seek(10)
        handle.write(b"\xff\xff\xff\xff")
    reopened = PrefixCache(model, get_layout(model), directory=tmp_path)
    assert reopened.get(1, DIGEST, 2) is None
    assert torch.equal(reopened.get(2, DIGEST, 2).states, states(fill=3.0))
    assert "corrupt entry" in caplog.text


def test_truncated_states_file_drops_the_missing_entries(tmp_path, caplog):
    model = tiny_model("bert", "seq")
    cache = make_cache(model, directory=tmp_path)
    cache.put(1, DIGEST, 2, states())
    cache.put(2, DIGEST, 2, states())
    cache.flush()
    size = os.path.getsize(tmp_path / STATES_NAME)
    os.truncate(tmp_path / STATES_NAME, size - 100)
    reopened = PrefixCache(model, get_layout(model), directory=tmp_path)
    assert len(reopened) == 1 and reopened.get(1, DIGEST, 2) is not None
    assert "truncated" in caplog.text
    assert reopened.put(3, DIGEST, 2, states())  # appends after the last valid entry
    assert reopened.get(3, DIGEST, 2) is not None


@pytest.mark.parametrize("broken", ["manifest", "index"])
def test_unreadable_metadata_is_rebuilt_or_refused(tmp_path, broken):
    model = tiny_model("bert", "seq")
    cache = make_cache(model, directory=tmp_path)
    cache.put(1, DIGEST, 2, states())
    cache.flush()
    (tmp_path / (MANIFEST_NAME if broken == "manifest" else INDEX_NAME)).write_text("{not json")
    with pytest.raises(StaleCacheError, match="unreadable"):
        PrefixCache(model, get_layout(model), directory=tmp_path, on_stale="error")
    assert len(PrefixCache(model, get_layout(model), directory=tmp_path)) == 0


def test_full_disk_falls_back_to_recomputing_with_one_warning(tmp_path, monkeypatch, caplog):
    cache = make_cache(directory=tmp_path)
    assert cache.put(1, DIGEST, 2, states())

    def no_space(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", no_space)
    assert not cache.put(2, DIGEST, 2, states())
    assert not cache.put(3, DIGEST, 2, states())
    assert caplog.text.count("is full") == 1
    assert cache.get(1, DIGEST, 2) is not None  # what was stored stays readable
    monkeypatch.undo()
    cache.flush()
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert list(index["entries"]) == ["1"]


def test_flush_writes_metadata_atomically(tmp_path, monkeypatch):
    cache = make_cache(directory=tmp_path)
    cache.put(1, DIGEST, 2, states())
    cache.flush()
    before = (tmp_path / INDEX_NAME).read_text()
    cache.put(2, DIGEST, 2, states())

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        cache.flush()
    assert (tmp_path / INDEX_NAME).read_text() == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_frozen_weights_loaded_in_place_miss_without_any_unfreeze(cache):
    cache.put(7, DIGEST, 2, states())
    with cache.same_weights():
        assert cache.get(7, DIGEST, 2) is not None
    other = tiny_model("bert", "seq", seed=1).state_dict()
    frozen = {n: other[n] for n, p in cache.model.named_parameters() if not p.requires_grad}
    cache.model.load_state_dict(frozen, strict=False)  # as load_best_model_at_end or a resume does
    assert cache.get(7, DIGEST, 2) is None
    with cache.same_weights():  # one batch's lookups: checked once, against the weights as they are now
        assert cache.put(8, DIGEST, 2, states()) and cache.get(8, DIGEST, 2) is not None


def test_each_frozen_unit_is_hashed_once_across_boundaries(monkeypatch):
    from hf_freeze import fingerprint

    hashed = []
    original = fingerprint.unit_digest
    monkeypatch.setattr(fingerprint, "unit_digest", lambda layout, unit: hashed.append(unit) or original(layout, unit))
    cache = make_cache()  # frozen at boundary 2
    for key in range(3):
        cache.put(key, DIGEST, 2, states())
        assert cache.get(key, DIGEST, 2) is not None
    freeze_prefix(cache.model, 3)
    cache.put(9, DIGEST, 3, states())
    assert cache.get(9, DIGEST, 3) is not None and cache.get(0, DIGEST, 3).boundary == 2
    assert sorted(hashed) == [0, 1, 2, 3]  # chained: boundary 3 reuses the digests of units 0..2
