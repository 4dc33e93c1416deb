"""`PrefixCache`: per-example hidden states at the frozen boundary, in memory or on disk.

Entries are stored unpadded (`[tokens, hidden]`) under the example's key, with the boundary they were computed
at and the digest of the inputs that produced them. An entry is served only when its digest matches the current
input and the frozen weights it was computed with are the model's current ones (a chained fingerprint of the
embeddings and blocks `[0, boundary)`), so a cache written by another model or for other weights is never used.
An entry at an older boundary `b < k` stays useful: blocks `[b, k)` turn it into the state at `k`.

On disk (`directory=`) the states live in one memory-mapped file (`states.bin`), next to `index.json` and
`manifest.json`, both replaced atomically (temp file, fsync, rename). Each entry carries a CRC32, so a torn or
corrupt write is detected and read as a miss. A full disk or an exhausted byte budget stops new entries (one
warning); the run goes on recomputing those examples.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import zlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .atomic import write_text_atomic
from .fingerprint import prefix_fingerprint
from .layout import BlockLayout

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
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
        dtype (`str`): storage precision, `"float32"` (exact), `"bfloat16"` or `"float16"`.
        on_stale (`str`): `"rebuild"` empties a directory written for another model; `"error"` raises
            `StaleCacheError`.
    """

    def __init__(
        self,
        model: nn.Module,
        layout: BlockLayout,
        *,
        directory: str | os.PathLike | None = None,
        max_bytes: int = 4 * 2**30,
        dtype: str = "float32",
        on_stale: str = "rebuild",
    ) -> None:
        if max_bytes <= 0:
            raise ValueError(f"The cache budget `max_bytes` must be positive, got {max_bytes}.")
        if dtype not in DTYPES:
            raise ValueError(f"Unknown cache dtype {dtype!r}; choose one of {sorted(DTYPES)}.")
        self.model = model
        self.layout = layout
        self.dtype = DTYPES[dtype]
        self.max_bytes = max_bytes
        self._prefix_fingerprints: dict[int, str] = {}
        self.model_fingerprint = model_fingerprint(model, layout, dtype)
        manifest = {"format": FORMAT_VERSION, "model": self.model_fingerprint, "dtype": dtype, "prefix": {}}
        if directory is None:
            self.store: _Store = _MemoryStore(max_bytes)
            self.manifest = manifest
        else:
            self.store, self.manifest = _DiskStore.open(Path(directory), manifest, max_bytes, on_stale)
        self.warned: set[str] = set()

    # ---- lookups ----

    def get(self, key: int, digest: bytes, boundary: int) -> CachedState | None:
        """The entry of `key` if it was computed from an input with `digest`, at a boundary `<= boundary`, with
        the current frozen weights; else `None`."""
        found = self.store.get(key)
        if found is None:
            return None
        entry_boundary, entry_digest, states = found
        if entry_digest != digest or entry_boundary > boundary or not self._is_current(entry_boundary):
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
        return self.store.nbytes

    def __len__(self) -> int:
        return len(self.store)

    def flush(self) -> None:
        """Make everything stored so far durable (disk caches; a no-op in memory)."""
        self.store.flush(self.manifest)

    # ---- fingerprints ----

    def prefix_fingerprint(self, boundary: int) -> str:
        """Chained hash of the embeddings and blocks `[0, boundary)` weights."""
        if boundary not in self._prefix_fingerprints:
            # fingerprint.py reads offloaded (meta) weights from Accelerate's hooks
            self._prefix_fingerprints[boundary] = prefix_fingerprint(
                self.model, self.layout, boundary, seed=self.model_fingerprint
            )
        return self._prefix_fingerprints[boundary]

    def _record_fingerprint(self, boundary: int) -> None:
        self.manifest["prefix"].setdefault(str(boundary), self.prefix_fingerprint(boundary))

    def _is_current(self, boundary: int) -> bool:
        recorded = self.manifest["prefix"].get(str(boundary))
        if recorded is None:
            return False
        if recorded == self.prefix_fingerprint(boundary):
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
        "class": type(model).__name__,
        "config": values,
        "attn": getattr(config, "_attn_implementation", None),
        "blocks": layout.blocks_path,
        "num_blocks": layout.num_blocks,
        "param_dtype": str(next(model.parameters()).dtype),
        "cache_dtype": dtype,
    }
    text = json.dumps(description, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


# ---- storage ----


class _Store(ABC):
    refusal: str = ""

    @abstractmethod
    def get(self, key: int) -> tuple[int, bytes, torch.Tensor] | None: ...

    @abstractmethod
    def put(self, key: int, boundary: int, digest: bytes, states: torch.Tensor) -> bool: ...

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

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def __len__(self) -> int:
        return len(self.entries)


class _DiskStore(_Store):
    """States in one file, written with `os.pwrite` and read through `numpy.memmap`; the index in JSON."""

    def __init__(self, directory: Path, max_bytes: int, dtype: torch.dtype) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.dtype = dtype
        self.index: dict[int, dict[str, Any]] = {}
        self.data_end = 0
        self.full = False
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
        return store, manifest

    def _load_index(self, index: dict[str, Any]) -> None:
        size = os.fstat(self._fd).st_size
        dropped = 0
        for key, entry in index["entries"].items():
            if entry["offset"] + entry["nbytes"] > size:
                dropped += 1
                continue
            self.index[int(key)] = entry
        valid_end = max((e["offset"] + e["nbytes"] for e in self.index.values()), default=0)
        self.data_end = max(min(index.get("data_end", size), size), valid_end)
        if dropped:
            logger.warning("hf_freeze: %d cache entries point past the end of a truncated %s; dropped.",
                           dropped, STATES_NAME)

    def get(self, key: int) -> tuple[int, bytes, torch.Tensor] | None:
        entry = self.index.get(key)
        if entry is None:
            return None
        end = entry["offset"] + entry["nbytes"]
        if self._map is None or len(self._map) < end:
            size = os.fstat(self._fd).st_size
            if size < end:
                return self._corrupt(key)
            self._map = np.memmap(self.directory / STATES_NAME, dtype=np.uint8, mode="r", shape=(size,))
        raw = np.array(self._map[entry["offset"] : end])
        if zlib.crc32(raw) != entry["crc"]:
            return self._corrupt(key)
        states = torch.from_numpy(raw).view(self.dtype).view(entry["tokens"], -1)
        return entry["boundary"], bytes.fromhex(entry["digest"]), states

    def put(self, key: int, boundary: int, digest: bytes, states: torch.Tensor) -> bool:
        if self.full:
            return False
        raw = states.view(torch.uint8).numpy().tobytes() if states.numel() else b""
        old = self.index.get(key)
        in_place = old is not None and old["nbytes"] == len(raw)
        offset = old["offset"] if in_place else self.data_end
        if not in_place and offset + len(raw) > self.max_bytes:
            self.refusal = f"the prefix cache reached its budget of {self.max_bytes:,} bytes"
            return False
        # An overwrite in place is not atomic, so unlist the entry first: a torn write is then never served.
        self.index.pop(key, None)
        try:
            written = os.pwrite(self._fd, raw, offset)
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
            "crc": zlib.crc32(raw),
        }
        return True

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
        self.index.pop(key, None)
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
