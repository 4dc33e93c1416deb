"""Example identity: keys that survive Trainer's column handling, and input digests that tell what the prefix
read (trailing padding ignored, left padding counted, labels left out)."""

import logging

import datasets
import pytest
import torch
from conftest import tiny_model
from test_batch import provider_for

from hf_freeze import freeze_prefix
from hf_freeze.cache.keys import (
    INDEX_COLUMN,
    ExampleIndexCollator,
    IndexedDataset,
    add_example_index,
    example_digests,
    namespace_of,
)


def one(ids, mask=None, **extra):
    ids = torch.tensor([ids])
    mask = torch.ones_like(ids) if mask is None else torch.tensor([mask])
    return {"input_ids": ids, "attention_mask": mask, **{k: torch.tensor([v]) for k, v in extra.items()}}


def test_trailing_padding_does_not_change_the_digest():
    assert example_digests(one([5, 6, 7]), ()) == example_digests(one([5, 6, 7, 0, 0], [1, 1, 1, 0, 0]), ())


def test_left_padding_changes_the_digest():
    assert example_digests(one([5, 6, 7]), ()) != example_digests(one([0, 0, 5, 6, 7], [0, 0, 1, 1, 1]), ())


def test_every_model_input_counts_but_excluded_ones_do_not():
    base = one([5, 6, 7], token_type_ids=[0, 0, 0], labels=1)
    other_type = one([5, 6, 7], token_type_ids=[0, 1, 1], labels=1)
    other_label = one([5, 6, 7], token_type_ids=[0, 0, 0], labels=0)
    assert example_digests(base, ("labels",)) != example_digests(other_type, ("labels",))
    assert example_digests(base, ("labels",)) == example_digests(other_label, ("labels",))
    assert example_digests(base, ()) != example_digests(other_label, ())


def test_labels_are_not_part_of_what_the_cache_matches():
    model = tiny_model("bert", "seq")
    freeze_prefix(model, 2)
    provider = provider_for(model)
    batch = one([5, 6, 7, 8], labels=1)
    keys = torch.tensor([3])
    provider.states_for(batch, keys, 2)
    provider.states_for(dict(batch, labels=torch.tensor([0])), keys, 2)  # e.g. relabelled data
    assert (provider.stats.misses, provider.stats.hits) == (1, 1)


def test_collator_wrapper_hides_keys_from_the_wrapped_collator_and_returns_them():
    seen = []

    def collate(features):
        seen.extend(features)
        return {"input_ids": torch.tensor([f["input_ids"] for f in features])}

    batch = ExampleIndexCollator(collate)([{"input_ids": [1, 2], INDEX_COLUMN: 7}, {"input_ids": [3, 4],
                                                                                    INDEX_COLUMN: 9}])
    assert all(INDEX_COLUMN not in f for f in seen)
    assert batch[INDEX_COLUMN].dtype == torch.long and batch[INDEX_COLUMN].tolist() == [7, 9]
    assert INDEX_COLUMN not in ExampleIndexCollator(collate)([{"input_ids": [1, 2]}])  # unkeyed: untouched


def test_datasets_get_namespaced_keys_once():
    data = datasets.Dataset.from_dict({"input_ids": [[1], [2], [3]]})
    train, evaluation = add_example_index(data, "train"), add_example_index(data, "eval")
    assert len(set(train[INDEX_COLUMN]) | set(evaluation[INDEX_COLUMN])) == 6  # never collide
    assert [k - train[INDEX_COLUMN][0] for k in train[INDEX_COLUMN]] == [0, 1, 2]
    assert add_example_index(train, "train") is train
    assert namespace_of("eval/dev") != namespace_of("eval")


def test_torch_map_style_datasets_are_wrapped_and_iterables_skip_with_a_warning(caplog):
    rows = [{"input_ids": [1]}, {"input_ids": [2]}]
    indexed = add_example_index(rows, "train")
    assert isinstance(indexed, IndexedDataset) and indexed[1][INDEX_COLUMN] - indexed[0][INDEX_COLUMN] == 1
    assert add_example_index([[1], [2]], "train")[0] == [1]  # items that are not dicts pass through unkeyed

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield from rows

    stream = Stream()
    with caplog.at_level(logging.WARNING):
        assert add_example_index(stream, "train") is stream
    assert "no stable example index" in caplog.text


@pytest.mark.parametrize("length", [5, 12])
def test_a_fully_padded_example_has_an_empty_digest_prefix(length):
    padded = one([0] * length, [0] * length)
    assert example_digests(padded, ()) == example_digests(one([0], [0]), ())
