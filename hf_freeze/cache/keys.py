"""Example identity: a stable key per training example, and a digest of what the frozen prefix reads.

The key is the example's position in its dataset (namespaced per dataset, so train and eval never collide), added
as a column that survives `Trainer`'s column removal and is lifted out by `ExampleIndexCollator` before the user's
collator runs. The digest covers every model input except labels, with right padding stripped, so an input that
changes between epochs (random masking, augmentation) misses the cache instead of reading a wrong entry, while
the same example padded to a different batch length still hits.
"""

from __future__ import annotations

import hashlib
import logging
import zlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch.utils.data import Dataset

logger = logging.getLogger(__name__)

INDEX_COLUMN = "hf_freeze_index"
_INDEX_BITS = 40  # examples per dataset: up to 2**40


def namespace_of(name: str) -> int:
    """A small integer that tells datasets apart inside one key space ("train", "eval", "eval/<name>", ...)."""
    return zlib.crc32(name.encode()) & 0xFFFFF


def add_example_index(dataset: Any, namespace: str) -> Any:
    """Return `dataset` with an `INDEX_COLUMN` holding each example's key, or `dataset` unchanged when its
    examples cannot be keyed (an iterable dataset, or items that are not dicts); such examples skip the cache."""
    base = namespace_of(namespace) << _INDEX_BITS
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        datasets = None
    if datasets is not None and isinstance(dataset, datasets.Dataset):
        if INDEX_COLUMN in dataset.column_names:
            return dataset
        return dataset.add_column(INDEX_COLUMN, [base + i for i in range(len(dataset))])
    if isinstance(dataset, IndexedDataset):
        return dataset
    is_map_style = hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")
    if is_map_style and not isinstance(dataset, torch.utils.data.IterableDataset):
        return IndexedDataset(dataset, base)
    logger.warning(
        "hf_freeze: the %s dataset (%s) has no stable example index, so its examples skip the prefix cache. Use a "
        "map-style dataset (datasets.Dataset, a list, or a torch Dataset with __len__) to cache them.",
        namespace,
        type(dataset).__name__,
    )
    return dataset


class IndexedDataset(Dataset):
    """A map-style torch dataset whose dict items gain their key under `INDEX_COLUMN`."""

    def __init__(self, dataset: Dataset, base: int) -> None:
        self.dataset = dataset
        self.base = base

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        item = self.dataset[index]
        if not isinstance(item, Mapping):
            return item  # not a dict: no key, the collator passes it through untouched
        return {**item, INDEX_COLUMN: self.base + index}


class ExampleIndexCollator:
    """Wraps a data collator: takes the keys out of the features, collates the rest with the wrapped collator,
    and puts the keys back into the batch as a LongTensor under `INDEX_COLUMN`."""

    def __init__(self, collator: Callable[[list[Any]], Any]) -> None:
        self.collator = collator

    def __call__(self, features: list[Any]) -> Any:
        if not features or not isinstance(features[0], Mapping) or INDEX_COLUMN not in features[0]:
            return self.collator(features)
        keys = [int(f[INDEX_COLUMN]) for f in features]
        batch = self.collator([{k: v for k, v in f.items() if k != INDEX_COLUMN} for f in features])
        batch[INDEX_COLUMN] = torch.tensor(keys, dtype=torch.long)
        return batch


def example_digests(inputs: Mapping[str, Any], exclude: Iterable[str]) -> list[bytes]:
    """One 16-byte digest per example of the model inputs in `inputs` (labels and `exclude` left out).

    Sequence inputs are cut after the last real token (per `attention_mask`), so trailing padding does not
    count; leading (left) padding does, because it shifts the positions the prefix computed with.
    """
    excluded = set(exclude)
    tensors = {
        name: value.detach().cpu()
        for name, value in sorted(inputs.items())
        if name not in excluded and isinstance(value, torch.Tensor) and value.dim() > 0
    }
    if not tensors:
        return []
    batch_size = next(iter(tensors.values())).shape[0]
    mask = tensors.get("attention_mask")
    ends = last_real_positions(mask) if mask is not None and mask.dim() == 2 else None
    digests = []
    for i in range(batch_size):
        h = hashlib.blake2b(digest_size=16)
        for name, value in tensors.items():
            if value.shape[0] != batch_size:
                continue
            row = value[i]
            if ends is not None and row.dim() >= 1 and row.shape[0] == mask.shape[1]:
                row = row[: ends[i]]
            h.update(name.encode())
            h.update(str(row.dtype).encode())
            h.update(str(tuple(row.shape)).encode())
            h.update(row.contiguous().numpy().tobytes())
        digests.append(h.digest())
    return digests


def last_real_positions(mask: torch.Tensor) -> list[int]:
    """For each row of a 2-D attention mask, one past the index of its last real token."""
    positions = torch.arange(1, mask.shape[1] + 1)
    return (mask.bool() * positions).amax(dim=1).tolist()
