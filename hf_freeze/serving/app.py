"""HTTP routes (FastAPI) over a `ServingEngine` and its `DynamicBatcher`, in the style of Hugging Face's inference
servers (text-embeddings-inference, text-generation-inference).

| route | body | answer |
|---|---|---|
| `POST /predict` | `{inputs, model?, raw_scores?, truncate?}` | `[{label, score}]` per input, best first |
| `POST /embed` | `{inputs, model?, normalize?, truncate?}` | `[[float]]`, one vector per input |
| `POST /score` | `{inputs, model?}` | `[{token_ids, logprobs}]`: log-likelihood of each token after the first |
| `POST /generate` | `{inputs, model?, parameters}` (below) | `{generated_text, token_ids, details}` |
| `POST /generate_stream` | `{inputs, model?, parameters}`, one input | server-sent events, one per token (below) |
| `GET /health` | | 200, or 503 when the batcher is down |
| `GET /info` | | base, fingerprint, models (boundary, tasks, labels), limits |
| `GET /metrics` | | Prometheus text |

Generation `parameters`: `max_new_tokens`, `do_sample`, `temperature`, `top_k`, `top_p`, `seed`,
`stop_token_ids`; `details` holds `finish_reason` (`eos` or `length`) and `generated_tokens`. Everything else
(repetition penalty, n-gram blocking, min length, EOS ids, and the length when `max_new_tokens` is absent) follows
the model's own `generation_config`. `/generate_stream` sends text-generation-inference's events:
`data: {"index", "token": {"id", "text", "logprob", "special"}, "generated_text": null, "details": null}` per token,
the last one with `generated_text` and `details`; an error mid-stream is an event `data: {"error", "error_type"}`.
A client that disconnects stops its row at the next decoding step.

`inputs` is a string, a list of token ids, or a list of either (a client batch). `model` names a fine-tune; absent
means the base. `truncate: true` cuts an input to the model's positions: its first tokens, or for `/generate` its
last ones, leaving room for `max_new_tokens`.

Errors are JSON `{error, error_type}`: 404 unknown model, 413 body or client batch too large, 422 malformed JSON or
bad input (too long without `truncate`), 424 wrong task for the model, 429 overloaded, 499 the client left
`/generate` before its answer (its rows were cancelled), 503 batcher not running.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .batching import DynamicBatcher
from .engine import ServedModel, ServingEngine
from .requests import (
    ClientClosedError,
    EmbedRequest,
    GenerationRequest,
    PayloadTooLargeError,
    Request,
    ServingError,
    UnavailableError,
)

_ROUTE_TASKS = {"/predict": "predict", "/embed": "embed", "/score": "score", "/generate": "generate",
                "/generate_stream": "generate"}


def create_app(engine: ServingEngine, *, tokenizer: Any = None, max_wait_ms: float = 5.0,
               max_batch_tokens: int = 8192, max_client_batch_size: int = 32, max_queue: int = 1024,
               max_body_bytes: int = 1 << 20) -> FastAPI:
    """The FastAPI app; the batcher starts with the app (lifespan) and stops with it.

    Args:
        engine (`ServingEngine`): base and fine-tunes.
        tokenizer (*optional*): turns string inputs into ids and ids back into text; without it, send token ids.
        max_wait_ms, max_batch_tokens, max_queue: the `DynamicBatcher`'s limits.
        max_client_batch_size (`int`, defaults to 32): inputs per request at most (413 beyond).
        max_body_bytes (`int`, defaults to 1 MiB): request bodies at most (413 beyond).

    Example:
        ```python
        import uvicorn
        uvicorn.run(create_app(engine, tokenizer=tokenizer), host="127.0.0.1", port=8080)
        ```
    """
    if max_client_batch_size < 1 or max_body_bytes < 1:
        raise ValueError(f"Need max_client_batch_size >= 1 and max_body_bytes >= 1; got {max_client_batch_size}, "
                         f"{max_body_bytes}.")
    registry = CollectorRegistry()
    requests_total = Counter("hf_freeze_requests", "HTTP requests by route and status", ["route", "status"],
                             registry=registry)
    latency = Histogram("hf_freeze_request_duration_seconds", "Request latency by route", ["route"],
                        registry=registry, buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
    batch_size = Histogram("hf_freeze_batch_size", "Inputs per engine batch", ["task"], registry=registry,
                           buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
    batch_tokens = Histogram("hf_freeze_batch_tokens", "Tokens per engine batch", ["task"], registry=registry,
                             buckets=(16, 64, 256, 1024, 4096, 16384))
    queued = Gauge("hf_freeze_queue_size", "Inputs waiting or running", registry=registry)
    registry.register(_CacheCollector(engine))

    def on_batch(task: str, inputs: int, tokens: int) -> None:
        batch_size.labels(task).observe(inputs)
        batch_tokens.labels(task).observe(tokens)

    batcher = DynamicBatcher(engine, max_wait_ms=max_wait_ms, max_batch_tokens=max_batch_tokens,
                             max_queue=max_queue, on_batch=on_batch)
    limits = {"max_batch_tokens": max_batch_tokens, "max_client_batch_size": max_client_batch_size,
              "max_wait_ms": max_wait_ms, "max_queue": max_queue, "max_body_bytes": max_body_bytes}

    async def lifespan(app: FastAPI):
        batcher.start()
        yield
        batcher.stop()

    app = FastAPI(title="hf_freeze serving", lifespan=lifespan)
    app.state.engine, app.state.batcher = engine, batcher

    @app.exception_handler(ServingError)
    async def serving_error(request: HttpRequest, error: ServingError) -> JSONResponse:
        return JSONResponse({"error": str(error), "error_type": error.error_type}, status_code=error.status)

    @app.exception_handler(Exception)
    async def internal_error(request: HttpRequest, error: Exception) -> JSONResponse:
        return JSONResponse({"error": f"{type(error).__name__}: {error}", "error_type": "internal"}, status_code=500)

    @app.middleware("http")
    async def measure(request: HttpRequest, call_next):
        started = time.perf_counter()
        response = await call_next(request)
        route = request.url.path if request.url.path in (*_ROUTE_TASKS, "/health", "/info", "/metrics") else "other"
        requests_total.labels(route, str(response.status_code)).inc()
        latency.labels(route).observe(time.perf_counter() - started)
        return response

    async def body_of(request: HttpRequest) -> dict[str, Any]:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
            raise PayloadTooLargeError(f"The request body has {declared} bytes; at most {max_body_bytes} allowed.")
        raw = bytearray()
        async for chunk in request.stream():
            raw.extend(chunk)
            if len(raw) > max_body_bytes:
                raise PayloadTooLargeError(f"The request body exceeds {max_body_bytes} bytes.")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ServingError(f"Malformed JSON body: {error}. Send a JSON object such as "
                               '{"inputs": "some text"}.') from error
        if not isinstance(body, dict) or "inputs" not in body:
            raise ServingError('The body must be a JSON object with "inputs" (a string, token ids, or a list).')
        return body

    def token_lists(body: dict[str, Any], served_limit: int | None, keep_last: bool = False
                    ) -> tuple[list[list[int]], bool]:
        """The inputs as token-id lists (with `truncate`, cut to `served_limit`: the first tokens, or the last ones
        with `keep_last`), and whether the request sent a single input."""
        inputs = body["inputs"]
        single = isinstance(inputs, str) or (isinstance(inputs, list) and all(_is_int(t) for t in inputs)
                                             and len(inputs) > 0)
        items = [inputs] if single else inputs
        if not isinstance(items, list) or not items:
            raise ServingError('"inputs" must be a string, a list of token ids, or a non-empty list of those.')
        if len(items) > max_client_batch_size:
            raise PayloadTooLargeError(f"{len(items)} inputs in one request; at most {max_client_batch_size}. "
                                       "Split the request.")
        truncate = _flag(body, "truncate", False)
        out = []
        for item in items:
            if isinstance(item, str):
                if tokenizer is None:
                    raise ServingError("This server has no tokenizer: send token ids instead of text.")
                ids = tokenizer(item)["input_ids"]
            elif isinstance(item, list) and all(_is_int(t) for t in item):
                ids = [int(t) for t in item]
            else:
                raise ServingError(f"Each input must be a string or a list of token ids, got {type(item).__name__}.")
            if truncate and served_limit and len(ids) > served_limit:
                ids = ids[-served_limit:] if keep_last else ids[:served_limit]
            out.append(ids)
        return out, single

    async def run(task: str, requests: list[Request], client: HttpRequest | None = None) -> list[Any]:
        """The engine's answers; with `client`, its inputs are cancelled when that client disconnects."""
        if not batcher.alive:  # its futures would never be answered
            raise UnavailableError("The batcher is not running (the server is stopping or failed); retry later.")
        futures = batcher.submit(task, requests)
        queued.set(batcher.queued)
        answers = asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
        if client is None:
            return await answers
        watcher = asyncio.create_task(_cancel_on_disconnect(client, futures))
        try:
            return await answers
        except asyncio.CancelledError:
            if watcher.done() and not watcher.cancelled():  # the client left: answer (to nobody) without a traceback
                raise ClientClosedError("The client closed the connection; its inputs were cancelled.") from None
            raise
        finally:
            watcher.cancel()

    async def parse(request: HttpRequest, task: str) -> tuple[dict[str, Any], ServedModel, list[list[int]], bool]:
        """The body, the served model it names for `task`, its inputs as token ids, and whether it sent one."""
        body = await body_of(request)
        name = body.get("model")
        if name is not None and not isinstance(name, str):
            raise ServingError(f'"model" must be a string, got {type(name).__name__}.')
        served = engine.model_for(name, task)
        limit = served.max_input_tokens
        if task == "generate" and limit:  # a prompt continues from its end, and leaves room for the new tokens
            params = body.get("parameters")
            new = params.get("max_new_tokens", GenerationRequest.max_new_tokens) if isinstance(params, dict) else 0
            limit = limit - new if _is_int(new) and 0 < new < limit else limit
        ids, single = token_lists(body, limit, keep_last=task == "generate")
        return body, served, ids, single

    @app.post("/predict")
    async def predict(request: HttpRequest) -> Any:
        body, served, ids, single = await parse(request, "predict")
        raw_scores = _flag(body, "raw_scores", False)
        logits = await run("predict", [Request(i, model=served.name) for i in ids])
        id2label = served.model.config.id2label
        answers = []
        for row in logits:
            scores = row if raw_scores else row.softmax(-1)
            order = scores.argsort(descending=True).tolist()
            answers.append([{"label": id2label.get(j, str(j)), "score": float(scores[j])} for j in order])
        return answers[0] if single else answers

    @app.post("/embed")
    async def embed(request: HttpRequest) -> Any:
        body, served, ids, _ = await parse(request, "embed")
        normalize = _flag(body, "normalize", True)
        vectors = await run("embed", [EmbedRequest(i, model=served.name, normalize=normalize) for i in ids])
        return [v.tolist() for v in vectors]

    @app.post("/score")
    async def score(request: HttpRequest) -> Any:
        body, served, ids, single = await parse(request, "score")
        scores = await run("score", [Request(i, model=served.name) for i in ids])
        answers = [{"token_ids": i, "logprobs": s.tolist()} for i, s in zip(ids, scores)]
        return answers[0] if single else answers

    @app.post("/generate")
    async def generate(request: HttpRequest) -> Any:
        body, served, ids, single = await parse(request, "generate")
        params = body.get("parameters") or {}
        if not isinstance(params, dict):
            raise ServingError('"parameters" must be a JSON object.')
        unknown = set(params) - _GENERATION_PARAMETERS
        if unknown:
            raise ServingError(f"Unknown generation parameters {sorted(unknown)}; allowed: "
                               f"{sorted(_GENERATION_PARAMETERS)}.")
        try:
            requests = [GenerationRequest(i, model=served.name, **params) for i in ids]
        except TypeError as error:
            raise ServingError(f"Bad generation parameters: {error}.") from error
        results = await run("generate", requests, client=request)  # a client that leaves stops its rows
        answers = [{"generated_text": tokenizer.decode(r.token_ids, skip_special_tokens=True) if tokenizer else None,
                    "token_ids": r.token_ids,
                    "details": {"finish_reason": r.finish_reason, "generated_tokens": len(r.token_ids)}}
                   for r in results]
        return answers[0] if single else answers

    @app.post("/generate_stream")
    async def generate_stream(request: HttpRequest) -> StreamingResponse:
        body, served, ids, single = await parse(request, "generate")
        if not single:
            raise ServingError("/generate_stream takes one input; send a list to /generate instead.")
        generation = _generation_request(body, served.name, ids[0])
        if not batcher.alive:
            raise UnavailableError("The batcher is not running (the server is stopping or failed); retry later.")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def on_token(token: int, logprob: float, result: Any) -> None:  # called from the batcher's thread
            loop.call_soon_threadsafe(events.put_nowait, (token, logprob, result))

        future = batcher.submit("generate", [generation], on_token=on_token)[0]
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(events.put_nowait, None))
        queued.set(batcher.queued)
        return StreamingResponse(_token_events(events, future, tokenizer), media_type="text/event-stream")

    @app.get("/health")
    async def health() -> Response:
        if batcher.alive:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"error": "The batcher is not running.", "error_type": "unhealthy"}, status_code=503)

    @app.get("/info")
    async def info() -> dict[str, Any]:
        return {"base": engine.source or type(engine.base).__name__, "base_name": engine.base_name,
                "fingerprint": engine.fingerprint, "num_blocks": engine.num_blocks,
                "dtype": str(next(engine.base.parameters()).dtype).replace("torch.", ""),
                "share_prefix": engine.share_prefix, "cache_max_bytes": engine.cache.max_bytes,
                "models": [m.describe() for m in engine.models.values()], "limits": limits}

    @app.get("/metrics")
    async def metrics() -> Response:
        queued.set(batcher.queued)
        return PlainTextResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app


@contextlib.contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int | None = None,
                    timeout: float = 30.0) -> Iterator[str]:
    """Run `app` with uvicorn in a background thread (a free port by default); yields its base URL and stops it
    on exit. For tests and benchmarks; `hf-freeze serve` runs uvicorn in the foreground.

    Example:
        ```python
        with serve_in_thread(create_app(engine)) as url:
            httpx.post(f"{url}/predict", json={"inputs": [5, 6, 7]})
        ```
    """
    import uvicorn

    if port is None:
        with socket.socket() as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="hf-freeze-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            server.should_exit = True
            raise RuntimeError(f"uvicorn did not start on {host}:{port} within {timeout} s.")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)


async def _cancel_on_disconnect(client: HttpRequest, futures: list[Any]) -> None:
    """Cancel `futures` once `client` has disconnected (a generation row then stops at its next step). The body
    has been read, so the next ASGI message is the disconnect (`is_disconnected()` does not see it behind the
    measuring middleware)."""
    while (await client.receive())["type"] != "http.disconnect":
        pass
    for future in futures:
        future.cancel()


async def _token_events(events: asyncio.Queue, future: Any, tokenizer: Any):
    """Server-sent events of one streamed generation (text-generation-inference's shape); closing the stream (the
    client went away) cancels the future, which stops the row at the next decoding step."""
    generated: list[int] = []
    text = ""
    special = set(getattr(tokenizer, "all_special_ids", ()) or ())
    try:
        while True:
            event = await events.get()
            if event is None:  # the future is done; its tokens were all sent before this
                if not future.cancelled() and future.exception() is not None:
                    error = future.exception()
                    kind = error.error_type if isinstance(error, ServingError) else "generation"
                    yield f"data: {json.dumps({'error': str(error), 'error_type': kind})}\n\n"
                return
            token, logprob, result = event
            generated.append(token)
            piece = None
            if tokenizer is not None:  # the new text: what decoding all tokens so far adds
                decoded = tokenizer.decode(generated, skip_special_tokens=False)
                piece, text = decoded[len(text):], decoded
            payload = {"index": len(generated), "token": {"id": token, "text": piece, "logprob": logprob,
                                                          "special": token in special},
                       "generated_text": None, "details": None}
            if result is not None:
                payload["generated_text"] = (tokenizer.decode(result.token_ids, skip_special_tokens=True)
                                             if tokenizer is not None else None)
                payload["details"] = {"finish_reason": result.finish_reason,
                                      "generated_tokens": len(result.token_ids)}
            yield f"data: {json.dumps(payload)}\n\n"
    finally:
        future.cancel()


def _generation_request(body: dict[str, Any], model: str, ids: list[int]) -> GenerationRequest:
    """The `GenerationRequest` for one input of a generation body (its `parameters` checked by name)."""
    params = body.get("parameters") or {}
    if not isinstance(params, dict):
        raise ServingError('"parameters" must be a JSON object.')
    unknown = set(params) - _GENERATION_PARAMETERS
    if unknown:
        raise ServingError(f"Unknown generation parameters {sorted(unknown)}; allowed: "
                           f"{sorted(_GENERATION_PARAMETERS)}.")
    try:
        return GenerationRequest(ids, model=model, **params)
    except TypeError as error:
        raise ServingError(f"Bad generation parameters: {error}.") from error


_GENERATION_PARAMETERS = {"max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "seed", "stop_token_ids"}


def _flag(body: dict[str, Any], name: str, default: bool) -> bool:
    """A boolean option of the body; anything but true / false is refused (`bool("false")` would be true)."""
    value = body.get(name, default)
    if not isinstance(value, bool):
        raise ServingError(f'"{name}" must be true or false, got {value!r}.')
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _CacheCollector:
    """Reads the repeated-input cache's counters at scrape time."""

    def __init__(self, engine: ServingEngine) -> None:
        self.engine = engine

    def collect(self):
        cache = self.engine.cache
        yield CounterMetricFamily("hf_freeze_cache_hits", "Repeated-input cache hits", value=cache.hits)
        yield CounterMetricFamily("hf_freeze_cache_misses", "Repeated-input cache misses", value=cache.misses)
        yield GaugeMetricFamily("hf_freeze_cache_bytes", "Bytes of states in the cache", value=cache.nbytes)
        yield GaugeMetricFamily("hf_freeze_cache_entries", "Entries in the cache", value=len(cache))
