"""Freeze metadata and suffix-only checkpoints bound to their base's fingerprint.

A model fine-tuned with a frozen prefix (embeddings + blocks `[0, k)`) shares that prefix bit for bit with its
base. `save_suffix` writes only the rest (blocks `[k, L)`, the head, untied tensors) plus the config, the tokenizer
and `hf_freeze.json`; `load_suffix` rebuilds the model on its base after checking the base's prefix fingerprint
(`fingerprint.prefix_fingerprint`, the same code as the cache's). `save_pretrained` writes a full checkpoint with
the same metadata, which transformers' own `from_pretrained` still loads; a suffix-only folder needs `load_suffix`.

Why functions and not a PEFT-style wrapper: the freeze state already lives on the model (`freezing.py`), the
suffix is a plain subset of the model's own `state_dict`, and the loaded model is an ordinary transformers model
(frozen with `freeze_prefix`), so `Trainer`, `generate` and the server use it without unwrapping.

Folder layout (suffix-only): `config.json`, `suffix.safetensors`, `hf_freeze.json`, tokenizer files when given.

`hf_freeze.json` records the sha256 of every weight file beside it (suffix-only and full saves); `load_suffix`
checks them before reading any weights, so a file changed after saving (flipped bytes, a partial download that
kept its size) is refused by name instead of loading other weights. `FreezeCallback` does the same for
`Trainer`'s own `checkpoint-N` folders: `record_trainer_checkpoint` on each save, `verify_trainer_checkpoint` on
resume.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import initialization

from .atomic import write_folder_atomic, write_text_atomic
from .fingerprint import chain_digests, unit_digests
from .freezing import freeze_prefix, frozen_boundary, get_layout, untied_parameters
from .fsdp import full_tensor, is_distributed, is_fsdp2, is_main_rank, model_class
from .layout import BlockLayout, execution_device
from .offload import materialized_state_dict

logger = logging.getLogger(__name__)

METADATA_NAME = "hf_freeze.json"
TRAINER_CHECKSUMS_NAME = "hf_freeze_checksums.json"  # in a Trainer checkpoint-N folder
_TRAINER_STATE_FILES = ("optimizer.pt", "scheduler.pt")  # what a resumed run reads besides the weights
_VERIFIED: set[tuple] = set()  # weight files whose sha256 matched, by path, size, mtime, inode and digest
SUFFIX_WEIGHTS_NAME = "suffix.safetensors"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A saved folder cannot be read: no metadata, a newer format, missing or truncated files."""


class BaseMismatchError(ValueError):
    """The base offered to a suffix-only checkpoint is not the one it was trained from."""


@dataclass
class FreezeMetadata:
    """What `hf_freeze.json` records beside a saved model.

    Attributes:
        format_version (`int`): version of this file's format (readers refuse newer ones).
        library_version (`str`): hf_freeze version that wrote it.
        base_model (`str`, *optional*): the base's Hub id (or local path when it has none).
        base_revision (`str`, *optional*): the base's Hub revision.
        boundary (`int`, *optional*): frozen blocks; `None` when nothing was frozen.
        num_blocks (`int`): blocks of the model.
        blocks_path (`str`): dotted path of its blocks.
        untied (`list[str]`): parameters untied from the frozen embeddings (saved in the suffix).
        prefix_fingerprint (`str`, *optional*): `prefix_fingerprint(model, layout, boundary)` of the frozen prefix.
        timeline (`list[dict]`): the freeze events (step, epoch, boundary, reason).
        suffix_only (`bool`): whether the folder holds only the tensors outside the prefix.
        unit_digests (`list[str]`): digest of each prefix unit (0 = embeddings), to say where a base differs.
        architecture (`str`): the transformers class to rebuild (`config.architectures[0]`).
        weights (`dict[str, int]`): weight files of a suffix-only folder and their sizes in bytes.
        tied_to_prefix (`list[str]`): tensors tied to a prefix tensor, restored by the model's own tying.
        base_model_path (`str`, *optional*): the local folder the base was loaded from, when there was one.
        sha256 (`dict[str, str]`): the sha256 of each weight file in the folder, checked on load.
    """

    boundary: int | None
    num_blocks: int
    blocks_path: str
    suffix_only: bool
    architecture: str
    base_model: str | None = None
    base_revision: str | None = None
    base_model_path: str | None = None
    prefix_fingerprint: str | None = None
    unit_digests: list[str] = field(default_factory=list)
    untied: list[str] = field(default_factory=list)
    tied_to_prefix: list[str] = field(default_factory=list)
    timeline: list[dict[str, Any]] = field(default_factory=list)
    weights: dict[str, int] = field(default_factory=dict)
    sha256: dict[str, str] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    library_version: str = ""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, default=str) + "\n"


def read_metadata(directory: str | os.PathLike) -> FreezeMetadata:
    """Read `hf_freeze.json` from a saved folder.

    Raises:
        `CheckpointError`: the folder has no metadata, or it was written by a newer format version.

    Example:
        ```python
        meta = read_metadata("out/suffix")
        meta.boundary, meta.base_model
        ```
    """
    path = Path(directory) / METADATA_NAME
    if not path.is_file():
        raise CheckpointError(
            f"{directory} has no {METADATA_NAME}: it was not saved by hf_freeze (or the save was interrupted). "
            "Save it with `hf_freeze.checkpoint.save_suffix` / `save_pretrained`, or load a plain checkpoint with "
            "`from_pretrained`."
        )
    try:
        values = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON ({error}): the file is corrupt. Save the model again (or "
                              "download the whole folder again).") from error
    if not isinstance(values, dict):
        raise CheckpointError(f"{path} holds {type(values).__name__}, not hf_freeze's metadata object.")
    version = values.get("format_version", 0)
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format version {version}, newer than this hf_freeze reads ({FORMAT_VERSION}; written by "
            f"hf_freeze {values.get('library_version', '?')}). Upgrade hf_freeze: `pip install -U hf-freeze`."
        )
    fields = dataclasses.fields(FreezeMetadata)
    missing = [f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
               and f.name not in values]
    if missing:
        raise CheckpointError(f"{path} lacks {missing}: it is incomplete or was not written by hf_freeze. Save the "
                              "model again.")
    known = {f.name for f in fields}
    return FreezeMetadata(**{k: v for k, v in values.items() if k in known})


def save_suffix(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    tokenizer: Any | None = None,
    base_model: str | None = None,
    base_revision: str | None = None,
    timeline: list[dict[str, Any]] | None = None,
) -> Path:
    """Save only what is not in the frozen prefix, bound to the prefix's fingerprint.

    Writes `config.json`, `suffix.safetensors` (blocks `[k, L)`, the head, untied tensors), `hf_freeze.json` and
    the tokenizer, into a temporary folder renamed into place. A model sharded with FSDP2: call it on every rank
    (the shards are gathered one tensor at a time; rank 0 writes, the others wait for it).

    Args:
        model (`PreTrainedModel`): a model frozen with `freeze_prefix` (boundary `k`).
        directory (`str` or `os.PathLike`): where to save.
        tokenizer (*optional*): saved beside the weights.
        base_model (`str`, *optional*): the base's Hub id or path; default: from `model.config._name_or_path`
            (a packaged model's folder is recorded by its Hub id).
        base_revision (`str`, *optional*): the base's Hub revision.
        timeline (`list[dict]`, *optional*): the freeze events (e.g. `FreezeCallback.timeline`).

    Returns:
        `Path`: the folder.

    Example:
        ```python
        freeze_prefix(model, 4); trainer.train()
        save_suffix(model, "out/suffix", tokenizer=tokenizer, base_model="sentence-transformers/all-MiniLM-L6-v2")
        ```
    """
    boundary = frozen_boundary(model)
    if boundary is None:
        raise ValueError(
            "save_suffix needs a frozen prefix, and nothing is frozen on this model. Freeze it "
            "(`hf_freeze.freeze_prefix(model, k)`) or save a full checkpoint with "
            "`hf_freeze.checkpoint.save_pretrained`."
        )
    layout = get_layout(model)
    prefix_keys, tied = _split_state_dict(model, layout, boundary)
    suffix = {  # FSDP2 shards are gathered whole (every rank takes part), one tensor at a time
        name: full_tensor(tensor.detach()).to("cpu").contiguous().clone()
        for name, tensor in model.state_dict().items()
        if name not in prefix_keys and name not in tied
    }
    metadata = _metadata(model, layout, boundary, suffix_only=True, tied=sorted(tied), base_model=base_model,
                         base_revision=base_revision, timeline=timeline)
    if is_fsdp2(model) and not is_main_rank():
        return _after_writer(Path(directory))
    _warn_if_prefix_trained(metadata)

    def write_model(folder: Path) -> None:
        model.config.architectures = [model_class(model).__name__]  # as `save_pretrained` does
        model.config.save_pretrained(folder)
        if getattr(model, "generation_config", None) is not None and getattr(model, "can_generate", lambda: 0)():
            model.generation_config.save_pretrained(folder)
        save_file(suffix, str(folder / SUFFIX_WEIGHTS_NAME), metadata={"format": "pt"})
        metadata.weights = {SUFFIX_WEIGHTS_NAME: (folder / SUFFIX_WEIGHTS_NAME).stat().st_size}

    return _after_writer(_save_folder(directory, write_model, tokenizer, metadata), sharded=is_fsdp2(model))


def save_pretrained(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    tokenizer: Any | None = None,
    base_model: str | None = None,
    base_revision: str | None = None,
    timeline: list[dict[str, Any]] | None = None,
    **save_kwargs: Any,
) -> Path:
    """Save a full checkpoint (`model.save_pretrained`) plus `hf_freeze.json`, through a temporary folder. A model
    sharded with FSDP2: call it on every rank (as `save_suffix`).

    Args:
        model (`PreTrainedModel`): frozen or not.
        directory (`str` or `os.PathLike`): where to save.
        tokenizer, base_model, base_revision, timeline: as in `save_suffix`.
        **save_kwargs: passed to `model.save_pretrained` (e.g. `max_shard_size`).

    Returns:
        `Path`: the folder.
    """
    metadata = full_metadata(model, base_model=base_model, base_revision=base_revision, timeline=timeline)
    save_kwargs.setdefault("state_dict", state_dict_for_save(model))
    if is_fsdp2(model) and not is_main_rank():
        return _after_writer(Path(directory))
    folder = _save_folder(directory, lambda folder: model.save_pretrained(folder, **save_kwargs), tokenizer, metadata)
    return _after_writer(folder, sharded=is_fsdp2(model))


def state_dict_for_save(model: nn.Module) -> dict[str, torch.Tensor]:
    """`model.state_dict()`, with tensors still shared between two names copied apart once the config no longer
    ties them: freezing unties `lm_head` from the embeddings and sets `tie_word_embeddings=False`, and a tensor the
    two heads still share (e.g. BERT's `decoder.bias` / `predictions.bias`) would otherwise be saved once and not
    tied again on load. Blocks that Accelerate offloaded (`device_map`, `offload_frozen`) sit on `meta`: their real
    weights are read from the offload hooks. Under FSDP2 every rank must call it: shards are gathered whole, to the
    CPU, one tensor at a time."""
    if is_fsdp2(model):
        return {name: full_tensor(t.detach()).to("cpu") for name, t in model.state_dict().items()}
    state = materialized_state_dict(model)
    if getattr(getattr(model, "config", None), "tie_word_embeddings", True):
        return state
    seen: set[int] = set()
    for name, tensor in state.items():
        if tensor.data_ptr() in seen:
            state[name] = tensor.clone()
        seen.add(tensor.data_ptr())
    return state


def full_metadata(model: nn.Module, *, base_model: str | None = None, base_revision: str | None = None,
                  timeline: list[dict[str, Any]] | None = None) -> FreezeMetadata:
    """The metadata of a full checkpoint of `model` (what `save_pretrained` and `FreezeTrainer` saves write)."""
    boundary = frozen_boundary(model)
    layout = get_layout(model)
    return _metadata(model, layout, boundary, suffix_only=False, tied=[], base_model=base_model,
                     base_revision=base_revision, timeline=timeline)


def write_metadata(directory: str | os.PathLike, metadata: FreezeMetadata) -> Path:
    """Write `hf_freeze.json` into `directory`, atomically, with the sha256 of the weight files already there
    (`metadata.sha256` is set to them)."""
    metadata.sha256 = weight_checksums(directory)
    path = Path(directory) / METADATA_NAME
    write_text_atomic(path, metadata.to_json())
    return path


def weight_checksums(directory: str | os.PathLike) -> dict[str, str]:
    """`{file name: sha256}` of the weight files in `directory` (`*.safetensors`, `pytorch_model*.bin`)."""
    return {path.name: _sha256(path) for path in sorted(Path(directory).iterdir()) if _is_weight_file(path.name)}


def verify_checksums(directory: str | os.PathLike, metadata: FreezeMetadata) -> None:
    """Check every weight file `hf_freeze.json` recorded against its sha256 (metadata of older versions records
    none, and nothing is checked).

    Raises:
        `CheckpointError`: naming the file that is missing or whose bytes changed, and the fix.
    """
    _verify_sha256(directory, metadata.sha256, METADATA_NAME,
                   "Download it again (or save the model again); nothing was loaded.")


def record_trainer_checkpoint(folder: str | os.PathLike) -> Path:
    """Write the sha256 of a `Trainer` checkpoint's weight, optimizer and scheduler files into
    `folder/hf_freeze_checksums.json` (atomically), for `verify_trainer_checkpoint` to check on resume."""
    folder = Path(folder)
    names = sorted(p.name for p in folder.iterdir() if _is_weight_file(p.name) or p.name in _TRAINER_STATE_FILES)
    path = folder / TRAINER_CHECKSUMS_NAME
    write_text_atomic(path, json.dumps({"sha256": {name: _sha256(folder / name) for name in names}}, indent=2))
    return path


def verify_trainer_checkpoint(folder: str | os.PathLike) -> bool:
    """Check a `Trainer` checkpoint's files against the sha256 `record_trainer_checkpoint` wrote; `False` when the
    folder has no record (saved without hf_freeze, or by an older version).

    Raises:
        `CheckpointError`: a recorded file is missing or its bytes changed (named, with the fix), or the record is
            unreadable.
    """
    path = Path(folder) / TRAINER_CHECKSUMS_NAME
    if not path.is_file():
        return False
    try:
        recorded = json.loads(path.read_text())["sha256"]
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{path} is unreadable ({error}); delete it to resume without the check.") from None
    _verify_sha256(folder, recorded, TRAINER_CHECKSUMS_NAME,
                   f"Resume from an earlier checkpoint; training stopped before its first step. (If this folder was "
                   f"saved again over an older run's and the record is the older one's, delete {path} to resume "
                   f"unchecked.)")
    return True


def _verify_sha256(directory: str | os.PathLike, sha256: dict[str, str], record: str, fix: str) -> None:
    """Each file of `sha256` (`{name: digest}`, as `record` lists them) exists in `directory` with that digest."""
    for name, expected in sha256.items():
        path = Path(directory) / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing, but {record} lists it among the saved files: the folder is "
                                  f"incomplete. {fix}")
        stat = path.stat()
        seen = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino, expected)
        if seen in _VERIFIED:  # checked in this process and not rewritten since (a command checks, then loads)
            continue
        actual = _sha256(path)
        if actual == expected:
            _VERIFIED.add(seen)
        else:
            raise CheckpointError(
                f"{path} is corrupt: its sha256 is {actual}, but {record} recorded {expected} when it was saved "
                f"(the file was truncated or changed after saving, or a download was damaged). {fix}"
            )


def load_suffix(directory: str | os.PathLike, base: Any = None, **from_pretrained_kwargs: Any) -> nn.Module:
    """Load a checkpoint saved by `save_suffix` (or `save_pretrained`) onto its base, frozen at its boundary.

    Args:
        directory (`str` or `os.PathLike`): a local folder or a Hub repo id (downloaded with `snapshot_download`).
        base (*optional*): `None` (the base named in the metadata), a model object, or a path / Hub id. With a model
            object, the returned model's frozen-prefix tensors ARE the base's tensors (shared, not copied), so many
            fine-tunes of one base hold one prefix in memory; they get `requires_grad=False`.
        **from_pretrained_kwargs: passed to `from_pretrained` when a base (or a full checkpoint) is loaded
            (`dtype`, `token`, ...); `revision` is the checkpoint repo's (the base's comes from the metadata).

    Returns:
        `PreTrainedModel`: the fine-tuned model, frozen at the saved boundary (`freeze_prefix`).

    Raises:
        `CheckpointError`: no metadata, a newer format, a missing or truncated weight file.
        `BaseMismatchError`: the base's prefix fingerprint differs, or it has another number of blocks.

    Example:
        ```python
        base = AutoModel.from_pretrained("sentence-transformers/all-MiniLM-L6-v2")
        sentiment = load_suffix("out/sentiment", base=base)   # shares base's embeddings and blocks 0..3
        topics = load_suffix("out/topics", base=base)
        ```
    """
    revision = from_pretrained_kwargs.pop("revision", None)
    folder = _local_folder(directory, revision, from_pretrained_kwargs.get("token"))
    metadata = read_metadata(folder)
    cls = _architecture(metadata)
    if not metadata.suffix_only:
        verify_checksums(folder, metadata)
        model = cls.from_pretrained(folder, **from_pretrained_kwargs)
        if metadata.boundary is not None:
            if isinstance(base, nn.Module):  # share the base's prefix, once it is shown to be the same
                check_base(base, metadata, where=str(folder))
                _share_prefix(model, base, metadata, str(folder))
            elif base is not None:
                raise TypeError("A full checkpoint holds its own prefix: pass `base` only as a model object, to "
                                f"share that model's prefix tensors (got {type(base).__name__}).")
            freeze_prefix(model, metadata.boundary)
        return model
    base_model = resolve_base(base, metadata, **from_pretrained_kwargs)
    base_layout = get_layout(base_model)
    check_base(base_model, metadata, where=str(folder), layout=base_layout)
    suffix = _read_suffix(folder, metadata)
    config = transformers.AutoConfig.from_pretrained(folder)
    dtype = next(iter(base_model.parameters())).dtype
    # The suffix goes where the base's last frozen block computes (the base's device, unless it was dispatched).
    device = execution_device(base_layout.unit_modules(metadata.boundary)[0])
    # No random init: every parameter is then shared from the base, copied from the suffix or tied (checked in
    # `_load_suffix_tensors`), and the uninitialized prefix memory is released as soon as it is shared.
    with initialization.no_init_weights(), torch.device(device):
        model = cls._from_config(config, dtype=dtype)
    _share_prefix(model, base_model, metadata, str(folder))
    _load_suffix_tensors(model, suffix, metadata, str(folder))
    model.eval()
    freeze_prefix(model, metadata.boundary)
    return model


def is_hub_id(name: Any) -> bool:
    """Whether `name` reads as a Hub repo id (`user/name`) rather than a local path.

    Example:
        ```python
        is_hub_id("sentence-transformers/all-MiniLM-L6-v2"), is_hub_id("./out/suffix")  # (True, False)
        ```
    """
    return (isinstance(name, str) and name.count("/") == 1 and not name.startswith((".", "/", "~"))
            and not Path(name).exists())


def load_pretrained(path: str | os.PathLike, **kwargs: Any) -> nn.Module:
    """`from_pretrained` with the class the folder's config names (`architectures[0]`), else `AutoModel`."""
    config = transformers.AutoConfig.from_pretrained(path)
    names = getattr(config, "architectures", None) or []
    cls = getattr(transformers, names[0], None) if names else None
    return (cls or transformers.AutoModel).from_pretrained(path, **kwargs)


def check_base(base: nn.Module, metadata: FreezeMetadata, *, where: str = "the checkpoint",
               layout: BlockLayout | None = None) -> None:
    """Refuse a base whose blocks or prefix fingerprint differ from what the checkpoint was trained on.

    Raises:
        `BaseMismatchError`: naming both fingerprints, the boundary and the fix.
    """
    layout = layout or get_layout(base)
    boundary = metadata.boundary
    if layout.num_blocks != metadata.num_blocks:
        raise BaseMismatchError(
            f"{where} was trained on a base with {metadata.num_blocks} blocks; this base "
            f"({describe_model(base)}) has {layout.num_blocks}. Load it "
            f"onto its own base: {metadata.base_model or 'the base it was saved from'}."
        )
    digests = unit_digests(base, layout, boundary, frozen_boundary=frozen_boundary(base))
    actual = chain_digests(digests)
    if actual == metadata.prefix_fingerprint:
        return
    first = next((i for i, (a, b) in enumerate(zip(digests, metadata.unit_digests)) if a != b), None)
    where_differs = "" if first is None else (
        f" It first differs at unit {first} ({'the embeddings' if first == 0 else f'block {first - 1}'})."
    )
    raise BaseMismatchError(
        f"{where} was fine-tuned with the embeddings and blocks [0, {boundary}) frozen, and its prefix fingerprint "
        f"is {metadata.prefix_fingerprint}; this base ({describe_model(base)}) has "
        f"{actual} at boundary {boundary}.{where_differs} Its frozen weights are not the ones the suffix was trained "
        f"on. Pass the base it was saved from: {metadata.base_model or '?'}"
        + (f" (revision {metadata.base_revision})" if metadata.base_revision else "") + "."
    )


def describe_model(model: nn.Module) -> str:
    """How errors name a model: its class and where it was loaded from (`config._name_or_path`), when known.

    Example:
        ```python
        describe_model(AutoModel.from_pretrained("out/base"))  # 'BertModel from out/base'
        describe_model(BertModel(config))                      # 'BertModel built in memory (no path or Hub id)'
        ```
    """
    source = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")
    return f"{type(model).__name__} from {source}" if source else (
        f"{type(model).__name__} built in memory (no path or Hub id)")


def hub_id_of_folder(path: str | os.PathLike) -> tuple[str, str | None] | None:
    """`(Hub id, revision)` of a local model folder when it is known: a packaged model's folder, or a snapshot in
    the Hugging Face cache (`.../models--org--name/snapshots/<revision>`); else `None`.

    Example:
        ```python
        hub_id_of_folder("~/.cache/huggingface/hub/models--org--name/snapshots/abc123")  # ('org/name', 'abc123')
        ```
    """
    from .assets import hub_id_for_path

    packaged = hub_id_for_path(path)
    if packaged is not None:
        return packaged, None
    parts = Path(path).expanduser().resolve().parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        repo = parts[-3].removeprefix("models--").split("--")
        if len(repo) == 2 and all(repo):
            return "/".join(repo), parts[-1]
    return None


def prefix_trained_steps(metadata: FreezeMetadata) -> int:
    """Optimizer steps the frozen prefix trained before its last unit froze (0: it froze before the first step,
    so it holds the weights it was loaded with)."""
    return max((int(event.get("step", 0)) for event in metadata.timeline), default=0)


# ---- helpers ----


def _save_folder(directory: str | os.PathLike, write_model: Callable[[Path], None], tokenizer: Any | None,
                 metadata: FreezeMetadata) -> Path:
    """Write the model, the tokenizer and, last, `hf_freeze.json` into a temporary folder renamed to `directory`."""

    def write(folder: Path) -> None:
        write_model(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        write_metadata(folder, metadata)

    return write_folder_atomic(directory, write, last=METADATA_NAME)


def _after_writer(folder: Path, sharded: bool = True) -> Path:
    """Under FSDP2, every rank returns once the writer (rank 0) has written `folder`."""
    if sharded and is_distributed():
        torch.distributed.barrier()
    return folder


def _metadata(model: nn.Module, layout: BlockLayout, boundary: int | None, *, suffix_only: bool, tied: list[str],
              base_model: str | None, base_revision: str | None, timeline: list[dict[str, Any]] | None
              ) -> FreezeMetadata:
    from . import __version__

    config = model.config
    name_or_path = str(getattr(config, "_name_or_path", "") or "") or None
    local_path = None
    if name_or_path and Path(name_or_path).is_dir():
        local_path = str(Path(name_or_path).resolve())
        known = hub_id_of_folder(name_or_path)  # a packaged model, or a snapshot in the Hugging Face cache
        if base_model is None and known is not None:
            base_model, base_revision = known[0], base_revision or known[1]
    if base_model is None and name_or_path:
        base_model = name_or_path
    digests = [] if boundary is None else unit_digests(model, layout, boundary, frozen_boundary=boundary)
    return FreezeMetadata(
        boundary=boundary,
        num_blocks=layout.num_blocks,
        blocks_path=layout.blocks_path,
        suffix_only=suffix_only,
        architecture=model_class(model).__name__,  # not FSDP2's `FSDP<Model>`
        base_model=base_model,
        base_revision=base_revision,
        base_model_path=local_path,
        prefix_fingerprint=None if boundary is None else chain_digests(digests),
        unit_digests=digests,
        untied=untied_parameters(model),
        tied_to_prefix=tied,
        timeline=list(timeline or []),
        library_version=__version__,
    )


def _is_weight_file(name: str) -> bool:
    return name.endswith(".safetensors") or (name.startswith("pytorch_model") and name.endswith(".bin"))


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _module_names(model: nn.Module) -> dict[int, str]:
    return {id(module): name for name, module in model.named_modules()}


def _split_state_dict(model: nn.Module, layout: BlockLayout, boundary: int) -> tuple[set[str], set[str]]:
    """(state_dict keys inside the prefix, keys outside it whose tensor IS a prefix tensor, i.e. tied to it)."""
    names = _module_names(model)
    prefixes = tuple(names[id(m)] + "." for m in layout.prefix_modules(boundary))
    state = model.state_dict(keep_vars=True)
    prefix_keys = {k for k in state if k.startswith(prefixes)}
    prefix_tensors = {id(state[k]) for k in prefix_keys}
    tied = {k for k, v in state.items() if k not in prefix_keys and id(v) in prefix_tensors}
    return prefix_keys, tied


def _local_folder(directory: str | os.PathLike, revision: str | None, token: str | bool | None) -> Path:
    """`directory` itself, or the download of the Hub repo it names."""
    if Path(directory).is_dir():
        return Path(directory)
    if is_hub_id(directory):
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(directory, revision=revision, token=token))
        except Exception as error:  # offline, not found, no access: say what was tried
            raise CheckpointError(f"{directory} is not a local folder, and downloading it as a Hub repo failed "
                                  f"({type(error).__name__}: {str(error).splitlines()[0]}). Pass the folder "
                                  "save_suffix wrote, or a repo id you can read.") from error
    raise CheckpointError(f"{directory} is neither a folder nor a Hub repo id (`user/name`). Pass the folder that "
                          "save_suffix wrote, or the repo it was pushed to.")


def _architecture(metadata: FreezeMetadata) -> type:
    cls = getattr(transformers, metadata.architecture, None)
    if cls is None:
        raise CheckpointError(f"The checkpoint's class `{metadata.architecture}` is not in this transformers "
                              f"({transformers.__version__}). Upgrade transformers to load it.")
    return cls


def resolve_base(base: Any, metadata: FreezeMetadata, **kwargs: Any) -> nn.Module:
    """The base as a model object: `base` itself, or loaded from a path / Hub id (default: the metadata's) with
    `AutoModel` (the prefix and its fingerprint are the same in every head class)."""
    if isinstance(base, nn.Module):
        return base
    if base is None:
        base = _base_source(metadata)
        kwargs = {"revision": metadata.base_revision, **kwargs} if metadata.base_revision else kwargs
    if not isinstance(base, (str, os.PathLike)):
        raise TypeError(f"`base` must be None, a model or a path / Hub id, got {type(base).__name__}.")
    kwargs = {k: v for k, v in kwargs.items() if k != "num_labels"}
    # Loading a task checkpoint's base class reports its head as unexpected: that is the point here, not news.
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        return transformers.AutoModel.from_pretrained(base, **kwargs)
    finally:
        transformers.logging.set_verbosity(verbosity)


def _base_source(metadata: FreezeMetadata) -> str:
    """Where to load the metadata's base from: a packaged offline copy of its Hub id, its local folder, the Hub."""
    from .assets import local_path_for_hub_id

    if metadata.base_model is None:
        raise CheckpointError("The checkpoint does not name its base model; pass `base=` (a model, path or Hub id).")
    local = local_path_for_hub_id(metadata.base_model)
    if local is not None:
        return str(local)
    if Path(metadata.base_model).is_dir():
        return metadata.base_model
    if metadata.base_model_path and Path(metadata.base_model_path).is_dir():
        return metadata.base_model_path
    return metadata.base_model


def _read_suffix(folder: Path, metadata: FreezeMetadata) -> dict[str, torch.Tensor]:
    path = folder / SUFFIX_WEIGHTS_NAME
    if not path.is_file():
        raise CheckpointError(f"{folder} has no {SUFFIX_WEIGHTS_NAME}: the save was interrupted or the file was "
                              "deleted. Save the suffix again (or download the whole folder).")
    expected = metadata.weights.get(SUFFIX_WEIGHTS_NAME)
    size = path.stat().st_size
    if expected is not None and size != expected:
        raise CheckpointError(f"{path} is {size} bytes, but {expected} were saved: the file is truncated or "
                              "corrupt. Download or save it again.")
    verify_checksums(folder, metadata)
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as error:  # safetensors raises its own error type for a malformed header or short file
        raise CheckpointError(f"{path} cannot be read ({error}): the file is truncated or corrupt. Download or "
                              "save it again.") from error


def _share_prefix(model: nn.Module, base: nn.Module, metadata: FreezeMetadata, where: str) -> None:
    """Make `model`'s prefix tensors the base's own tensors (parameters and buffers), unit by unit."""
    layout, base_layout = get_layout(model), get_layout(base)
    if len(layout.embeddings) != len(base_layout.embeddings):
        raise BaseMismatchError(f"{where}: the base's embeddings ({base_layout.embedding_names}) do not match the "
                                f"model's ({layout.embedding_names}); pass the base it was saved from.")
    pairs = [(m, b) for unit in range(metadata.boundary + 1)
             for m, b in zip(layout.unit_modules(unit), base_layout.unit_modules(unit))]
    for module, base_module in pairs:
        base_modules = dict(base_module.named_modules())
        for name, sub in module.named_modules():
            other = base_modules.get(name)
            if other is None or type(other) is not type(sub):
                raise BaseMismatchError(f"{where}: the base has no `{name}` like the model's "
                                        f"{type(sub).__name__}; pass the base it was saved from.")
            for key in list(sub._parameters):
                sub._parameters[key] = other._parameters[key]
            for key in list(sub._buffers):
                sub._buffers[key] = other._buffers[key]
    if metadata.tied_to_prefix and hasattr(model, "tie_weights"):
        model.tie_weights()


def _load_suffix_tensors(model: nn.Module, suffix: dict[str, torch.Tensor], metadata: FreezeMetadata,
                         where: str) -> None:
    prefix_keys, tied = _split_state_dict(model, get_layout(model), metadata.boundary)
    expected = {k for k in model.state_dict() if k not in prefix_keys and k not in tied}
    inside = sorted(set(suffix) & prefix_keys)
    if inside:
        raise CheckpointError(f"{where} holds tensors of the frozen prefix at boundary {metadata.boundary} "
                              f"(e.g. {inside[:3]}): it was saved at another boundary than its metadata says. "
                              "Save the suffix again.")
    missing, unexpected = sorted(expected - set(suffix)), sorted(set(suffix) - expected)
    if missing or unexpected:
        raise CheckpointError(f"{where} does not fit {metadata.architecture} at boundary {metadata.boundary}: "
                              f"missing {missing[:5]}, unexpected {unexpected[:5]}. Save the suffix again with "
                              "this version of the model.")
    with torch.no_grad():
        state = model.state_dict(keep_vars=True)
        for name, tensor in suffix.items():
            state[name].copy_(tensor)


def _warn_if_prefix_trained(metadata: FreezeMetadata) -> None:
    """A prefix frozen after training began (an automatic policy) holds trained weights, not the base's: the suffix
    then loads only onto a model holding that trained prefix, and `load_suffix` refuses the original base."""
    # `base_restored`: FreezeConfig(shareable_prefix=True) put the base's weights back when the units froze
    late = [event for event in metadata.timeline if event.get("step", 0) > 0 and not event.get("base_restored")]
    if late:
        logger.warning(
            "hf_freeze: the frozen prefix trained for %d optimizer steps before it froze (%s), so it is not %s's "
            "prefix: this suffix loads only onto a model that holds the trained prefix (e.g. the full checkpoint "
            "that `save_pretrained` writes), and `load_suffix` will refuse the original base. To share the base's "
            "prefix, freeze before the first step (`FreezeConfig(policy='fixed', boundary=k)`) or train with "
            "`FreezeConfig(shareable_prefix=True)`.",
            late[0]["step"], ", ".join(f"step {e['step']}: boundary {e['boundary']}" for e in late),
            metadata.base_model or "the base",
        )
