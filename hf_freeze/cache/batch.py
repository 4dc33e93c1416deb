"""The one place that decides, per batch, what to read from the cache, what to compute, advance and store.

For each example of a batch (digested once):
- a cache entry at the current boundary `k` is a *hit*, read and re-padded;
- an entry at an older boundary `b < k` is *advanced*: only blocks `[b, k)` run, from the cached states;
- otherwise it is a *miss*: the frozen prefix runs for those examples only.
Under FSDP2 (`lockstep`) a batch reads the cache only when every rank's whole batch hits; otherwise every rank
computes its whole batch, so that all ranks run the same sharded modules in the same order.
States are stored without their trailing padding (what the input digest leaves out too) and re-padded into the
batch's own length (zeros at trailing padded positions, which no real position reads). Leading (left) padding is
part of an example's identity, so its states are kept.

What is stored: everything in `"on"` mode and in evaluation; in `"auto"` mode a training example only when the run
will see it again (`will_see_again`). When a batch has nothing to read and nothing to store, the cache stays out
of the way and the model runs its plain forward.

`"auto"` also judges, per boundary, whether the cache pays: it times reading and re-padding hits and computing
misses with the frozen prefix (the device synchronised around each, so an accelerator's queued kernels are
counted), and once it has `JUDGE_BATCHES` batches of each it compares the medians; a cache that does not pay is
off at that boundary from then on. Only a pending verdict synchronises: with `"on"`, or once a boundary is judged,
the clocks are read without waiting for the device (the logged `cache/saved_seconds` is then an estimate from
launch times on an accelerator), so the cache never stalls the queue for bookkeeping.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections import defaultdict, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..freezing import frozen_boundary
from ..fsdp import all_ranks_agree
from ..layout import execution_device
from .keys import example_digests, last_real_positions
from .runner import PrefixRunner
from .store import PrefixCache

logger = logging.getLogger(__name__)

CACHE_MODES = ("auto", "on", "off")
JUDGE_BATCHES = 3  # batches timed of each kind (reads, computes) before "auto" judges a boundary


@dataclass
class CacheStats:
    """Counters of cache use since the start of training (logged as `cache/*`)."""

    hits: int = 0
    advanced: int = 0
    misses: int = 0
    stored: int = 0
    not_stored: int = 0
    hit_tokens: int = 0
    hit_tokens_by_boundary: dict[int, int] = field(default_factory=dict)
    read_seconds: float = 0.0
    compute_seconds: float = 0.0
    computed_tokens: int = 0
    seconds_per_token: dict[int, float] = field(default_factory=dict)  # median frozen-prefix cost by boundary

    def saved_seconds(self) -> float:
        """Estimated prefix compute time the hits avoided, net of the time spent reading them: each hit priced at
        its own boundary's measured cost per token (a boundary never measured: the nearest measured one's, scaled
        by the number of blocks, which the prefix's cost follows)."""
        saved = sum(tokens * self.cost_per_token(boundary) for boundary, tokens in self.hit_tokens_by_boundary.items())
        return max(saved - self.read_seconds, 0.0)

    def cost_per_token(self, boundary: int) -> float:
        """Seconds per token of the frozen prefix up to `boundary` (measured, or scaled from the nearest measured
        boundary; 0 when none was measured)."""
        if boundary in self.seconds_per_token:
            return self.seconds_per_token[boundary]
        if not self.seconds_per_token:
            return 0.0
        nearest = min(self.seconds_per_token, key=lambda measured: (abs(measured - boundary), measured))
        return self.seconds_per_token[nearest] * boundary / max(nearest, 1)

    def as_logs(self, cache: PrefixCache) -> dict[str, float]:
        return {
            "cache/hits": float(self.hits),
            "cache/advanced": float(self.advanced),
            "cache/misses": float(self.misses),
            "cache/entries": float(len(cache)),
            "cache/bytes": float(cache.nbytes),
            "cache/saved_seconds": round(self.saved_seconds(), 3),
        }


@dataclass(frozen=True)
class TrainingProgress:
    """Where training stands, for the store rule: optimizer steps done, in all, and per epoch (`None`: unknown,
    e.g. a dataloader without a length)."""

    step: int
    max_steps: int
    steps_per_epoch: int | None


def will_see_again(progress: TrainingProgress) -> bool:
    """Whether the examples of the batch in flight (step `step + 1`) come back one epoch later, before the end.

    Example:
        ```python
        will_see_again(TrainingProgress(step=3, max_steps=12, steps_per_epoch=4))   # True: back at step 8
        will_see_again(TrainingProgress(step=8, max_steps=12, steps_per_epoch=4))   # False: step 13 never runs
        ```
    """
    if progress.steps_per_epoch is None:
        return True
    return progress.step + 1 + progress.steps_per_epoch <= progress.max_steps


class CacheVerdict:
    """`cache="auto"`: per boundary, the measured seconds per token of reading cached states and of computing them
    with the frozen prefix; a verdict once `batches` batches of each are in, from their medians.

    Args:
        batches (`int`): timed batches of each kind needed before judging (at least 1).
    """

    def __init__(self, batches: int = JUDGE_BATCHES) -> None:
        if batches < 1:
            raise ValueError(f"`batches` must be at least 1, got {batches}.")
        self.batches = batches
        self.reads: dict[int, list[float]] = defaultdict(list)
        self.computes: dict[int, list[float]] = defaultdict(list)
        self.verdicts: dict[int, bool] = {}

    def record(self, boundary: int, *, read: float | None = None, compute: float | None = None) -> bool | None:
        """Add one batch's seconds per token; returns the verdict when this call reached it, else `None`."""
        if boundary in self.verdicts:
            return None
        if read is not None:
            self.reads[boundary].append(read)
        if compute is not None:
            self.computes[boundary].append(compute)
        reads, computes = self.reads[boundary], self.computes[boundary]
        if len(reads) < self.batches or len(computes) < self.batches:
            return None
        read_cost, compute_cost = statistics.median(reads), statistics.median(computes)
        self.verdicts[boundary] = read_cost < compute_cost
        logger.info(
            "hf_freeze: cache at boundary %d %s: reading costs %.3g us/token, the frozen prefix %.3g us/token "
            "(medians of %d and %d batches).", boundary, "on" if self.verdicts[boundary] else "off",
            read_cost * 1e6, compute_cost * 1e6, len(reads), len(computes),
        )
        return self.verdicts[boundary]

    def allows(self, boundary: int) -> bool:
        """False once the cache was judged not to pay at `boundary`."""
        return self.verdicts.get(boundary, True)


class BatchCache:
    """Produces the padded `[batch, seq, hidden]` boundary states of a batch, or `None` when the plain forward
    should run.

    Args:
        runner (`PrefixRunner`): runs the frozen prefix.
        cache (`PrefixCache`): stores per-example states.
        label_names (`Iterable[str]`): batch entries that are targets, not model inputs of the prefix.
        mode (`str`): `"auto"`, `"on"` or `"off"` (see the module docstring).
        cache_eval (`bool`): also cache evaluation batches.
        lockstep (`bool`): every rank takes the same path for each batch (FSDP2, where the frozen blocks'
            forwards are collectives): cached states only when every rank's whole batch hits, else every rank
            computes its whole batch; `"auto"` verdicts are AND-ed across ranks.

    Example:
        ```python
        batches = BatchCache(PrefixRunner(model, layout), PrefixCache(model, layout), ["labels"], mode="on")
        states = batches.states_for(batch, keys, frozen_boundary(model), training=True)
        with batches.runner.inject_states(states, frozen_boundary(model)):
            loss = model(**batch).loss
        ```
    """

    def __init__(
        self,
        runner: PrefixRunner,
        cache: PrefixCache,
        label_names: Iterable[str],
        *,
        mode: str = "on",
        cache_eval: bool = True,
        lockstep: bool = False,
    ) -> None:
        if mode not in CACHE_MODES:
            raise ValueError(f"The cache mode must be one of {list(CACHE_MODES)}, got {mode!r}.")
        self.runner = runner
        self.cache = cache
        self.label_names = set(label_names) | {"labels", "label", "label_ids"}
        self.mode = mode
        self.cache_eval = cache_eval
        self.lockstep = lockstep
        self.stats = CacheStats()
        self.verdict = CacheVerdict()
        self.state_dtype: torch.dtype | None = None
        self._compute_samples: dict[int, deque[float]] = defaultdict(lambda: deque(maxlen=16))

    def wanted(self, boundary: int | None, training: bool) -> bool:
        """Whether batches at `boundary` go through the cache at all."""
        if boundary is None or boundary < 1 or self.mode == "off":
            return False
        if not training and not self.cache_eval:
            return False
        return self.mode == "on" or self.verdict.allows(boundary)

    def should_store(self, training: bool, progress: TrainingProgress | None) -> bool:
        """`"on"` and evaluation store everything; `"auto"` training stores only what the run will see again."""
        if self.mode == "on" or not training or progress is None:
            return True
        return will_see_again(progress)

    def states_for(
        self,
        inputs: Mapping[str, Any],
        keys: torch.Tensor,
        boundary: int | None,
        *,
        training: bool = True,
        progress: TrainingProgress | None = None,
    ) -> torch.Tensor | None:
        """The batch's states at `boundary`, or `None` when the cache is not used for this batch (off, not paying,
        or nothing to read and nothing worth storing).

        Args:
            inputs: the batch (labels are ignored).
            keys: the examples' keys (`keys.INDEX_COLUMN`), one per row.
            boundary: the frozen boundary.
            training: a training batch (else evaluation or prediction).
            progress: where training stands, for the `"auto"` store rule.
        """
        if not self.wanted(boundary, training):
            return None
        return self._states(inputs, keys, boundary, store=self.should_store(training, progress))

    def fill(self, inputs: Mapping[str, Any], keys: torch.Tensor, boundary: int) -> None:
        """Compute (or advance) and store the states of every example of the batch at `boundary`, whatever the
        mode's rules for training or evaluation batches say (`FreezeTrainer.precompute_cache`)."""
        if not 1 <= boundary <= self.runner.layout.num_blocks:
            raise ValueError(f"Filling the cache needs 1 <= boundary <= {self.runner.layout.num_blocks}, got "
                             f"{boundary}.")
        self._states(inputs, keys, boundary, store=True)

    def _states(self, inputs: Mapping[str, Any], keys: torch.Tensor, boundary: int, *, store: bool
                ) -> torch.Tensor | None:
        with self.cache.same_weights():  # the fingerprints are checked once per batch, against the weights as they are
            if self.lockstep:  # FSDP2: fingerprints gather sharded weights, so every rank computes all, in one order
                self.cache.pin_fingerprints(self._boundaries_to_check(boundary))
            return self._batch_states(inputs, keys, boundary, store=store)

    def _boundaries_to_check(self, boundary: int) -> list[int]:
        """Every boundary whose fingerprint a batch at `boundary` may read: its own (stores) and those of entries
        it may find. The frozen ones are all listed (remembered, they cost no hashing), so the list is the same on
        every rank even if the ranks' manifests were not; above the frozen prefix, the manifest's."""
        frozen = frozen_boundary(self.cache.model) or 0
        recorded = {int(b) for b in self.cache.manifest["prefix"] if int(b) <= boundary}
        return sorted(set(range(1, min(boundary, frozen) + 1)) | recorded | {boundary})

    def _batch_states(self, inputs: Mapping[str, Any], keys: torch.Tensor, boundary: int, *, store: bool
                      ) -> torch.Tensor | None:
        model_inputs = {k: v for k, v in inputs.items() if k not in self.label_names}
        digests = example_digests(model_inputs, exclude=())
        kept = _kept_positions(model_inputs)
        device = execution_device(self.runner.layout.blocks[boundary - 1])

        deciding = self.mode == "auto" and boundary not in self.verdict.verdicts  # only then wait for the device
        read_started = _now(device, deciding)
        key_list: list[int] = keys.tolist()  # read back once: the Trainer may have moved the keys to the device
        entries = [self.cache.get(key, digest, boundary) for key, digest in zip(key_list, digests)]
        nothing_to_do = not store and all(entry is None for entry in entries)
        if self.lockstep:  # FSDP2: every rank must run the same modules (their all-gathers pair up across ranks)
            all_hit = all(entry is not None and entry.boundary == boundary for entry in entries)
            all_hit, nothing_to_do = all_ranks_agree(all_hit, nothing_to_do)
            if not all_hit:
                entries = [None] * len(entries)  # compute the whole batch, as every other rank does
        if nothing_to_do:
            return None  # nothing to read, nothing to keep: the plain forward does the same work for less
        per_example: list[torch.Tensor | None] = [None] * len(digests)
        to_advance: dict[int, list[int]] = defaultdict(list)
        missing: list[int] = []
        hit_tokens = 0
        for i, entry in enumerate(entries):
            if entry is None:
                missing.append(i)
                continue
            per_example[i] = entry.states
            if entry.boundary == boundary:
                self.stats.hits += 1
                hit_tokens += entry.states.shape[0]
            else:
                to_advance[entry.boundary].append(i)
        if not missing and not to_advance:
            padded = _pad(per_example, kept, self._dtype(boundary), device)
            read_seconds = _now(device, deciding) - read_started
            self._record(boundary, read=read_seconds / max(hit_tokens, 1))
            self.stats.read_seconds += read_seconds
            self._count_hits(boundary, hit_tokens)
            return padded
        self._count_hits(boundary, hit_tokens)

        for start_boundary, rows in sorted(to_advance.items()):
            start = _pad([per_example[i] for i in rows], kept[rows], self._dtype(boundary), device)
            sub_batch = _rows(model_inputs, rows, len(kept))
            states = self.runner.boundary_states(sub_batch, boundary, start=(start_boundary, start))
            self._keep(per_example, rows, states, kept, key_list, digests, boundary, store)
            self.stats.advanced += len(rows)
        if missing:
            started = _now(device, deciding)
            states = self.runner.boundary_states(_rows(model_inputs, missing, len(kept)), boundary)
            elapsed = _now(device, deciding) - started
            tokens = int(kept[missing].sum())
            self.stats.compute_seconds += elapsed
            self.stats.computed_tokens += tokens
            self._record(boundary, compute=elapsed / max(tokens, 1))
            self._keep(per_example, missing, states, kept, key_list, digests, boundary, store)
            self.stats.misses += len(missing)
        return _pad(per_example, kept, self._dtype(boundary), device)

    def _count_hits(self, boundary: int, tokens: int) -> None:
        self.stats.hit_tokens += tokens
        if tokens:
            by_boundary = self.stats.hit_tokens_by_boundary
            by_boundary[boundary] = by_boundary.get(boundary, 0) + tokens

    def _record(self, boundary: int, *, read: float | None = None, compute: float | None = None) -> None:
        if compute is not None:
            samples = self._compute_samples[boundary]
            samples.append(compute)
            self.stats.seconds_per_token[boundary] = statistics.median(samples)
        if self.mode == "auto":
            verdict = self.verdict.record(boundary, read=read, compute=compute)
            if verdict is not None and self.lockstep:  # ranks time differently: the cache is on only if on for all
                self.verdict.verdicts[boundary] = all_ranks_agree(verdict)[0]

    def _keep(self, per_example, rows, states, kept, keys, digests, boundary, store) -> None:
        self.state_dtype = states.dtype
        states = states.detach()
        # The kept positions are a prefix of each row (`_kept_positions`), so a slice selects them without a
        # mask copied to the device; the stored copies come back to the CPU in one transfer, not one per example.
        lengths = kept[rows].sum(dim=1).tolist()
        on_cpu = states.to("cpu") if store else None
        for row, (i, length) in enumerate(zip(rows, lengths)):
            per_example[i] = states[row, :length]
            if store:
                stored = self.cache.put(keys[i], digests[i], boundary, on_cpu[row, :length])
                self.stats.stored += stored
                self.stats.not_stored += not stored

    def _dtype(self, boundary: int) -> torch.dtype:
        if self.state_dtype is None:
            self.state_dtype = next(self.runner.layout.blocks[boundary - 1].parameters()).dtype
        return self.state_dtype


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on an accelerator `device` (a no-op on the CPU), so that a clock read afterwards
    counts the kernels and not only their launch."""
    if device.type in ("cpu", "meta"):
        return
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "synchronize"):
        accelerator.synchronize(device)
    elif device.type == "cuda":
        torch.cuda.synchronize(device)


def _now(device: torch.device, sync: bool) -> float:
    if sync:
        synchronize(device)
    return time.perf_counter()


def _kept_positions(inputs: Mapping[str, Any]) -> torch.Tensor:
    """`[batch, seq]` booleans: the positions whose states are kept, every position up to the last real token (a
    prefix of each row, which `BatchCache._keep` relies on).

    Trailing padding is dropped (no real token reads it). Leading padding is kept: it is part of the example's
    digest, and a left-padded causal LM predicts its first real token from the last padding position, so those
    states must be the ones the prefix computed, not zeros.
    """
    mask = inputs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        mask = mask.detach().cpu()
        ends = torch.tensor(last_real_positions(mask))
        return torch.arange(mask.shape[1]).unsqueeze(0) < ends.unsqueeze(1)
    reference = inputs.get("input_ids", inputs.get("inputs_embeds"))
    if not isinstance(reference, torch.Tensor):
        raise ValueError("The prefix cache needs `input_ids` or `inputs_embeds` (and optionally attention_mask).")
    return torch.ones(reference.shape[:2], dtype=torch.bool)


def _rows(inputs: Mapping[str, Any], rows: list[int], batch: int) -> dict[str, Any]:
    """The sub-batch of examples `rows` of a batch of `batch` (tensors whose first dimension is `batch` are
    indexed)."""
    if rows == list(range(batch)):
        return dict(inputs)
    index = torch.tensor(rows)

    def select(value: Any) -> Any:
        is_batched = isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch
        return value.index_select(0, index.to(value.device)) if is_batched else value

    return {k: select(v) for k, v in inputs.items()}


def _pad(
    per_example: list[torch.Tensor | None], kept: torch.Tensor, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Scatter `[tokens_i, hidden]` states into a zero `[batch, seq, hidden]` tensor at the kept positions."""
    hidden = next(s for s in per_example if s is not None).shape[-1]
    out = torch.zeros(*kept.shape, hidden, dtype=dtype, device=device)
    parts: list[torch.Tensor] = per_example  # type: ignore[assignment]
    if len({(s.device, s.dtype) for s in parts}) == 1:
        flat = torch.cat(parts).to(device, dtype)  # e.g. all cache hits: one transfer to the device, not one each
    else:
        flat = torch.cat([s.to(device, dtype) for s in parts])
    out[kept.to(device)] = flat
    return out
