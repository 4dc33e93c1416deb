"""Continuous batching for generation (iteration-level, as text-generation-inference and vLLM do).

A `GenerationScheduler` keeps one running `DecodeBatch`. Each `step()`:
1. drops the rows whose client went away (their future was cancelled);
2. admits waiting requests while the batch's token budget allows (prompt + new tokens of every row) and prefills
   them together in a batch of their own: their first token;
3. decodes one token for every row that was already running;
4. answers the rows that finished (EOS, a stop token, their length) and removes them, then merges the newcomers in.
A step is one prefill and one decoding forward at most, so whoever calls `step()` between other work (the
`DynamicBatcher`'s worker does, between its batches) makes that work wait at most one step. One thread steps a
scheduler; any thread may `submit` or cancel. A row whose sampling
raises fails alone; a prefill that raises is retried row by row, so that only the row that fails gets the error;
a fine-tune whose forward raises while decoding fails its own rows only; an error in the shared prefix's forward
fails every row of that forward.

Example:
    ```python
    scheduler = GenerationScheduler(engine)
    results = scheduler.generate([GenerationRequest([5, 6, 7], model="chat", max_new_tokens=8)])
    # or, step by step: future = scheduler.submit(request, on_token=print); while scheduler.busy: scheduler.step()
    ```
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from ..layout import execution_device
from .engine import ServingEngine
from .generation import DecodeBatch, DecodeRow, RowSampler
from .requests import GenerationRequest, GenerationResult

logger = logging.getLogger(__name__)

TokenCallback = Callable[[int, float, "GenerationResult | None"], None]


@dataclass
class _Entry:
    request: GenerationRequest
    future: Future
    on_token: TokenCallback | None
    tokens: int = 0
    row: DecodeRow | None = field(default=None, repr=False)


class GenerationScheduler:
    """Iteration-level batching of generation requests over one engine (see the module docstring).

    Args:
        engine (`ServingEngine`): base and fine-tunes.
        max_batch_tokens (`int`, defaults to 8192): budget of the running batch: the sum over its rows of prompt
            plus new tokens at most; a request larger than the budget runs when the batch is empty.
        max_batch_size (`int`, defaults to 64): rows in the running batch at most.

    Attributes:
        steps (`int`): steps run so far (each one prefill and/or one decoding forward).
    """

    def __init__(self, engine: ServingEngine, *, max_batch_tokens: int = 8192, max_batch_size: int = 64) -> None:
        if max_batch_tokens < 1 or max_batch_size < 1:
            raise ValueError(f"Need max_batch_tokens >= 1 and max_batch_size >= 1; got {max_batch_tokens}, "
                             f"{max_batch_size}.")
        self.engine = engine
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_size = max_batch_size
        self.device = execution_device(engine.base_layout.embeddings[0])
        self.steps = 0
        self._waiting: deque[_Entry] = deque()
        self._running: list[_Entry] = []
        self._batch: DecodeBatch | None = None
        self._lock = threading.Lock()

    @property
    def busy(self) -> bool:
        """Whether a request is waiting or running."""
        return bool(self._waiting or self._running)

    @property
    def pending(self) -> int:
        """Requests waiting or running."""
        return len(self._waiting) + len(self._running)

    @property
    def running(self) -> int:
        """Rows in the running batch."""
        return len(self._running)

    def submit(self, request: GenerationRequest, *, future: Future | None = None,
               on_token: TokenCallback | None = None, validated: bool = False) -> Future:
        """Queue `request`; returns its future (a `GenerationResult`). Cancelling the future stops the row at the
        next step. `on_token(token_id, logprob, result)` is called (from the stepping thread) for each new token;
        `result` is set on the last one.

        Raises:
            `ServingError`: the request is invalid (unless `validated`, when the caller has checked it).
        """
        if not validated:
            self.engine.validate("generate", [request])
        entry = _Entry(request, future if future is not None else Future(), on_token)
        with self._lock:
            self._waiting.append(entry)
        return entry.future

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Decode `requests` to the end (stepping in this thread); one result per request, in order."""
        self.engine.validate("generate", requests)
        futures = [self.submit(r, validated=True) for r in requests]
        while self.busy:
            self.step()
        return [f.result() for f in futures]

    def cancel_all(self, error: Exception) -> None:
        """Answer every waiting and running request with `error` (the server is stopping)."""
        with self._lock:
            entries = [*self._waiting, *self._running]
            self._waiting.clear()
        self._running, self._batch = [], None
        for entry in entries:
            _fail(entry, error)

    # -------------------------------------------------------------------------------------------- stepping
    @torch.no_grad()
    def step(self) -> None:
        """One iteration: drop cancelled rows, prefill newcomers, decode the running rows, retire finished ones."""
        self._retire([e for e in self._running if e.future.cancelled()])
        newcomers = self._admit()
        prefilled = self._prefill(newcomers) if newcomers else None
        if self._running:
            running = list(self._running)
            try:
                with self.engine.lock:
                    logits = self._batch.forward()
            except Exception as error:  # the forward failed: its rows cannot continue
                logger.exception("A decoding step failed")
                for entry in running:
                    _fail(entry, error)
                self._running, self._batch = [], None
            else:
                self._sample(running, logits, self._batch.errors)
                self._retire([e for e in running if e.row.finish_reason is not None or e.future.done()])
        if prefilled is not None:
            batch, entries = prefilled
            live = [j for j, e in enumerate(entries) if not e.future.done()]
            if live:
                if len(live) < len(entries):
                    batch.keep(live)
                    entries = [entries[j] for j in live]
                if self._batch is None:
                    self._batch = batch
                else:
                    self._batch.extend(batch)
                self._running += entries
        self.steps += 1

    def _admit(self) -> list[_Entry]:
        """Waiting requests that fit the running batch's budget (at least one when the batch is empty)."""
        admitted: list[_Entry] = []
        tokens = sum(e.tokens for e in self._running)
        with self._lock:
            while self._waiting and len(self._running) + len(admitted) < self.max_batch_size:
                entry = self._waiting[0]
                if entry.future.cancelled():
                    self._waiting.popleft()
                    continue
                try:
                    if entry.row is None:
                        served = self.engine.model_for(entry.request.model, "generate")  # 404 if removed
                        sampler = RowSampler(served.model, entry.request, self.device)
                        entry.row = DecodeRow(entry.request, served, sampler)
                        entry.tokens = len(entry.request.input_ids) + sampler.max_new_tokens
                except Exception as error:  # a bad generation config or request fails alone
                    self._waiting.popleft()
                    _fail(entry, error)
                    continue
                if (admitted or self._running) and tokens + entry.tokens > self.max_batch_tokens:
                    break
                self._waiting.popleft()
                admitted.append(entry)
                tokens += entry.tokens
        return admitted

    def _prefill(self, entries: list[_Entry]) -> tuple[DecodeBatch, list[_Entry]] | None:
        """Prefill `entries` together (their first tokens); if that forward raises, each one alone, so that only the
        row that fails gets the error. Returns the prefilled batch and its entries (`None`: all failed)."""
        try:
            batch = self._prefilled(entries)
        except Exception as error:
            if len(entries) == 1:
                logger.exception("A prefill failed")
                _fail(entries[0], error)
                return None
            logger.warning("A prefill of %d rows failed (%r); prefilling them one by one.", len(entries), error)
            batch, prefilled = None, []
            for entry in entries:
                try:
                    alone = self._prefilled([entry])
                except Exception as error:
                    logger.exception("A prefill failed")
                    _fail(entry, error)
                    continue
                if batch is None:
                    batch = alone
                else:
                    batch.extend(alone)
                prefilled.append(entry)
            if batch is None:
                return None
            entries = prefilled
        for entry in entries:
            if entry.row.finish_reason is not None and not entry.future.done():
                _succeed(entry)
        return batch, entries

    def _prefilled(self, entries: list[_Entry]) -> DecodeBatch:
        """A new batch of `entries`, its prefill forward run and each row's first token sampled."""
        batch = DecodeBatch(self.engine, [e.row for e in entries])
        with self.engine.lock:
            logits = batch.forward()
        if batch.errors:  # which row broke its model's forward? `_prefill` tries each alone
            raise next(iter(batch.errors.values()))
        self._sample(entries, logits, batch.errors)
        return batch

    def _sample(self, entries: list[_Entry], logits: torch.Tensor, errors: dict[int, Exception]) -> None:
        """Each row's next token (a row whose model's forward or sampling raised fails alone), then whether it has
        finished."""
        for j, (entry, row_logits) in enumerate(zip(entries, logits)):
            row = entry.row
            if j in errors:
                _fail(entry, errors[j])
            if entry.future.done():
                continue
            try:
                ids = torch.as_tensor([*row.request.input_ids, *row.generated], dtype=torch.long, device=self.device)
                token, logprob = row.sampler(ids, row_logits)
            except Exception as error:
                _fail(entry, error)
                continue
            row.generated.append(token)
            row.logprobs.append(logprob)
            if token in row.sampler.stop_ids:
                row.finish_reason = "eos"
            elif len(row.generated) >= row.sampler.max_new_tokens:
                row.finish_reason = "length"
            if entry.on_token is not None:
                try:
                    entry.on_token(token, logprob, row.result() if row.finish_reason else None)
                except Exception:
                    logger.exception("on_token failed")

    def _retire(self, entries: list[_Entry]) -> None:
        """Answer finished rows and remove them (and failed or cancelled ones) from the running batch."""
        if not entries:
            return
        leaving = {id(e) for e in entries}
        for entry in entries:
            if not entry.future.done():
                _succeed(entry)
        keep = [j for j, e in enumerate(self._running) if id(e) not in leaving]
        self._running = [self._running[j] for j in keep]
        if not self._running:
            self._batch = None
        else:
            self._batch.keep(keep)


def _succeed(entry: _Entry) -> None:
    if entry.future.set_running_or_notify_cancel():
        entry.future.set_result(entry.row.result())


def _fail(entry: _Entry, error: Exception) -> None:
    if not entry.future.done() and entry.future.set_running_or_notify_cancel():
        entry.future.set_exception(error)
