"""Prometheus metrics of the server: per route, per served model (`model="..."`, a label of its own, as
multi-adapter servers label their adapters) and per phase of a request (where its time goes).

| metric | labels | what |
|---|---|---|
| `hf_freeze_requests_total` | route, status | HTTP requests |
| `hf_freeze_request_duration_seconds` | route | HTTP latency |
| `hf_freeze_model_requests_total` | model, route, status | requests that named the model (a fan-out counts for each) |
| `hf_freeze_model_request_duration_seconds` | model, route | their latency |
| `hf_freeze_model_input_tokens_total` | model, task | input tokens sent to the model |
| `hf_freeze_model_generated_tokens_total` | model | tokens it generated (every route, streamed or not) |
| `hf_freeze_model_cache_hits_total`, `..._misses_total` | model | repeated-input cache lookups of its inputs |
| `hf_freeze_request_phase_seconds` | phase | per input: `tokenize`, `queue`, `batch`, `engine`, `serialize` |

Cardinality is bounded: `model` takes only the names being served (a request's model is resolved before it is
counted) and a removed model's series are removed with it (`forget`); `route` takes the known routes or `other`.

Phases: `tokenize` (parsing the inputs into token ids, per request), `queue` (submitted until the batcher's worker
takes it into a batch), `batch` (taken until its engine call starts: waiting for the batch to fill and for the
batch's other tasks), `engine` (the engine call that answered it; for generation, admission to its answer),
`serialize` (building and writing the JSON answer, per request). The HTTP latency minus their sum is the rest:
reading and validating the body, thread hops, the event loop.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily

from .engine import ServingEngine

PHASES = ("tokenize", "queue", "batch", "engine", "serialize")
_LATENCY_BUCKETS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10)
_PHASE_BUCKETS = (.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10)


class ServingMetrics:
    """The server's Prometheus metrics in their own `registry` (see the module docstring).

    Args:
        engine (`ServingEngine`): its served names bound the `model` label; its per-model cache counts are read
            at scrape time.
        registry (`CollectorRegistry`, *optional*): a new one by default.
    """

    def __init__(self, engine: ServingEngine, registry: CollectorRegistry | None = None) -> None:
        self.engine = engine
        self.registry = registry = registry or CollectorRegistry()
        self.requests = Counter("hf_freeze_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=registry)
        self.latency = Histogram("hf_freeze_request_duration_seconds", "Request latency by route", ["route"],
                                 registry=registry, buckets=_LATENCY_BUCKETS)
        self.model_requests = Counter("hf_freeze_model_requests", "Requests by served model, route and status",
                                      ["model", "route", "status"], registry=registry)
        self.model_latency = Histogram("hf_freeze_model_request_duration_seconds", "Request latency by model",
                                       ["model", "route"], registry=registry, buckets=_LATENCY_BUCKETS)
        self.input_tokens = Counter("hf_freeze_model_input_tokens", "Input tokens by model and task",
                                    ["model", "task"], registry=registry)
        self.generated_tokens = Counter("hf_freeze_model_generated_tokens", "Generated tokens by model", ["model"],
                                        registry=registry)
        self.phases = Histogram("hf_freeze_request_phase_seconds", "Time of each phase of a request", ["phase"],
                                registry=registry, buckets=_PHASE_BUCKETS)
        for phase in PHASES:  # published from the start, so a scrape shows every phase
            self.phases.labels(phase)
        registry.register(_ModelCacheCollector(engine))

    def observe_request(self, route: str, status: int, models: Iterable[str], seconds: float) -> None:
        """One HTTP request, and for each model it named (still served), its per-model series."""
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)
        for model in models:
            if model in self.engine.models:
                self.model_requests.labels(model, route, str(status)).inc()
                self.model_latency.labels(model, route).observe(seconds)

    def observe_tokens(self, model: str, task: str, tokens: int, generated: int = 0) -> None:
        if model in self.engine.models:
            self.input_tokens.labels(model, task).inc(tokens)
            if generated:
                self.generated_tokens.labels(model).inc(generated)

    def observe_phase(self, phase: str, seconds: float) -> None:
        self.phases.labels(phase).observe(seconds)

    def on_timing(self, task: str, model: str | None, phases: dict[str, float]) -> None:
        """The batcher's per-input hook (`DynamicBatcher(on_timing=...)`): its queue, batch and engine times."""
        for phase, seconds in phases.items():
            self.phases.labels(phase).observe(seconds)

    def forget(self, model: str) -> None:
        """Remove the series of a model that is no longer served."""
        for metric in (self.model_requests, self.model_latency, self.input_tokens, self.generated_tokens):
            metric.remove_by_labels({"model": model})


class _ModelCacheCollector:
    """Per-model repeated-input cache counters (`ServingEngine.cache_counts`), read at scrape time."""

    def __init__(self, engine: ServingEngine) -> None:
        self.engine = engine

    def collect(self):
        hits = CounterMetricFamily("hf_freeze_model_cache_hits", "Repeated-input cache hits by model", labels=["model"])
        misses = CounterMetricFamily("hf_freeze_model_cache_misses", "Repeated-input cache misses by model",
                                     labels=["model"])
        for model, (hit, miss) in list(self.engine.cache_counts.items()):
            if model in self.engine.models:
                hits.add_metric([model], hit)
                misses.add_metric([model], miss)
        yield hits
        yield misses
