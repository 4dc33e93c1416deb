"""HTTP routes (FastAPI) over a `ServingEngine` and its `DynamicBatcher`, in the style of Hugging Face's inference
servers (text-embeddings-inference, text-generation-inference). Bodies are the pydantic models of `schemas.py`
(OpenAPI at `/openapi.json`, docs at `/docs`).

| route | body | answer |
|---|---|---|
| `POST /predict` | `{inputs, model? or models?, raw_scores?, truncate?}` | `[{label, score}]` per input, best first |
| `POST /embed` | `{inputs, model? or models?, normalize?, truncate?}` | `[[float]]`, one vector per input |
| `POST /score` | `{inputs, model? or models?, truncate?}` | `[{token_ids, logprobs}]`: log-likelihoods of tokens 2.. |
| `POST /generate` | `{inputs, model?, parameters?, truncate?}` (below) | `{generated_text, token_ids, details}` |
| `POST /generate_stream` | the same, one input | server-sent events, one per token (below) |
| `GET /health` | | 200, or 503 when the batcher is down |
| `GET /info` | | base, fingerprint, models (boundary, tasks, labels), limits |
| `GET /metrics` | | Prometheus text |

Stock clients work unchanged: OpenAI's through `/v1/...` (`openai.py`), Hugging Face's `InferenceClient` and
`text_generation.Client` through `POST /` and `POST /models/{model}` (`hf_compat.py`).

Generation `parameters` (`schemas.GenerateParameters`): `max_new_tokens`, `do_sample`, `temperature`, `top_k`,
`top_p`, `seed`, `stop_token_ids`; `details` holds `finish_reason` (`eos` or `length`) and `generated_tokens`.
Everything else (repetition penalty, n-gram blocking, min length, EOS ids, and the length when `max_new_tokens` is
absent) follows the model's own `generation_config`. Generation is continuously batched (`scheduler.py`).
`/generate_stream` sends text-generation-inference's events (`schemas.StreamEvent`, in the OpenAPI schema):
`data: {"index", "token": {"id", "text", "logprob", "special"}, "generated_text": null, "details": null}` per token,
the last one with `generated_text` and `details`; an error after the stream has started is an event
`data: {"error", "error_type"}`. A client that disconnects from either route stops its rows at the next decoding
step.

`inputs` is a string, a list of token ids, or a list of either (a client batch). `model` names a fine-tune; absent
means the base. `models` (a list of names, or `"*"`) fans the inputs out to several fine-tunes: the answer is then
`{name: answer}` (`fanout.py`). The admin routes (load and remove fine-tunes while serving, behind a token) are in
`admin.py`, the metrics in `metrics.py`.

`truncate: true` cuts an input to the model's positions: its first tokens (the end is cut, as
text-embeddings-inference does; a tokenizer's closing special tokens are kept), or for `/generate` its last ones
(the start is cut, as text-generation-inference does), leaving room for `max_new_tokens`.

Every 4xx and 5xx is JSON `{error, error_type}` (`schemas.ErrorBody`): 404 unknown model or route, 405 wrong
method, 413 body or client batch too large, 415 a body that is not JSON, 422 malformed JSON or bad input, 424
wrong task for the model, 429 overloaded, 499 the client left `/generate` before its answer (its rows were
cancelled; counted in `/metrics`), 500 internal (logged; the body says no more), 503 batcher not running.
Reading the body is bounded in bytes; parsing and validating it, tokenizing and writing the answer run in worker
threads, off the event loop, unless they are small (a body up to 16 KiB, inputs up to 2,048 characters or tokens,
an answer of up to 1,024 labels): a thread hop costs more than such work (`_offload`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future
from typing import Any

from fastapi import Depends, FastAPI
from fastapi import Request as HttpRequest
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.routing import APIRoute
from fastapi.sse import EventSourceResponse
from prometheus_client import CONTENT_TYPE_LATEST, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

from . import hf_compat, openai, schemas
from .admin import admin_router
from .batching import DynamicBatcher
from .context import RouteContext, token_events
from .engine import ServedModel, ServingEngine
from .fanout import fanout_models
from .metrics import ServingMetrics
from .requests import (
    ClientClosedError,
    EmbedRequest,
    GenerationRequest,
    PayloadTooLargeError,
    Request,
    ServingError,
    UnavailableError,
)
from .scheduler import TokenCallback

logger = logging.getLogger(__name__)
_ROUTE_TASKS = {"/predict": "predict", "/embed": "embed", "/score": "score", "/generate": "generate",
                "/generate_stream": "generate"}
_ERRORS = {status: {"model": schemas.ErrorBody} for status in (404, 413, 415, 422, 424, 429, 500, 503)}
# /generate_stream answers events, but its errors in JSON (a `model` would document them as events)
_STREAM_ERRORS = {status: {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}}
                  for status in _ERRORS}


def create_app(engine: ServingEngine, *, tokenizer: Any = None, max_wait_ms: float = 5.0,
               max_batch_tokens: int = 8192, max_client_batch_size: int = 32, max_queue: int = 1024,
               max_body_bytes: int = 1 << 20, admin_token: str | None = None) -> FastAPI:
    """The FastAPI app; the batcher starts with the app (lifespan) and stops with it.

    Args:
        engine (`ServingEngine`): base and fine-tunes.
        tokenizer (*optional*): turns string inputs into ids and ids back into text; without it, send token ids.
        max_wait_ms, max_batch_tokens, max_queue: the `DynamicBatcher`'s limits.
        max_client_batch_size (`int`, defaults to 32): inputs per request at most (413 beyond).
        max_body_bytes (`int`, defaults to 1 MiB): request bodies at most (413 beyond).
        admin_token (`str`, *optional*): turns on the admin routes (`admin.py`: load and remove fine-tunes while
            serving) for requests bearing it; without it they answer 404.

    Example:
        ```python
        import uvicorn
        uvicorn.run(create_app(engine, tokenizer=tokenizer), host="127.0.0.1", port=8080)
        ```
    """
    if max_client_batch_size < 1 or max_body_bytes < 1:
        raise ValueError(f"Need max_client_batch_size >= 1 and max_body_bytes >= 1; got {max_client_batch_size}, "
                         f"{max_body_bytes}.")
    observed = ServingMetrics(engine)
    registry = observed.registry
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
                             max_queue=max_queue, on_batch=on_batch, on_timing=observed.on_timing)
    limits = {"max_batch_tokens": max_batch_tokens, "max_client_batch_size": max_client_batch_size,
              "max_wait_ms": max_wait_ms, "max_queue": max_queue, "max_body_bytes": max_body_bytes}

    async def lifespan(app: FastAPI):
        batcher.start()
        yield
        batcher.stop()

    app = FastAPI(title="hf_freeze serving", lifespan=lifespan, strict_content_type=False)
    app.router.route_class = _json_route(max_body_bytes)
    app.state.engine, app.state.batcher, app.state.metrics = engine, batcher, observed
    _add_error_handlers(app)
    # bodies bounded in bytes, but the token checked before a body is validated
    app.include_router(admin_router(engine, admin_token, on_removed=observed.forget,
                                    route_class=_json_route(max_body_bytes, validate=False)))

    @app.middleware("http")
    async def measure(request: HttpRequest, call_next):
        started = time.perf_counter()
        try:
            response = await call_next(request)
        except Exception:  # answered (and counted) here: the app's own 500 handler runs outside this middleware
            logger.exception("Internal error on %s %s", request.method, request.url.path)
            response = _internal_error()
        route = request.url.path if request.url.path in (*_ROUTE_TASKS, "/health", "/info", "/metrics") else "other"
        observed.observe_request(route, response.status_code, getattr(request.state, "models", ()),
                                time.perf_counter() - started)
        return response

    def token_lists(inputs: Any, truncate: bool, served_limit: int | None, keep_last: bool = False
                    ) -> tuple[list[list[int]], bool]:
        """The inputs as token-id lists (with `truncate`, cut to `served_limit`: the first tokens, or the last ones
        with `keep_last`), and whether the request sent a single input. Runs in a worker thread."""
        single = isinstance(inputs, str) or (bool(inputs) and isinstance(inputs[0], int))
        items = [inputs] if single else inputs
        if len(items) > max_client_batch_size:
            raise PayloadTooLargeError(f"{len(items)} inputs in one request; at most {max_client_batch_size}. "
                                       "Split the request.")
        out = []
        for item in items:
            if isinstance(item, str):
                ids = _encode(tokenizer, item, served_limit if truncate else None, keep_last)
            else:
                ids = list(item)
                if truncate and served_limit and len(ids) > served_limit:
                    ids = ids[-served_limit:] if keep_last else ids[:served_limit]
            out.append(ids)
        return out, single

    async def submit(task: str, requests: list[Request], on_token: TokenCallback | None = None) -> list[Future]:
        """The batcher's futures for `requests` (validated in a worker thread: validation reads every token id)."""
        if not batcher.alive:  # its futures would never be answered
            raise UnavailableError("The batcher is not running (the server is stopping or failed); retry later.")
        tokens = sum(len(r.input_ids) for r in requests)
        futures = await _offload(tokens <= _INLINE_TOKENS, batcher.submit, task, requests, on_token)
        queued.set(batcher.queued)
        if task == "generate":  # every route's generations, streamed or not, counted as they end
            for request, future in zip(requests, futures):
                future.add_done_callback(lambda done, model=request.model: _count_generated(observed, model, done))
        return futures

    async def run(task: str, requests: list[Request], client: HttpRequest | None = None) -> list[Any]:
        """The engine's answers; with `client`, its inputs are cancelled when that client disconnects."""
        futures = await submit(task, requests)
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

    async def parse(body: Any, task: str, client: HttpRequest, new_tokens: int = 0, count: bool = True
                    ) -> tuple[list[ServedModel], list[list[int]], bool]:
        """The served models `body` names for `task` (`model`, or a fan-out's `models`), its inputs as token ids,
        and whether it sent one; `count`: add them to the models' input-token counters (`False` where the same
        inputs are parsed again)."""
        served = fanout_models(engine, body, task)
        client.state.models = [m.name for m in served]
        limits = [m.max_input_tokens for m in served if m.max_input_tokens]
        limit = min(limits) if limits else None
        if limit and 0 < new_tokens < limit:  # a prompt continues from its end, and leaves room for the new tokens
            limit -= new_tokens
        started = time.perf_counter()
        size = len(body.inputs) if isinstance(body.inputs, str) or not body.inputs or isinstance(body.inputs[0], int) \
            else sum(len(x) for x in body.inputs)  # characters or token ids
        ids, single = await _offload(size <= _INLINE_TOKENS, token_lists, body.inputs, body.truncate, limit,
                                     task == "generate")
        observed.observe_phase("tokenize", time.perf_counter() - started)
        for m in served if count else ():
            observed.observe_tokens(m.name, task, sum(map(len, ids)))
        return served, ids, single

    async def run_each(body: Any, task: str, client: HttpRequest, make: Callable[[list[int], str], Request]
                       ) -> tuple[list[ServedModel], list[list[int]], bool, list[list[Any]]]:
        """Every input of `body` through every model it names, as one submission (so one batch: the prefix runs
        once per distinct input): the models, the inputs, whether it sent one, and the answers per model."""
        served, ids, single = await parse(body, task, client)
        flat = await run(task, [make(i, m.name) for m in served for i in ids])
        return served, ids, single, [flat[j * len(ids):(j + 1) * len(ids)] for j in range(len(served))]

    async def generation_requests(body: schemas.GenerateBody, client: HttpRequest
                                  ) -> tuple[list[GenerationRequest], bool]:
        """One `GenerationRequest` per input of a /generate or /generate_stream body, and whether it sent one."""
        params = (body.parameters or schemas.GenerateParameters()).model_dump()
        # a truncated prompt leaves room for its new tokens (without `max_new_tokens`: one at least)
        (served,), ids, single = await parse(body, "generate", client, params["max_new_tokens"] or 1)
        return [GenerationRequest(i, model=served.name, **params) for i in ids], single

    @app.post("/predict", response_model=schemas.PredictResponse, responses=_ERRORS)
    async def predict(body: schemas.PredictBody, client: HttpRequest) -> Response:
        served, _, single, results = await run_each(body, "predict", client, lambda i, m: Request(i, model=m))

        def answer(model: ServedModel, logits: list[Any]) -> Any:
            id2label = model.model.config.id2label
            answers = []
            for row in logits:
                scores = row if body.raw_scores else row.softmax(-1)
                order = scores.argsort(descending=True).tolist()
                answers.append([{"label": id2label.get(j, str(j)), "score": float(scores[j])} for j in order])
            return answers[0] if single else answers

        labels = sum(len(rows) * len(m.model.config.id2label or {}) for m, rows in zip(served, results))
        return await _json_answer(lambda: _keyed(body, served, results, answer), observed, labels <= 1024)

    @app.post("/embed", response_model=schemas.EmbedResponse, responses=_ERRORS)
    async def embed(body: schemas.EmbedBody, client: HttpRequest) -> Response:
        served, _, _, results = await run_each(body, "embed", client,
                                               lambda i, m: EmbedRequest(i, model=m, normalize=body.normalize))
        return await _json_answer(lambda: _keyed(body, served, results, lambda _, vs: [v.tolist() for v in vs]),
                                  observed)

    @app.post("/score", response_model=schemas.ScoreResponse, responses=_ERRORS)
    async def score(body: schemas.ScoreBody, client: HttpRequest) -> Response:
        served, ids, single, results = await run_each(body, "score", client, lambda i, m: Request(i, model=m))

        def answer(_: ServedModel, scores: list[Any]) -> Any:
            answers = [{"token_ids": i, "logprobs": s.tolist()} for i, s in zip(ids, scores)]
            return answers[0] if single else answers

        return await _json_answer(lambda: _keyed(body, served, results, answer), observed)

    @app.post("/generate", response_model=schemas.GenerateResponse, responses={**_ERRORS, 499: _CLIENT_CLOSED})
    async def generate(body: schemas.GenerateBody, request: HttpRequest) -> Response:
        requests, single = await generation_requests(body, request)
        results = await run("generate", requests, client=request)  # a client that leaves stops its rows

        def answer() -> Any:
            answers = [{"generated_text": tokenizer.decode(r.token_ids, skip_special_tokens=True)
                        if tokenizer else None, "token_ids": r.token_ids,
                        "details": {"finish_reason": r.finish_reason, "generated_tokens": len(r.token_ids)}}
                       for r in results]
            return answers[0] if single else answers

        return await _json_answer(answer, observed)

    async def start_stream(body: schemas.GenerateBody, client: HttpRequest) -> tuple[Future, asyncio.Queue]:
        """Validate and queue the one input of a /generate_stream body: its future and the queue its tokens arrive
        on (`None` once it is done). A dependency, so it runs before the response starts: a bad body gets its 4xx."""
        requests, single = await generation_requests(body, client)
        if not single:
            raise ServingError("/generate_stream takes one input; send a list to /generate instead.")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def on_token(token: int, logprob: float, result: Any) -> None:  # called from the batcher's thread
            loop.call_soon_threadsafe(events.put_nowait, (token, logprob, result))

        future = (await submit("generate", requests, on_token))[0]
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(events.put_nowait, None))
        return future, events

    @app.post("/generate_stream", response_class=EventSourceResponse, responses=_STREAM_ERRORS)
    async def generate_stream(stream: tuple[Future, asyncio.Queue] = Depends(start_stream)  # noqa: B008
                              ) -> AsyncIterator[schemas.StreamEvent | schemas.ErrorBody]:
        """Server-sent events, one per new token (text-generation-inference's shape); the last one carries
        `generated_text` and `details`. An error after the stream started is one `ErrorBody` event."""
        async for event in token_events(*stream, tokenizer):
            yield event

    @app.get("/health", response_model=schemas.Health, responses={503: {"model": schemas.ErrorBody}})
    async def health() -> Response:
        if batcher.alive:
            return JSONResponse({"status": "ok"})
        return _error_response(503, "unhealthy", "The batcher is not running.")

    @app.get("/info", response_model=schemas.Info)
    async def info() -> dict[str, Any]:
        return {"base": engine.source or type(engine.base).__name__, "base_name": engine.base_name,
                "fingerprint": engine.fingerprint, "num_blocks": engine.num_blocks,
                "dtype": str(next(engine.base.parameters()).dtype).replace("torch.", ""),
                "share_prefix": engine.share_prefix, "cache_max_bytes": engine.cache.max_bytes,
                "models": [m.describe() for m in engine.models.values()], "limits": limits}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> Response:
        queued.set(batcher.queued)
        return PlainTextResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    # stock clients: OpenAI's (/v1/...) and Hugging Face's (POST /), translated onto the same calls
    context = RouteContext(engine, tokenizer, parse, run, generation_requests, start_stream, app.router.route_class,
                           lambda build: _json_answer(build, observed))
    app.include_router(openai.router(context))
    app.include_router(hf_compat.router(context))
    app.add_middleware(openai.OpenAIErrors)
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


_CLIENT_CLOSED = {"model": schemas.ErrorBody, "description": "The client left before its answer; its rows were "
                                                              "cancelled (no one reads this answer)."}


def _encode(tokenizer: Any, text: str, limit: int | None, keep_last: bool) -> list[int]:
    """`text`'s token ids (special tokens included); refused when it holds nothing but special tokens (an empty
    string is `[CLS] [SEP]` for an encoder). With `limit`, cut to that many tokens: the first ones, keeping the
    closing special tokens, or with `keep_last` the last ones, keeping the opening special tokens."""
    if tokenizer is None:
        raise ServingError("This server has no tokenizer: send token ids instead of text.")
    encoding = tokenizer(text, return_special_tokens_mask=True)
    ids, special = list(encoding["input_ids"]), list(encoding["special_tokens_mask"])
    if all(special):
        raise ServingError("An input text is empty (it has no tokens besides the special ones); send some text.")
    if limit and len(ids) > limit:
        if keep_last:
            opening = next(i for i, s in enumerate(special) if not s)
            ids = ids[:opening] + ids[len(ids) - (limit - opening):] if limit > opening else ids[-limit:]
        else:
            closing = next(i for i, s in enumerate(reversed(special)) if not s)
            ids = ids[: limit - closing] + ids[len(ids) - closing:] if limit > closing else ids[:limit]
    return ids


# Work this small runs on the event loop: a hop to a worker thread costs more (it waits for the GIL behind the
# engine's thread, measured as `other` in the phase breakdown); larger work runs in worker threads, so that a
# megabyte body or a long text never holds the loop.
_INLINE_BYTES = 16 * 1024
_INLINE_TOKENS = 2048


def _count_generated(metrics: ServingMetrics, model: str, future: Future) -> None:
    """A generation's tokens in the model's `generated_tokens` counter, once it ended with an answer."""
    if not future.cancelled() and future.exception() is None:
        metrics.observe_tokens(model, "generate", 0, len(future.result().token_ids))


async def _offload(inline: bool, fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)`, on the event loop when `inline`, else in a worker thread."""
    return fn(*args) if inline else await run_in_threadpool(fn, *args)


async def _json_answer(answer: Callable[[], Any], metrics: ServingMetrics, inline: bool = False) -> Response:
    """`answer()` built and written as JSON in a worker thread (a batch of vectors is megabytes of text), or with
    `inline` (a small answer) on the event loop."""

    def write() -> bytes:
        started = time.perf_counter()
        raw = json.dumps(answer()).encode()
        metrics.observe_phase("serialize", time.perf_counter() - started)
        return raw

    return Response(await _offload(inline, write), media_type="application/json")


def _keyed(body: Any, served: list[ServedModel], results: list[list[Any]],
           answer: Callable[[ServedModel, list[Any]], Any]) -> Any:
    """A route's answer: `answer(model, its results)` for the one model, or for a fan-out (`models` in the body)
    `{name: answer}` for each model, in the order asked."""
    if getattr(body, "models", None) is None:
        return answer(served[0], results[0])
    return {model.name: answer(model, rows) for model, rows in zip(served, results)}


def _error_response(status: int, error_type: str, message: str, headers: dict[str, str] | None = None
                    ) -> JSONResponse:
    return JSONResponse({"error": message, "error_type": error_type}, status_code=status, headers=headers)


def _internal_error() -> JSONResponse:
    return _error_response(500, "internal", "Internal server error; the server's log has the details.")


_HTTP_ERROR_TYPES = {400: "validation", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large",
                     415: "unsupported_media_type", 422: "validation", 429: "overloaded", 503: "unhealthy"}


def _add_error_handlers(app: FastAPI) -> None:
    """One error body for every 4xx and 5xx: FastAPI's and Starlette's own (`{detail}`) replaced."""

    @app.exception_handler(ServingError)
    async def serving_error(request: HttpRequest, error: ServingError) -> JSONResponse:
        return _error_response(error.status, error.error_type, str(error))

    @app.exception_handler(HTTPException)
    async def http_error(request: HttpRequest, error: HTTPException) -> JSONResponse:
        error_type = _HTTP_ERROR_TYPES.get(error.status_code, "internal" if error.status_code >= 500 else "http")
        message = {404: f"No route {request.url.path}; see /docs.",
                   405: f"{request.method} is not allowed on {request.url.path}; allowed: "
                        f"{(error.headers or {}).get('Allow', 'see /docs')}."}.get(error.status_code, error.detail)
        return _error_response(error.status_code, error_type, str(message), headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: HttpRequest, error: RequestValidationError) -> JSONResponse:
        return _error_response(422, "validation", _describe(error.errors()))

    @app.exception_handler(Exception)
    async def internal_error(request: HttpRequest, error: Exception) -> JSONResponse:
        return _internal_error()


def _describe(errors: Any) -> str:
    """pydantic's errors as one line: where and what, one error per field (never the input itself: it may be a
    megabyte)."""
    errors = list(errors)
    invalid = next((e for e in errors if e.get("type") == "json_invalid"), None)
    if invalid is not None:
        reason = invalid.get("ctx", {}).get("error", "")
        return f"Malformed JSON body: {reason}. Send a JSON object such as {{\"inputs\": \"some text\"}}."
    by_field: dict[str, str] = {}
    for e in errors:
        # union members appear in `loc` under their type's name ("constrained-str"): keep field names and indices
        loc = [str(x) for x in e.get("loc", ()) if x != "body" and (isinstance(x, int) or str(x).isidentifier())]
        field = loc[0] if loc else "body"
        if field == "inputs":
            by_field[field] = ("inputs: must be a non-empty string, a non-empty list of token ids (ints >= 0), or a "
                               "non-empty list of those")
        else:
            by_field.setdefault(field, f"{'.'.join(loc) or 'body'}: {e.get('msg', 'invalid')}")
    return "Invalid request body: " + "; ".join(by_field.values()) + ". See /docs for the schema."


def _json_route(max_body_bytes: int, validate: bool = True) -> type[APIRoute]:
    """Routes whose JSON body is read within `max_body_bytes` (413 beyond), then (with `validate`) parsed and
    validated against the route's pydantic model in a worker thread (pydantic's parser also bounds nesting depth);
    without, FastAPI validates it after the route's dependencies ran (the admin token first)."""

    class JsonRoute(APIRoute):
        def get_route_handler(self) -> Callable:
            handler = super().get_route_handler()
            annotation = getattr(getattr(self.body_field, "field_info", None), "annotation", None)
            model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
            if model is None:
                return handler

            async def bounded(request: HttpRequest) -> Response:
                kind = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
                if validate and kind != "application/json" and not kind.endswith("+json"):
                    raise HTTPException(415, f"The body must be JSON (Content-Type: application/json), got {kind}.")
                raw = await _read_body(request, max_body_bytes)
                request._body = raw  # what FastAPI reads next
                if not validate:
                    return await handler(request)
                try:
                    request._json = await _offload(len(raw) <= _INLINE_BYTES, model.model_validate_json, raw)
                except ValidationError as error:
                    raise RequestValidationError(error.errors(include_input=False)) from None
                return await handler(request)

            return bounded

    return JsonRoute


async def _read_body(request: HttpRequest, max_body_bytes: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
        raise PayloadTooLargeError(f"The request body has {declared} bytes; at most {max_body_bytes} allowed.")
    raw = bytearray()
    async for chunk in request.stream():
        raw.extend(chunk)
        if len(raw) > max_body_bytes:
            raise PayloadTooLargeError(f"The request body exceeds {max_body_bytes} bytes.")
    return bytes(raw)


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
