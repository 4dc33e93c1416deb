"""What the client-compatibility routers (`openai.py`, `hf_compat.py`) share with the native routes of `app.py`: the
same parsing, queueing and streaming, so a request through a stock client runs exactly as a native one does; and the
events of one streamed generation (`token_events`, `stream_error`), which every streaming route translates."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from .engine import ServingEngine
from .requests import ServingError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RouteContext:
    """The app's own request handling, for routers that translate other clients' shapes onto it.

    Attributes:
        engine (`ServingEngine`): base and fine-tunes.
        tokenizer: the base's tokenizer, or `None` (token ids only).
        parse: `await parse(body, task, client, count=True)` -> (served models, inputs as token ids, whether one
            input was sent), for a body with `inputs`, `model` (or a fan-out's `models`) and `truncate` (the native
            schemas); `client` is the HTTP request (its models label the metrics); `count=False` for inputs parsed
            again later (their tokens are counted then).
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


async def token_events(future: Future, events: asyncio.Queue, tokenizer: Any) -> AsyncIterator[dict[str, Any]]:
    """The events of one streamed generation (`schemas.StreamEvent`, or an `ErrorBody`); closing the stream (the
    client went away) cancels the future, which stops the row at the next decoding step."""
    generated: list[int] = []
    text = ""
    special = set(getattr(tokenizer, "all_special_ids", ()) or ())
    try:
        while True:
            event = await events.get()
            if event is None:  # the future is done; its tokens were all sent before this
                if not future.cancelled() and future.exception() is not None:
                    yield stream_error(future.exception())
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
            yield payload
    finally:
        future.cancel()


def stream_error(error: BaseException) -> dict[str, str]:
    """The error event of a stream that failed after it started: a refusal says why; anything else is logged and
    named without internals (as a 500 is)."""
    if isinstance(error, ServingError):
        return {"error": str(error), "error_type": error.error_type}
    logger.error("A streamed generation failed", exc_info=error)
    return {"error": "Generation failed; the server's log has the details.", "error_type": "generation"}
