"""Serve one base model and any number of its fine-tunes, running the frozen prefix they share once per batch.

A fine-tune frozen at boundary `k` has the base's own embeddings and blocks `[0, k)`. For a batch that mixes
requests for several such models, the engine runs the base's prefix once for every row up to the smallest
boundary present, advances each group of rows with a larger boundary from there, and then runs each model's own
forward with its frozen blocks replaced by those states (`PrefixRunner.inject_states`): one suffix forward per
model present. Rows with the same token ids (one text sent to several fine-tunes) run the prefix and each advance
once, and their states go to every model that needs them. Everything goes through the models' own `forward`, so
there is no per-family code.

Generation shares the frozen layers at every decoding step, KV cache included (`generation.py`, driven by the
continuous-batching `scheduler.py`; both read this engine's public surface, the engine imports neither). Requests,
results and errors are in `requests.py`; the repeated-input cache in `prefix_cache.py`.

The engine owns the models it serves: a model object passed in is deep-copied (and cast to the engine's dtype), so
the stand-in blocks swapped in during a batch are never seen by whoever else holds that object; models the engine
loads itself (`from_pretrained`, `load_model`) are not copied.
"""

from __future__ import annotations

import copy
import inspect
import logging
import threading
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.models.auto import modeling_auto

from ..cache.runner import PrefixRunner
from ..fingerprint import chain_digests, prefix_fingerprint, unit_digests
from ..freezing import frozen_boundary, get_layout
from ..layout import execution_device
from .kv_cache import Clock, partial_cache
from .limits import batch_pad_id, usable_positions
from .prefix_cache import StateCache
from .requests import (
    BaseMismatchServingError,
    GenerationRequest,
    Request,
    ServingError,
    UnknownModelError,
    WrongTaskError,
    validate_generation,
)

logger = logging.getLogger(__name__)
TASKS = ("predict", "embed", "score", "generate")
_DEFAULT_CACHE_BYTES = 256 * 2**20


@dataclass
class ServedModel:
    """A model the engine serves.

    Attributes:
        name (`str`): the name requests use.
        model (`nn.Module`): the model, in eval mode.
        boundary (`int`): blocks `[0, boundary)` (and the embeddings) are the base's own; the base itself has
            `boundary = num_blocks`; `0` means nothing beyond the embeddings is shared (no prefix to share).
        tasks (`tuple[str, ...]`): what it can do (`predict`, `embed`, `score`, `generate`).
        pooling (`str`): `mean` or `cls`, for `embed`.
        parent (`str | None`): the base's name for a fine-tune.
        runner (`PrefixRunner`): runs the model with its frozen blocks replaced by given boundary states.
        max_input_tokens (`int | None`): tokens an input may have (`limits.usable_positions`: the model's
            positions, minus those its family skips), when the model has positions.
        shares_prefix (`bool`): whether its rows run through the base's prefix (the engine shares, `boundary >= 1`,
            and its config agrees with the base's on everything the prefix computes with).
        unshared_reason (`str | None`): why a fine-tune with a boundary does not share the prefix.
    """

    name: str
    model: nn.Module
    boundary: int
    tasks: tuple[str, ...]
    pooling: str
    parent: str | None
    runner: PrefixRunner = field(repr=False)
    max_input_tokens: int | None = None
    shares_prefix: bool = False
    unshared_reason: str | None = None

    def describe(self) -> dict[str, Any]:
        """JSON-ready summary (for `GET /info`)."""
        config = getattr(self.model, "config", None)
        id2label = getattr(config, "id2label", None) if "predict" in self.tasks else None
        return {"name": self.name, "parent": self.parent, "architecture": type(self.model).__name__,
                "boundary": self.boundary, "tasks": list(self.tasks), "pooling": self.pooling,
                "id2label": {str(k): v for k, v in id2label.items()} if id2label else None,
                "max_input_tokens": self.max_input_tokens, "shares_prefix": self.shares_prefix,
                "unshared_reason": self.unshared_reason}


class ServingEngine:
    """One base and its fine-tunes, served through the shared frozen prefix.

    Args:
        base (`nn.Module`): the base model (any transformers model; its own task head is served under `base_name`).
        base_name (`str`, defaults to `"base"`): name of the base in requests (a request without `model` uses it).
        pooling (`str`, *optional*): `"mean"` or `"cls"` for `embed`; default: the sentence-transformers pooling
            config next to the base (`1_Pooling/config.json`) when present, else mean.
        cache_bytes (`int`, defaults to 256 MiB): budget of the repeated-input cache of boundary states; 0 disables.
        share_prefix (`bool`, defaults to `True`): `False` runs every model's full forward on its own rows (the
            baseline that the shared prefix is measured against).
        max_padding (`float`, *optional*, defaults to 0.25): a batch is split by length into forwards whose padding
            stays within this fraction of their real tokens (padding is wasted compute); `None` never splits.
        source (`str`, *optional*): the base's folder, for its sentence-transformers pooling config and `/info`.
        dtype (`torch.dtype | str`, *optional*): the dtype every served model computes in (`"float32"`,
            `"bfloat16"`, `"float16"` or a `torch.dtype`); default: the base's. Fine-tunes are cast to it.
        copy (`bool`, defaults to `True`): deep-copy `base` (the engine owns what it serves; see the module
            docstring). `False` takes the object itself, for callers that hand over a model nobody else uses.

    Attributes:
        cache_counts (`dict[str, list[int]]`): per served model, its requests' repeated-input cache `[hits,
            misses]` (what `/metrics` labels with `model`); a removed model's entry goes with it.
        lock (`threading.Lock`): held while a batch runs the served models (stand-in blocks are swapped into them);
            whoever else runs them (the generation scheduler) holds it too.

    Example:
        ```python
        engine = ServingEngine(base_model)
        engine.add_model("sst2", finetuned)       # frozen at k with freeze_prefix, prefix == base's
        engine.predict([Request([101, 2023, 102], model="sst2")])  # [logits tensor]
        ```
    """

    def __init__(self, base: nn.Module, *, base_name: str = "base", pooling: str | None = None,
                 cache_bytes: int = _DEFAULT_CACHE_BYTES, share_prefix: bool = True,
                 max_padding: float | None = 0.25, source: str | Path | None = None,
                 dtype: torch.dtype | str | None = None, copy: bool = True) -> None:
        dtype = resolve_dtype(dtype) if dtype is not None else "auto"
        self.dtype: torch.dtype = next(base.parameters()).dtype if dtype == "auto" else dtype
        self.base = _owned(base, self.dtype, copy)
        base = self.base
        self.base_layout = get_layout(base)
        self.base_runner = PrefixRunner(base, self.base_layout)
        self.num_blocks = self.base_layout.num_blocks
        self.base_name = base_name
        self.source = str(source) if source is not None else None
        self.share_prefix = share_prefix
        if max_padding is not None and max_padding < 0:
            raise ValueError(f"`max_padding` must be >= 0 or None, got {max_padding}.")
        self.max_padding = max_padding
        self.pooling = pooling or _sentence_transformers_pooling(source) or "mean"
        if self.pooling not in ("mean", "cls"):
            raise ValueError(f"`pooling` must be 'mean' or 'cls', got {self.pooling!r}.")
        self.fingerprint = prefix_fingerprint(base, self.base_layout, self.num_blocks)
        self._prefix_fingerprints: dict[int, str] = {self.num_blocks: self.fingerprint}
        self.cache = StateCache(cache_bytes)
        self.models: dict[str, ServedModel] = {}
        self.cache_counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # model -> [hits, misses]
        self.lock = threading.Lock()  # one batch at a time: inject_states swaps modules in place
        self._register(base_name, base, self.num_blocks, parent=None)

    # ----------------------------------------------------------------------------------------------- models
    def add_model(self, name: str, model: nn.Module, boundary: int | None = None) -> ServedModel:
        """Serve `model` under `name`; its embeddings and blocks `[0, boundary)` must equal the base's.

        Args:
            name (`str`): request name; must be new.
            model (`nn.Module`): a fine-tune of the base (same architecture of blocks).
            boundary (`int`, *optional*): shared blocks; default: the model's frozen boundary (`freeze_prefix`).

        Raises:
            `BaseMismatchServingError`: the model's prefix differs from the base's (both fingerprints named).

        The engine serves its own deep copy of `model`, cast to the engine's dtype; a model whose config differs
        from the base's in a field that changes the prefix's outputs (`rope_theta`, `layer_norm_eps`, ...) is
        served with its own full forward (`shares_prefix=False`, the field named in `unshared_reason`).
        """
        return self._add(name, _owned(model, self.dtype, True), boundary)

    def _add(self, name: str, model: nn.Module, boundary: int | None) -> ServedModel:
        """`add_model` for a model the engine already owns (loaded by it, in its dtype)."""
        if name in self.models:
            raise ValueError(f"A model named {name!r} is already served; choose another name.")
        boundary = frozen_boundary(model) if boundary is None else boundary
        if boundary is None:
            raise ValueError(f"Model {name!r} has no frozen prefix: freeze it with `freeze_prefix(model, k)` or pass "
                             "`boundary=` (the number of leading blocks it shares with the base).")
        layout = get_layout(model)
        if layout.num_blocks != self.num_blocks or not 0 <= boundary <= self.num_blocks:
            raise BaseMismatchServingError(
                f"Model {name!r} has {layout.num_blocks} blocks and boundary {boundary}; the base has "
                f"{self.num_blocks} blocks. A fine-tune must keep the base's block stack.")
        expected = self._base_prefix_fingerprint(boundary)
        found = prefix_fingerprint(model, layout, boundary, frozen_boundary=frozen_boundary(model))
        if found != expected:
            raise BaseMismatchServingError(
                f"Model {name!r} was not fine-tuned from this base: its prefix at boundary {boundary} has fingerprint "
                f"{found}, the base's has {expected} (both in {_dtype_name(self.dtype)}). Serve it with the base it "
                "was trained from, in the dtype it was trained in (`dtype=` / `--dtype`).")
        return self._register(name, model.eval(), boundary, parent=self.base_name)

    def load_model(self, name: str, path: str | Path) -> ServedModel:
        """Load a fine-tune from `path` and serve it under `name`.

        A folder saved by hf_freeze (suffix-only or full, with its freeze metadata) loads through
        `hf_freeze.checkpoint.load_suffix`: its frozen-prefix tensors become the base's own (shared, not copied),
        and a checkpoint of another base is refused there (`BaseMismatchError`, naming both fingerprints). A plain
        transformers folder loads with the class its config names; it shares the leading units (embeddings, then
        blocks) whose weights equal the base's, and is refused when not even its embeddings do.

        Safe while the engine serves (`hf-freeze serve`'s admin routes call it): the weight files are hashed (and
        a plain folder loaded) outside `lock`; reading a suffix onto the base's tensors and registering hold it.

        Raises:
            `BaseMismatchServingError`: `path` is a fine-tune of another base (the message names `path`).
            `CheckpointError`: a missing or corrupt weight file (sha256 checked).
            `ValueError`: `name` is already served.
        """
        from ..checkpoint import METADATA_NAME, BaseMismatchError, load_suffix, read_metadata, verify_checksums

        if name in self.models:  # before reading anything
            raise ValueError(f"A model named {name!r} is already served; choose another name.")
        # Hashing files (and loading a plain folder) runs outside the lock, so other requests keep being served;
        # what reads the base runs under it: a batch swaps stand-ins into the base's blocks while it runs the
        # base's own rows.
        if (Path(path) / METADATA_NAME).is_file():
            metadata = read_metadata(path)
            verify_checksums(path, metadata)  # remembered: load_suffix does not hash the files again
            with self.lock:
                try:
                    model = load_suffix(path, base=self.base, dtype=self.dtype)
                except BaseMismatchError as error:
                    raise BaseMismatchServingError(
                        f"Cannot serve {path} as {name!r} in {_dtype_name(self.dtype)}: {error} A checkpoint trained "
                        "in another dtype needs the engine in that dtype (`dtype=` / `--dtype`).") from error
                model = model.to(self.dtype)
                if metadata.boundary is not None:
                    return self._add(name, model, boundary=metadata.boundary)
                return self._add(name, model, boundary=self._shared_units(model, name, path))
        model = load_base(path, dtype=self.dtype)
        with self.lock:
            return self._add(name, model, boundary=self._shared_units(model, name, path))

    def remove_model(self, name: str) -> ServedModel:
        """Stop serving the fine-tune `name` (the base cannot be removed). Waits for the batch that is running;
        requests for it that are still queued then get an `UnknownModelError` (404: their batch fails, and the
        batcher answers its inputs one by one, which validates them again), while generations already decoding
        finish with the model they started with.

        Raises:
            `UnknownModelError`: `name` is not served.
            `ValueError`: `name` is the base.
        """
        if name == self.base_name:
            raise ValueError(f"{name!r} is the base; it cannot be removed (only its fine-tunes can).")
        with self.lock:
            served = self.models.pop(name, None)
            self.cache_counts.pop(name, None)
        if served is None:
            raise UnknownModelError(f"Unknown model {name!r}; served models: {sorted(self.models)}.")
        return served

    @classmethod
    def from_pretrained(cls, base_path: str | Path, models: Mapping[str, str | Path] | None = None,
                        **kwargs: Any) -> ServingEngine:
        """Load the base from `base_path` (the class its config names in `architectures`), then each fine-tune."""
        base = load_base(base_path, dtype=kwargs.pop("dtype", None) or torch.float32)
        engine = cls(base, source=base_path, copy=False, **kwargs)
        for name, path in (models or {}).items():
            engine.load_model(name, path)
        return engine

    def model_for(self, name: str | None, task: str) -> ServedModel:
        """The served model `name` (`None`: the base); raises `UnknownModelError` / `WrongTaskError`."""
        served = self.models.get(self.base_name if name is None else name)
        if served is None:
            raise UnknownModelError(f"Unknown model {name!r}; served models: {sorted(self.models)}.")
        if task not in served.tasks:
            raise WrongTaskError(f"Model {served.name!r} ({type(served.model).__name__}) cannot {task}; it serves "
                                 f"{list(served.tasks)}. Models that can {task}: "
                                 f"{sorted(n for n, m in self.models.items() if task in m.tasks)}.")
        return served

    # ------------------------------------------------------------------------------------------------ tasks
    @torch.no_grad()
    def predict(self, requests: Sequence[Request]) -> list[torch.Tensor]:
        """Sequence-classification logits `[num_labels]` for each request (float32, on the CPU)."""
        outputs = self._run("predict", requests)
        return [out.logits[row].float().cpu() for out, row in outputs]

    @torch.no_grad()
    def embed(self, requests: Sequence[Request]) -> list[torch.Tensor]:
        """Pooled last hidden state `[hidden]` for each request (mean or CLS, as `pooling` says)."""
        outputs = self._run("embed", requests)
        vectors = []
        for request, (out, row) in zip(requests, outputs):
            hidden = out.last_hidden_state[row, : len(request.input_ids)].float()
            vector = hidden[0] if self.pooling == "cls" else hidden.mean(0)
            if getattr(request, "normalize", False):
                vector = torch.nn.functional.normalize(vector, dim=-1)
            vectors.append(vector.cpu())
        return vectors

    @torch.no_grad()
    def score(self, requests: Sequence[Request]) -> list[torch.Tensor]:
        """Log-likelihood of each token given the ones before it (`[len(input_ids) - 1]`) under a causal LM."""
        outputs = self._run("score", requests)
        scores = []
        for request, (out, row) in zip(requests, outputs):
            n = len(request.input_ids)
            logprobs = torch.log_softmax(out.logits[row, : n - 1].float(), dim=-1)
            target = torch.as_tensor(list(request.input_ids[1:]), device=logprobs.device)
            scores.append(logprobs.gather(-1, target[:, None])[:, 0].cpu())
        return scores

    # ------------------------------------------------------------------------------------------- internals
    def _register(self, name: str, model: nn.Module, boundary: int, parent: str | None) -> ServedModel:
        tasks = _tasks_of(model)
        if "generate" in tasks:
            try:  # refused up front, not at the first request: generation needs full-attention KV caches
                partial_cache(model, self.num_blocks, 0, Clock())
            except ServingError as error:
                logger.warning("Model %r will not generate: %s", name, error)
                tasks = tuple(t for t in tasks if t != "generate")
        reason = None if parent is None else prefix_config_difference(self.base, model)
        if reason is not None and boundary >= 1:
            logger.warning("Model %r is served with its own full forward, not through the base's prefix: %s",
                           name, reason)
        served = ServedModel(name=name, model=model, boundary=boundary, tasks=tasks, pooling=self.pooling,
                             parent=parent, runner=PrefixRunner(model, get_layout(model)),
                             max_input_tokens=usable_positions(model),
                             shares_prefix=self.share_prefix and boundary >= 1 and reason is None,
                             unshared_reason=reason if boundary >= 1 else None)
        self.models[name] = served
        return served

    def _shared_units(self, model: nn.Module, name: str, path: str | Path) -> int:
        """Boundary up to which `model`'s weights equal the base's (its leading equal units, minus one)."""
        layout = get_layout(model)
        if layout.num_blocks != self.num_blocks:
            raise BaseMismatchServingError(f"Cannot serve {path} as {name!r}: it has {layout.num_blocks} blocks, the "
                                           f"base has {self.num_blocks}.")
        base_units = unit_digests(self.base, self.base_layout, self.num_blocks, frozen_boundary=self.num_blocks)
        units = unit_digests(model, layout, self.num_blocks)
        equal = next((i for i, (a, b) in enumerate(zip(base_units, units)) if a != b), len(units))
        if equal == 0:
            raise BaseMismatchServingError(
                f"Cannot serve {path} as {name!r}: it was not fine-tuned from this base (its embeddings have "
                f"fingerprint {chain_digests(units[:1])}, the base's have {chain_digests(base_units[:1])}).")
        return equal - 1

    def _base_prefix_fingerprint(self, boundary: int) -> str:
        if boundary not in self._prefix_fingerprints:
            self._prefix_fingerprints[boundary] = prefix_fingerprint(self.base, self.base_layout, boundary)
        return self._prefix_fingerprints[boundary]

    def _name(self, request: Request) -> str:
        return self.base_name if request.model is None else request.model

    def validate(self, task: str, requests: Sequence[Request]) -> None:
        """Refuse a bad batch before any work: unknown model, wrong task, empty or too long input, bad
        generation parameters (`ServingError` and subclasses, each naming the problem and the fix)."""
        if task not in TASKS:
            raise ValueError(f"Unknown task {task!r}; choose one of {list(TASKS)}.")
        for request in requests:
            if isinstance(request, GenerationRequest):
                validate_generation(request)
            elif task == "generate":
                raise ServingError(f"`generate` takes `GenerationRequest`s, got {type(request).__name__}.")
            served = self.model_for(request.model, task)
            if len(request.input_ids) == 0:
                raise ServingError("An input has no tokens; send at least one token.")
            vocab = getattr(getattr(served.model, "config", None), "vocab_size", None)
            if vocab and not all(0 <= t < vocab for t in request.input_ids):
                bad = next(t for t in request.input_ids if not 0 <= t < vocab)
                raise ServingError(f"Token id {bad} is outside the vocabulary of model {served.name!r} (ids 0 to "
                                   f"{vocab - 1}); encode the text with the model's tokenizer.")
            if task == "score" and len(request.input_ids) < 2:
                raise ServingError("Scoring needs at least two tokens (the first one is only context).")
            extra = getattr(request, "max_new_tokens", 0) or 0
            if served.max_input_tokens and len(request.input_ids) + extra > served.max_input_tokens:
                raise ServingError(f"An input of {len(request.input_ids)} tokens (+ {extra} new) exceeds the "
                                   f"{served.max_input_tokens} positions of model {served.name!r}; truncate it.")

    def _shares(self, served: ServedModel) -> bool:
        return served.shares_prefix

    def _run(self, task: str, requests: Sequence[Request]) -> list[tuple[Any, int]]:
        """Forward every request for `task`; returns, per request, (its model's output, its row in it)."""
        self.validate(task, requests)
        with self.lock:
            states = self._boundary_states(requests)
            by_model: dict[str, list[int]] = defaultdict(list)
            for i, request in enumerate(requests):
                by_model[self._name(request)].append(i)
            results: list[tuple[Any, int]] = [None] * len(requests)  # type: ignore[list-item]
            for name, model_rows in by_model.items():
                served = self.models[name]
                lengths = [len(requests[i].input_ids) for i in model_rows]
                for bucket in _length_buckets(lengths, self.max_padding):
                    rows = [model_rows[j] for j in bucket]
                    sequences = [requests[i].input_ids for i in rows]
                    with batch_pad_id(served.model, sequences if task == "predict" else [],
                                      pad_token_id(served.model)) as pad:
                        inputs = _right_padded(sequences, pad, execution_device(served.runner.layout.embeddings[0]))
                        inputs.update(_no_cache_kwargs(served.model))
                        if self._shares(served):
                            padded = _pad_states([states[i] for i in rows], inputs["attention_mask"].shape[1])
                            with served.runner.inject_states(padded, served.boundary):
                                out = served.model(**inputs)
                        else:
                            out = served.model(**inputs)
                    for row, i in enumerate(rows):
                        results[i] = (out, row)
            return results

    def _boundary_states(self, requests: Sequence[Request]) -> dict[int, torch.Tensor]:
        """Unpadded `[tokens, hidden]` states at its model's boundary, for each request whose model shares the
        prefix: from the repeated-input cache, else computed (prefix to the smallest boundary, then advanced).

        Requests with the same token ids (the same text sent to several fine-tunes) share one row of the prefix
        and of each advance: their states at a boundary are the same tensor. The cache is read once per distinct
        (boundary, token ids) of the batch."""
        wanted: dict[tuple[int, tuple[int, ...]], list[int]] = defaultdict(list)  # (boundary, ids) -> requests
        for i, request in enumerate(requests):
            served = self.models[self._name(request)]
            if self._shares(served):
                wanted[(served.boundary, tuple(int(t) for t in request.input_ids))].append(i)
        found: dict[tuple[int, tuple[int, ...]], torch.Tensor] = {}
        missing: dict[tuple[int, ...], set[int]] = defaultdict(set)  # distinct input -> boundaries to compute
        for (boundary, ids), indices in wanted.items():
            cached = self.cache.get((self.fingerprint, boundary, ids)) if self.cache.max_bytes else None
            if cached is not None:
                found[(boundary, ids)] = cached
            else:
                missing[ids].add(boundary)
            if self.cache.max_bytes:
                for i in indices:
                    self.cache_counts[self._name(requests[i])][cached is None] += 1
        inputs = list(missing)
        for bucket in _length_buckets([len(ids) for ids in inputs], self.max_padding):
            found.update(self._compute_states({inputs[j]: missing[inputs[j]] for j in bucket}))
        return {i: found[key] for key, indices in wanted.items() for i in indices}

    def _compute_states(self, boundaries: Mapping[tuple[int, ...], set[int]]
                        ) -> dict[tuple[int, tuple[int, ...]], torch.Tensor]:
        """States of each distinct input (one row each) at each of its `boundaries`: the base's prefix runs once
        up to the smallest boundary, then the rows that need a larger one advance from there (one forward per
        boundary). Returns (and caches) unpadded states keyed by (boundary, token ids)."""
        inputs = list(boundaries)
        device = execution_device(self.base_layout.embeddings[0])
        batch = _right_padded(inputs, pad_token_id(self.base), device)
        batch.update(_no_cache_kwargs(self.base))
        k_min = min(min(b) for b in boundaries.values())
        shared = self.base_runner.boundary_states(batch, k_min)
        by_boundary: dict[int, list[int]] = defaultdict(list)
        for row, ids in enumerate(inputs):
            for boundary in boundaries[ids]:
                by_boundary[boundary].append(row)
        computed: dict[tuple[int, tuple[int, ...]], torch.Tensor] = {}
        for boundary, group in sorted(by_boundary.items()):
            if boundary == k_min:
                states = shared[group]
            else:
                index = torch.tensor(group, device=shared.device)
                sub = {k: v.index_select(0, index) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                states = self.base_runner.boundary_states(sub, boundary, start=(k_min, shared[index]))
            for row, states_row in zip(group, states):
                ids = inputs[row]
                computed[(boundary, ids)] = states_row[: len(ids)].detach()
                if self.cache.max_bytes:
                    self.cache.put((self.fingerprint, boundary, ids), computed[(boundary, ids)].clone())
        return computed


def _length_buckets(lengths: Sequence[int], max_padding: float | None) -> list[list[int]]:
    """Split positions `0..len(lengths)-1` into forwards so that padding stays within `max_padding` x the real
    tokens of each (longest first); `None`: one forward for all."""
    if not lengths:
        return []
    if max_padding is None or len(lengths) == 1:
        return [list(range(len(lengths)))]
    order = sorted(range(len(lengths)), key=lambda j: -lengths[j])
    buckets: list[list[int]] = []
    real = 0
    for j in order:
        if buckets and (len(buckets[-1]) + 1) * lengths[buckets[-1][0]] <= (1 + max_padding) * (real + lengths[j]):
            buckets[-1].append(j)
            real += lengths[j]
        else:
            buckets.append([j])
            real = lengths[j]
    return buckets


def load_base(path: str | Path, dtype: torch.dtype | str = torch.float32) -> nn.Module:
    """Load a base model folder in `dtype` (`"auto"`: the dtype its config names) with the class its `config.json`
    names (`architectures[0]`), else `AutoModel`."""
    from ..checkpoint import load_pretrained

    return load_pretrained(path, dtype=resolve_dtype(dtype) if dtype != "auto" else "auto")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype | str:
    """`"float32"`, `"bfloat16"`, `"float16"` (or a `torch.dtype` of those) as a `torch.dtype`; `"auto"` stays."""
    if dtype == "auto" or dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.replace("torch.", "") in DTYPES:
        return DTYPES[dtype.replace("torch.", "")]
    raise ValueError(f"Unsupported dtype {dtype!r}; choose one of {[*DTYPES, 'auto']}.")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _owned(model: nn.Module, dtype: torch.dtype | str, copy_model: bool) -> nn.Module:
    """The engine's own instance of `model` (a deep copy unless `copy_model` is False), in `dtype`, in eval mode."""
    if copy_model:
        model = copy.deepcopy(model)
    if dtype != "auto" and any(p.dtype != dtype for p in model.parameters() if p.is_floating_point()):
        model = model.to(dtype)
    return model.eval()


# Config fields that change only the head, the training, or the bookkeeping, never what the shared prefix computes.
_SUFFIX_ONLY_FIELDS = frozenset({
    "num_labels", "id2label", "label2id", "problem_type", "architectures", "_name_or_path", "torch_dtype", "dtype",
    "tie_word_embeddings", "finetuning_task", "transformers_version", "task_specific_params", "classifier_dropout",
    "pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "cls_token_id", "decoder_start_token_id",
    "summary_type", "summary_use_proj", "summary_activation", "summary_proj_to_labels", "summary_first_dropout",
    "output_attentions", "output_hidden_states", "return_dict", "use_cache", "_commit_hash", "label_smoothing",
    "prefix", "tokenizer_class", "auto_map", "custom_pipelines", "chunk_size_feed_forward",
})


def prefix_config_difference(base: nn.Module, model: nn.Module) -> str | None:
    """Why `model` cannot run through `base`'s prefix, or `None`: the first config field (outside the head-only
    ones and dropouts, which eval mode ignores) whose value differs, or differing attention implementations."""
    base_config, config = getattr(base, "config", None), getattr(model, "config", None)
    if base_config is None or config is None:
        return None
    ours, theirs = base_config.to_dict(), config.to_dict()
    for key in sorted(set(ours) | set(theirs)):
        if key in _SUFFIX_ONLY_FIELDS or "dropout" in key or key.endswith("_pdrop"):
            continue
        if ours.get(key) != theirs.get(key):
            return f"its config has {key}={theirs.get(key)!r}, the base's has {key}={ours.get(key)!r}"
    implementations = (getattr(base_config, "_attn_implementation", None),
                       getattr(config, "_attn_implementation", None))
    if implementations[0] != implementations[1]:
        return (f"its attention implementation is {implementations[1]!r}, the base's is {implementations[0]!r}")
    return None


def _tasks_of(model: nn.Module) -> tuple[str, ...]:
    """Tasks from transformers' own auto-class mappings (which class a family uses for which head)."""
    name = type(model).__name__

    def mapped(mapping: Mapping[str, Any]) -> bool:
        return any(name == v or (isinstance(v, (tuple, list)) and name in v) for v in mapping.values())

    tasks = []
    if mapped(modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES):
        tasks.append("predict")
    if mapped(modeling_auto.MODEL_MAPPING_NAMES):
        tasks.append("embed")
    if mapped(modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        tasks.append("score")
        if getattr(model, "can_generate", lambda: False)():
            tasks.append("generate")
    return tuple(tasks)


def _sentence_transformers_pooling(source: str | Path | None) -> str | None:
    """`cls` or `mean` from a sentence-transformers `1_Pooling/config.json` beside the model, if any."""
    if source is None:
        return None
    config = Path(source) / "1_Pooling" / "config.json"
    if not config.is_file():
        return None
    import json

    values = json.loads(config.read_text())
    if values.get("pooling_mode_cls_token"):
        return "cls"
    if values.get("pooling_mode_mean_tokens"):
        return "mean"
    raise ValueError(f"{config} asks for a pooling other than CLS or mean ({values}); pass `pooling=` explicitly.")


def pad_token_id(model: nn.Module) -> int:
    """The model's pad token id, else its (first) EOS id, else 0."""
    config = getattr(model, "config", None)
    pad = getattr(config, "pad_token_id", None)
    if pad is None:
        eos = getattr(config, "eos_token_id", None)
        pad = eos[0] if isinstance(eos, (list, tuple)) else eos
    return int(pad) if pad is not None else 0


def _right_padded(sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[row, : len(seq)] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def _pad_states(per_row: Sequence[torch.Tensor], length: int) -> torch.Tensor:
    """Right-pad unpadded `[tokens_i, hidden]` states with zeros into `[rows, length, hidden]`."""
    first = per_row[0]
    out = first.new_zeros(len(per_row), length, first.shape[-1])
    for row, states in enumerate(per_row):
        out[row, : states.shape[0]] = states
    return out


def _no_cache_kwargs(model: nn.Module) -> dict[str, Any]:
    """`use_cache=False` where the forward takes it: one-shot forwards need no KV cache."""
    return {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
