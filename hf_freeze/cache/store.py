"""`PrefixCache`: per-example hidden states at the frozen boundary, in memory or on disk.

Entries are stored unpadded (`[tokens, hidden]`) under the example's key, with the boundary they were computed
at and the digest of the inputs that produced them. An entry is served only when its digest matches the current
input and the frozen weights it was computed with are the model's current ones. The weights are checked by the
prefix fingerprint of `hf_freeze.fingerprint` (one streaming digest per unit, chained, seeded with a description
of the model), recorded per boundary: when the weights behind a boundary change (another model's weights in a
reused `cache_dir`, or `unfreeze`, more training and a new freeze in one process), the boundary's new fingerprint
replaces the old one and its stale entries are dropped, so their bytes are reclaimed. An entry at an older boundary
`b < k` stays useful: blocks `[b, k)` turn it into the state at `k`.

The fingerprint is checked against the weights as they are at every lookup (a change in place, such as a
checkpoint loaded by `load_best_model_at_end` or `resume_from_checkpoint`, is seen by `hf_freeze.fingerprint`'s
stamps); within `same_weights()` (one batch's lookups, during which nothing writes weights) once per boundary.

On disk (`directory=`) the states live in one memory-mapped file (`states.bin`), next to `index.json` and
`manifest.json`, both replaced atomically (temp file, fsync, rename). Each entry carries a CRC32, so a torn or
corrupt write is detected and read as a miss. A full disk or an exhausted byte budget stops new entries (one
warning); the run goes on recomputing those examples.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import zlib
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..atomic import write_text_atomic
from ..fingerprint import prefix_fingerprint, prefix_fingerprints
from ..freezing import frozen_boundary
from ..fsdp import model_class
from ..layout import BlockLayout

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: entries record their hidden size (zero-length entries), fingerprints via fingerprint.py
MANIFEST_NAME = "manifest.json"
INDEX_NAME = "index.json"
STATES_NAME = "states.bin"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Config entries that do not change what the frozen prefix computes (head, bookkeeping, output switches, and
# `dtype`, which save_pretrained fills in; the parameters' real dtype is fingerprinted separately).
_CONFIG_KEYS_IGNORED = {
    "_name_or_path", "transformers_version", "architectures", "id2label", "label2id", "num_labels",
    "problem_type", "tie_word_embeddings", "finetuning_task", "_commit_hash", "dtype", "torch_dtype",
    "use_cache", "return_dict", "output_attentions", "output_hidden_states", "_attn_implementation_autoset",
}
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class StaleCacheError(RuntimeError):
    """A cache directory holds states of another model (or is unreadable) and `on_stale_cache="error"`."""


@dataclass(frozen=True)
class CachedState:
    """One example's states at `boundary`, unpadded: `[tokens, hidden]`."""

    boundary: int
    states: torch.Tensor


class PrefixCache:
    """Boundary hidden states keyed by example.

    Args:
        model (`nn.Module`): the model whose prefix is cached (for fingerprints).
        layout (`BlockLayout`): its layout.
        directory (`str`, *optional*): keep the cache on disk there; default in memory.
        max_bytes (`int`): byte budget of the stored states.
        dtype (`str`): storage precision: `"auto"` (the model's own parameter dtype, so nothing is rounded),
            `"float32"`, `"bfloat16"` or `"float16"`.
        on_stale (`str`): `"rebuild"` empties a directory written for another model; `"error"` raises
            `StaleCacheError`.

    Example:
        ```python
        cache = PrefixCache(model, get_layout(model), directory="cache")
        cache.put(key, digest, 2, states)            # states: [tokens, hidden] at boundary 2
        cache.get(key, digest, 2).states             # the same values, or None when stale
        ```
    """

    def __init__(
        self,
        model: nn.Module,
        layout: BlockLayout,
        *,
        directory: str | os.PathLike | None = None,
        max_bytes: int = 4 * 2**30,
        dtype: str = "auto",
        on_stale: str = "rebuild",
    ) -> None:
        if max_bytes <= 0:
            raise ValueError(f"The cache budget `max_bytes` must be positive, got {max_bytes}.")
        if dtype != "auto" and dtype not in DTYPES:
            raise ValueError(f"Unknown cache dtype {dtype!r}; choose 'auto' or one of {sorted(DTYPES)}.")
        self.model = model
        self.layout = layout
        self.dtype_name = _model_dtype_name(layout) if dtype == "auto" else dtype
        self.dtype = DTYPES[self.dtype_name]
        self.max_bytes = max_bytes
        self.model_fingerprint = model_fingerprint(model, layout, self.dtype_name)
        manifest = {"format": FORMAT_VERSION, "model": self.model_fingerprint, "dtype": self.dtype_name, "prefix": {}}
        if directory is None:
            self.store: _Store = _MemoryStore(max_bytes)
            self.manifest = manifest
        else:
            self.store, self.manifest = _DiskStore.open(Path(directory), manifest, max_bytes, on_stale)
        self.warned: set[str] = set()
        self._pinned: dict[int, str] | None = None

    @contextlib.contextmanager
    def same_weights(self) -> Iterator[None]:
        """Within this block the weights do not change (one batch's lookups and stores), so each boundary's
        fingerprint is computed once instead of at every lookup."""
        outer, self._pinned = self._pinned, {} if self._pinned is None else self._pinned
        try:
            yield
        finally:
            self._pinned = outer

    def pin_fingerprints(self, boundaries: Iterable[int]) -> None:
        """Within `same_weights()`, compute the fingerprints of `boundaries` now, in ascending order, so that the
        lookups and stores that follow only read them.

        Under FSDP2 a fingerprint that is not remembered gathers sharded weights (collectives every rank must call
        in the same order), while `get` fingerprints only the boundaries of the entries this rank holds: the cache
        of a lockstep batch pins every boundary the batch may need, on every rank alike, first.
        """
        if self._pinned is None:
            raise RuntimeError("pin_fingerprints() pins for one batch: call it inside `with cache.same_weights():`.")
        self._pinned.update(prefix_fingerprints(self.model, self.layout, boundaries, seed=self.model_fingerprint,
                                                frozen_boundary=frozen_boundary(self.model)))

    # ---- lookups ----

    def get(self, key: int, digest: bytes, boundary: int) -> CachedState | None:
        """The entry of `key` if it was computed from an input with `digest`, at a boundary `<= boundary`, with
        the current frozen weights; else `None` (an entry computed with other weights is dropped)."""
        found = self.store.get(key)
        if found is None:
            return None
        entry_boundary, entry_digest, states = found
        if entry_digest != digest or entry_boundary > boundary:
            return None
        if not self._is_current(entry_boundary):
            self.store.remove(key)
            return None
        return CachedState(entry_boundary, states)

    def put(self, key: int, digest: bytes, boundary: int, states: torch.Tensor) -> bool:
        """Store one example's unpadded states at `boundary`. Returns False when it did not fit."""
        self._record_fingerprint(boundary)
        stored = self.store.put(key, boundary, digest, states.detach().to("cpu", self.dtype).contiguous())
        if not stored and self.store.refusal not in self.warned:
            self.warned.add(self.store.refusal)
            logger.warning("hf_freeze: %s; examples that do not fit are recomputed each step.", self.store.refusal)
        return stored

    @property
    def nbytes(self) -> int:
        """Bytes the stored states occupy (on disk: the states file, reclaimed by compaction)."""
        return self.store.nbytes

    def __len__(self) -> int:
        return len(self.store)

    def flush(self) -> None:
        """Make everything stored so far durable (disk caches; a no-op in memory)."""
        self.store.flush(self.manifest)

    # ---- fingerprints ----

    def fingerprint(self, boundary: int) -> str:
        """Fingerprint of the model description and the embeddings and blocks `[0, boundary)` weights as they are
        now (units inside the frozen prefix are hashed again only when their weights changed, see
        `hf_freeze.fingerprint`)."""
        if self._pinned is not None and boundary in self._pinned:
            return self._pinned[boundary]
        fingerprint = prefix_fingerprint(self.model, self.layout, boundary, seed=self.model_fingerprint,
                                         frozen_boundary=frozen_boundary(self.model))
        if self._pinned is not None:
            self._pinned[boundary] = fingerprint
        return fingerprint

    def _record_fingerprint(self, boundary: int) -> None:
        current = self.fingerprint(boundary)
        recorded = self.manifest["prefix"].get(str(boundary))
        if recorded == current:
            return
        if recorded is not None:
            dropped = self.store.remove_boundary(boundary)
            logger.warning(
                "hf_freeze: the frozen weights behind boundary %d changed; dropped %d cached states computed with "
                "the old ones.", boundary, dropped,
            )
        self.manifest["prefix"][str(boundary)] = current

    def _is_current(self, boundary: int) -> bool:
        recorded = self.manifest["prefix"].get(str(boundary))
        if recorded is None:
            return False
        if recorded == self.fingerprint(boundary):
            return True
        if f"stale{boundary}" not in self.warned:
            self.warned.add(f"stale{boundary}")
            logger.warning(
                "hf_freeze: cached states at boundary %d were computed with other frozen weights; recomputing.",
                boundary,
            )
        return False


def model_fingerprint(model: nn.Module, layout: BlockLayout, dtype: str) -> str:
    """Hash of what, besides weights, decides the prefix's output: class, config, attention kernel, layout."""
    config = getattr(model, "config", None)
    config_values = config.to_dict() if config is not None else {}
    values = {k: v for k, v in config_values.items() if k not in _CONFIG_KEYS_IGNORED}
    description = {
        "class": model_class(model).__name__,  # the same with or without FSDP2's `FSDP<Model>` class
        "config": values,
        "attn": getattr(config, "_attn_implementation", None),
        "blocks": layout.blocks_path,
        "num_blocks": layout.num_blocks,
        "param_dtype": str(next(model.parameters()).dtype),
        "cache_dtype": dtype,
    }
    text = json.dumps(description, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def _model_dtype_name(layout: BlockLayout) -> str:
    """The storage dtype `"auto"` picks: the blocks' floating-point parameter dtype (float32 for others)."""
    for param in layout.blocks[0].parameters():
        if param.is_floating_point():
            for name, dtype in DTYPES.items():
                if param.dtype == dtype:
                    return name
            break
    return "float32"


# ---- storage ----


class _Store(ABC):
    refusal: str = ""

    @abstractmethod
    def get(self, key: int) -> tuple[int, bytes, torch.Tensor] | None: ...

    @abstractmethod
    def put(self, key: int, boundary: int, digest: bytes, states: torch.Tensor) -> bool: ...

    @abstractmethod
    def remove(self, key: int) -> None: ...

    @abstractmethod
    def remove_boundary(self, boundary: int) -> int:
        """Drop every entry at `boundary`; returns how many."""

    @property
    @abstractmethod
    def nbytes(self) -> int: ...

    @abstractmethod
    def __len__(self) -> int: ...

    def flush(self, manifest: dict[str, Any]) -> None:
        pass


class _MemoryStore(_Store):
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.entries: dict[int, tuple[int, bytes, torch.Tensor]] = {}
        self._nbytes = 0

    def get(self, key: int) -> tuple[int, bytes, torch.Tensor] | None:
        return self.entries.get(key)

    def put(self, key: int, boundary: int, digest: bytes, states: torch.Tensor) -> bool:
        old = self.entries.get(key)
        freed = 0 if old is None else _tensor_bytes(old[2])
        size = _tensor_bytes(states)
        if self._nbytes - freed + size > self.max_bytes:
            self.refusal = f"the prefix cache reached its budget of {self.max_bytes:,} bytes"
            return False
        self.entries[key] = (boundary, digest, states.clone())
        self._nbytes += size - freed
        return True

    def remove(self, key: int) -> None:
        old = self.entries.pop(key, None)
        if old is not None:
            self._nbytes -= _tensor_bytes(old[2])

    def remove_boundary(self, boundary: int) -> int:
        keys = [k for k, entry in self.entries.items() if entry[0] == boundary]
        for key in keys:
            self.remove(key)
        return len(keys)

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def __len__(self) -> int:
        return len(self.entries)


class _DiskStore(_Store):
    """States in one file, written with `os.pwrite` and read through `numpy.memmap`; the index in JSON. Entries
    that were dropped leave dead bytes behind; when the budget is reached and compacting would make room, the live
    entries are copied into a fresh file that replaces the old one (temp file, fsync, rename)."""

    def __init__(self, directory: Path, max_bytes: int, dtype: torch.dtype) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.dtype = dtype
        self.index: dict[int, dict[str, Any]] = {}
        self.live_bytes = 0  # bytes of the listed entries (the rest of `data_end` is dead until compaction)
        self.data_end = 0
        self.full = False
        self.manifest: dict[str, Any] | None = None
        self._fd = os.open(directory / STATES_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        self._map: np.memmap | None = None
        self._warned_corrupt = False

    @classmethod
    def open(
        cls, directory: Path, manifest: dict[str, Any], max_bytes: int, on_stale: str
    ) -> tuple[_DiskStore, dict[str, Any]]:
        directory.mkdir(parents=True, exist_ok=True)
        saved, problem = _read_existing(directory)
        if saved is not None and saved["manifest"].get("model") != manifest["model"]:
            problem = "it was written for another model (or another cache dtype)"
        if problem is not None:
            if on_stale == "error":
                raise StaleCacheError(
                    f"The cache directory {directory} cannot be used: {problem}. Delete it, point `cache_dir` at "
                    "another folder, or set `on_stale_cache='rebuild'`."
                )
            logger.warning("hf_freeze: rebuilding the cache in %s: %s.", directory, problem)
            for name in (MANIFEST_NAME, INDEX_NAME, STATES_NAME):
                (directory / name).unlink(missing_ok=True)
            saved = None
        store = cls(directory, max_bytes, DTYPES[manifest["dtype"]])
        if saved is not None:
            manifest = saved["manifest"]
            store._load_index(saved["index"])
        store.manifest = manifest
        return store, manifest

    def _load_index(self, index: dict[str, Any]) -> None:
        size = os.fstat(self._fd).st_size
        dropped = 0
        for key, entry in index["entries"].items():
            if entry["offset"] + entry["nbytes"] > size:
                dropped += 1
                continue
            self.index[int(key)] = entry
            self.live_bytes += entry["nbytes"]
        valid_end = max((e["offset"] + e["nbytes"] for e in self.index.values()), default=0)
        self.data_end = max(min(index.get("data_end", size), size), valid_end)
        if dropped:
            logger.warning("hf_freeze: %d cache entries point past the end of a truncated %s; dropped.",
                           dropped, STATES_NAME)

    def get(self, key: int) -> tuple[int, bytes, torch.Tensor] | None:
        entry = self.index.get(key)
        if entry is None:
            return None
        raw = self._read(entry)
        if raw is None or zlib.crc32(raw) != entry["crc"]:
            return self._corrupt(key)
        if entry["nbytes"] == 0:
            states = torch.zeros(entry["tokens"], entry["hidden"], dtype=self.dtype)
        else:
            states = torch.from_numpy(raw).view(self.dtype).view(entry["tokens"], entry["hidden"])
        return entry["boundary"], bytes.fromhex(entry["digest"]), states

    def _read(self, entry: dict[str, Any]) -> np.ndarray | None:
        if entry["nbytes"] == 0:
            return np.zeros(0, dtype=np.uint8)  # an empty file cannot be memory-mapped
        end = entry["offset"] + entry["nbytes"]
        if self._map is None or len(self._map) < end:
            size = os.fstat(self._fd).st_size
            if size < end:
                return None
            self._map = np.memmap(self.directory / STATES_NAME, dtype=np.uint8, mode="r", shape=(size,))
        return np.array(self._map[entry["offset"] : end])

    def put(self, key: int, boundary: int, digest: bytes, states: torch.Tensor) -> bool:
        if self.full:
            return False
        raw = states.view(torch.uint8).numpy().tobytes() if states.numel() else b""
        old = self.index.get(key)
        in_place = old is not None and old["nbytes"] == len(raw)
        if not in_place and self.data_end + len(raw) > self.max_bytes:
            live = self.live_bytes - (old["nbytes"] if old is not None else 0)
            if live + len(raw) > self.max_bytes:
                self.refusal = f"the prefix cache reached its budget of {self.max_bytes:,} bytes"
                return False
            self._unlist(key)
            self._compact()
        offset = old["offset"] if in_place else self.data_end
        # An overwrite in place is not atomic, so unlist the entry first: a torn write is then never served.
        self._unlist(key)
        try:
            written = os.pwrite(self._fd, raw, offset) if raw else 0
        except OSError as error:
            if error.errno not in _NO_SPACE:
                raise
            self.full = True
            self.refusal = f"the disk holding {self.directory} is full ({os.strerror(error.errno)})"
            return False
        if written != len(raw):
            self.full = True
            self.refusal = f"the disk holding {self.directory} is full (short write)"
            return False
        self.data_end = max(self.data_end, offset + len(raw))
        self.index[key] = {
            "boundary": boundary,
            "digest": digest.hex(),
            "offset": offset,
            "nbytes": len(raw),
            "tokens": int(states.shape[0]),
            "hidden": int(states.shape[1]),
            "crc": zlib.crc32(raw),
        }
        self.live_bytes += len(raw)
        return True

    def remove(self, key: int) -> None:
        self._unlist(key)

    def _unlist(self, key: int) -> None:
        entry = self.index.pop(key, None)
        if entry is not None:
            self.live_bytes -= entry["nbytes"]

    def remove_boundary(self, boundary: int) -> int:
        keys = [k for k, entry in self.index.items() if entry["boundary"] == boundary]
        for key in keys:
            self._unlist(key)
        return len(keys)

    def _compact(self) -> None:
        """Copy the live entries into a new states file that atomically replaces the old one, then write the index
        that matches it (until then, the CRCs make the old index's entries read as misses)."""
        tmp = self.directory / f".{STATES_NAME}.compact.tmp"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        offset = 0
        try:
            for key, entry in list(self.index.items()):
                raw = self._read(entry)
                if raw is None or zlib.crc32(raw) != entry["crc"]:
                    self._unlist(key)
                    continue
                os.pwrite(fd, raw.tobytes(), offset)
                entry["offset"] = offset
                offset += entry["nbytes"]
            os.fsync(fd)
            os.replace(tmp, self.directory / STATES_NAME)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(self._fd)
        self._fd, self._map, self.data_end = fd, None, offset
        if self.manifest is not None:
            self.flush(self.manifest)

    def flush(self, manifest: dict[str, Any]) -> None:
        os.fsync(self._fd)
        entries = {str(k): v for k, v in self.index.items()}
        write_text_atomic(self.directory / INDEX_NAME, json.dumps({"data_end": self.data_end, "entries": entries}))
        write_text_atomic(self.directory / MANIFEST_NAME, json.dumps(manifest))

    @property
    def nbytes(self) -> int:
        return self.data_end

    def __len__(self) -> int:
        return len(self.index)

    def _corrupt(self, key: int) -> None:
        self._unlist(key)
        if not self._warned_corrupt:
            self._warned_corrupt = True
            logger.warning("hf_freeze: a corrupt entry in %s was dropped and will be recomputed.",
                           self.directory / STATES_NAME)
        return None

    def __del__(self) -> None:
        try:
            os.close(self._fd)
        except (OSError, AttributeError):
            pass


def _read_existing(directory: Path) -> tuple[dict[str, Any] | None, str | None]:
    """The saved manifest and index, or a reason why they cannot be used."""
    manifest_path, index_path = directory / MANIFEST_NAME, directory / INDEX_NAME
    if not manifest_path.exists():
        leftovers = [p.name for p in directory.iterdir() if p.name in (INDEX_NAME, STATES_NAME)]
        return None, ("it holds cache files without a manifest" if leftovers else None)
    try:
        manifest = json.loads(manifest_path.read_text())
        index = json.loads(index_path.read_text()) if index_path.exists() else {"entries": {}}
    except (OSError, ValueError) as error:
        return None, f"its manifest or index is unreadable ({error})"
    if manifest.get("format") != FORMAT_VERSION:
        return None, f"it uses cache format {manifest.get('format')}, this hf_freeze writes {FORMAT_VERSION}"
    return {"manifest": manifest, "index": index}, None


def _tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()
