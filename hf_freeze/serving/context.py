"""What the client-compatibility routers (`openai.py`, `hf_compat.py`) share with the native routes of `app.py`: the
same parsing, queueing and streaming, so a request through a stock client runs exactly as a native one does."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from .engine import ServingEngine


@dataclass(frozen=True)
class RouteContext:
    """The app's own request handling, for routers that translate other clients' shapes onto it.

    Attributes:
        engine (`ServingEngine`): base and fine-tunes.
        tokenizer: the base's tokenizer, or `None` (token ids only).
        parse: `await parse(body, task, client)` -> (served models, inputs as token ids, whether one input was
            sent), for a body with `inputs`, `model` (or a fan-out's `models`) and `truncate` (the native schemas);
            `client` is the HTTP request (its models label the metrics).
        run: `await run(task, requests, client=None)` -> the engine's answers (cancelled if `client` leaves).
        generation_requests: `await generation_requests(schemas.GenerateBody, client)` -> (requests, single).
        start_stream: `await start_stream(schemas.GenerateBody, client)` -> (future, event queue) of one streamed
            input.
        route_class: the app's route class (bodies bounded in bytes, validated in a worker thread).
        json_answer: `await json_answer(build)` -> the JSON response of `build()`, written as the native routes
            write theirs (timed as the request's `serialize` phase).
    """

    engine: ServingEngine
    tokenizer: Any
    parse: Callable[..., Awaitable[Any]]
    run: Callable[..., Awaitable[list[Any]]]
    generation_requests: Callable[..., Awaitable[Any]]
    start_stream: Callable[..., Awaitable[Any]]
    route_class: type
    json_answer: Callable[[Callable[[], Any]], Awaitable[Any]]
