"""Dynamic batching: requests wait at most a few milliseconds, and a batch holds at most a token budget.

One worker thread owns the engine. It takes the oldest waiting input, then keeps taking inputs until
`max_wait_ms` has passed since it took the first one or the next input would exceed `max_batch_tokens`; the
inputs of one batch are then run task by task (one engine call per task present). If an engine call raises, the
batch's inputs are run again one by one, so that an input that still fails after validation fails its own request
only. The queue is bounded: `submit` refuses inputs beyond `max_queue` (the server answers 429) rather than letting
latency grow without limit.

Generation inputs go to a `GenerationScheduler` (continuous batching): between two of its batches the worker runs
one decoding step, and while generation runs it does not wait for a batch to fill, so other tasks wait at most
about one decoding step behind a long generation. The scheduler isolates its rows itself (a failing prefill is
retried row by row, a failing row leaves the batch alone).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

from .engine import ServingEngine
from .requests import OverloadedError, Request, UnavailableError
from .scheduler import GenerationScheduler, TokenCallback

logger = logging.getLogger(__name__)


@dataclass
class _Job:
    task: str
    request: Request
    tokens: int
    future: Future = field(default_factory=Future)
    on_token: TokenCallback | None = None
    queued_at: float = field(default_factory=time.perf_counter)
    taken_at: float = 0.0


class DynamicBatcher:
    """Queue inputs from many clients and run them through `engine` in batches.

    Args:
        engine (`ServingEngine`): the engine; only the batcher's thread calls it once started.
        max_wait_ms (`float`, defaults to 5): how long the first input of a batch waits for company.
        max_batch_tokens (`int`, defaults to 8192): token budget of a batch (prompt + `max_new_tokens` for
            generation); an input larger than the budget runs alone.
        max_queue (`int`, defaults to 1024): inputs waiting at most; beyond it `submit` raises `OverloadedError`.
        on_batch (`Callable[[str, int, int], None]`, *optional*): called with (task, inputs, tokens) per engine call.
        on_timing (`Callable[[str, str | None, dict[str, float]], None]`, *optional*): called per input answered
            with (task, model, seconds by phase): `queue` (submitted until taken into a batch), `batch` (taken until
            its engine call starts) and `engine` (that call; for generation, not measured here).
        continuous (`bool`, defaults to `True`): `False` runs each generation batch to its end before anything else
            (the run-to-end baseline that the serving benchmark measures continuous batching against).

    Example:
        ```python
        batcher = DynamicBatcher(engine, max_wait_ms=2)
        batcher.start()
        futures = batcher.submit("predict", [Request([101, 2023, 102], model="sst2")])
        logits = futures[0].result()
        batcher.stop()
        ```
    """

    def __init__(self, engine: ServingEngine, *, max_wait_ms: float = 5.0, max_batch_tokens: int = 8192,
                 max_queue: int = 1024, on_batch: Callable[[str, int, int], None] | None = None,
                 continuous: bool = True,
                 on_timing: Callable[[str, str | None, dict[str, float]], None] | None = None) -> None:
        if max_wait_ms < 0 or max_batch_tokens < 1 or max_queue < 1:
            raise ValueError(f"Need max_wait_ms >= 0, max_batch_tokens >= 1 and max_queue >= 1; got {max_wait_ms}, "
                             f"{max_batch_tokens}, {max_queue}.")
        self.engine = engine
        self.max_wait = max_wait_ms / 1000
        self.max_batch_tokens = max_batch_tokens
        self.max_queue = max_queue
        self.on_batch = on_batch
        self.on_timing = on_timing
        self._queue: queue.Queue[_Job] = queue.Queue()
        self._pending = 0
        self._pending_lock = threading.Lock()
        self._carry: _Job | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.scheduler = GenerationScheduler(engine, max_batch_tokens=max_batch_tokens)
        self.continuous = continuous

    @property
    def queued(self) -> int:
        """Inputs submitted and not answered yet."""
        return self._pending + self.scheduler.pending

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Start the worker thread."""
        if self.alive:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._work, name="hf-freeze-batcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the worker after the batch it is running; inputs still waiting (queued, or held back for the next
        batch) get an `UnavailableError` (503)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        waiting = [self._carry] if self._carry is not None else []
        self._carry = None
        while True:
            try:
                waiting.append(self._queue.get_nowait())
            except queue.Empty:
                break
        with self._pending_lock:
            self._pending -= len(waiting)
        for job in waiting:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(UnavailableError("The server is shutting down; retry later."))
        self.scheduler.cancel_all(UnavailableError("The server is shutting down; retry later."))

    def submit(self, task: str, requests: Sequence[Request], on_token: TokenCallback | None = None) -> list[Future]:
        """Queue `requests` (validated by the engine first) for `task`; one future per request. For `generate`,
        `on_token(token_id, logprob, result)` is called for each new token (see `GenerationScheduler.submit`), and
        cancelling a future stops its row at the next decoding step.

        Raises:
            `OverloadedError`: the queue holds `max_queue` inputs already.
            `ServingError`: a request is invalid (unknown model, wrong task, too long); nothing is queued.
        """
        self.engine.validate(task, requests)
        with self._pending_lock:
            if self.queued + len(requests) > self.max_queue:
                raise OverloadedError(f"The server is overloaded ({self._pending} inputs waiting, at most "
                                      f"{self.max_queue}); retry later.")
            self._pending += len(requests)
        jobs = [_Job(task, r, len(r.input_ids) + (getattr(r, "max_new_tokens", 0) or 0), on_token=on_token)
                for r in requests]
        for job in jobs:
            self._queue.put(job)
        return [job.future for job in jobs]

    def _next_batch(self) -> list[_Job]:
        first = self._carry
        self._carry = None
        generating = self.scheduler.busy  # then take what is queued now: the decoding step is waiting
        if first is None:
            try:
                first = self._queue.get_nowait() if generating else self._queue.get(timeout=0.05)
            except queue.Empty:
                return []
            first.taken_at = time.perf_counter()
        batch, tokens = [first], first.tokens
        deadline = time.monotonic() + (0 if generating else self.max_wait)
        while tokens < self.max_batch_tokens:
            remaining = deadline - time.monotonic()
            try:
                job = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            job.taken_at = time.perf_counter()
            if tokens + job.tokens > self.max_batch_tokens:
                self._carry = job
                break
            batch.append(job)
            tokens += job.tokens
        return batch

    def _work(self) -> None:
        while not self._stop.is_set():
            batch = self._next_batch()
            by_task: dict[str, list[_Job]] = defaultdict(list)
            for job in batch:
                by_task[job.task].append(job)
            for task, jobs in by_task.items():
                if task == "generate":
                    self._admit(jobs)
                else:
                    self._run(task, jobs)
            if self.scheduler.busy:
                self._step()
            while not self.continuous and self.scheduler.busy:
                self._step()

    def _step(self) -> None:
        """One decoding step; an error the scheduler did not contain fails the generations, not the worker."""
        try:
            self.scheduler.step()
        except Exception as error:
            logger.exception("A generation step failed")
            self.scheduler.cancel_all(error)

    def _admit(self, jobs: list[_Job]) -> None:
        """Hand generation inputs (validated in `submit`) to the scheduler; it answers their futures."""
        with self._pending_lock:
            self._pending -= len(jobs)
        for job in jobs:
            self.scheduler.submit(job.request, future=job.future, on_token=job.on_token, validated=True)
        self._observe("generate", jobs)
        self._timing("generate", jobs, time.perf_counter(), None)

    def _run(self, task: str, jobs: list[_Job]) -> None:
        with self._pending_lock:
            self._pending -= len(jobs)
        # A client that went away cancelled its future (asyncio.wrap_future does): its input is not run.
        jobs = [job for job in jobs if job.future.set_running_or_notify_cancel()]
        if not jobs:
            return
        started = time.perf_counter()
        try:
            results = self._call(task, jobs)
            self._timing(task, jobs, started, time.perf_counter() - started)
        except Exception as error:
            if len(jobs) == 1:
                results = [error]
            else:  # one input may have failed the batch: answer each alone, so only its own client gets the error
                logger.warning("A %s batch of %d inputs failed (%r); answering its inputs one by one.", task,
                               len(jobs), error)
                results = [self._call_alone(task, job) for job in jobs]
        else:
            self._observe(task, jobs)
        for job, result in zip(jobs, results):
            if isinstance(result, Exception):
                job.future.set_exception(result)
            else:
                job.future.set_result(result)

    def _call(self, task: str, jobs: list[_Job]) -> list:
        results = getattr(self.engine, task)([job.request for job in jobs])
        if len(results) != len(jobs):
            raise RuntimeError(f"The engine answered {len(results)} of {len(jobs)} {task} inputs.")
        return results

    def _call_alone(self, task: str, job: _Job):
        """`job`'s answer computed alone, or the exception it raised (returned, not raised)."""
        try:
            result = self._call(task, [job])[0]
        except Exception as error:
            return error
        self._observe(task, [job])
        return result

    def _timing(self, task: str, jobs: list[_Job], started: float, engine: float | None) -> None:
        if self.on_timing is None:
            return
        try:  # as `on_batch`: a metrics hook must neither fail the answers nor stop the worker
            for job in jobs:
                phases = {"queue": job.taken_at - job.queued_at, "batch": started - job.taken_at}
                if engine is not None:
                    phases["engine"] = engine
                self.on_timing(task, job.request.model, phases)
        except Exception:
            logger.exception("on_timing failed")

    def _observe(self, task: str, jobs: list[_Job]) -> None:
        if self.on_batch is not None:
            try:  # a metrics hook must neither fail the answers nor stop the worker
                self.on_batch(task, len(jobs), sum(job.tokens for job in jobs))
            except Exception:
                logger.exception("on_batch failed")
