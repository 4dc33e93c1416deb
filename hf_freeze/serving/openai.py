"""OpenAI-compatible routes (`/v1/...`), a thin translation onto the engine calls the native routes make (the same
parsing, batching and continuous batching), for the official `openai` client and the tools built on it.

| route | body | answer |
|---|---|---|
| `GET /v1/models` | | every served model: the base (`parent: null`) and each fine-tune (`parent`: the base) |
| `POST /v1/embeddings` | `{model, input, encoding_format?}` | `{data: [{embedding, index}], usage}` (unit vectors) |
| `POST /v1/completions` | `{model, prompt, max_tokens?, temperature?, top_p?, seed?, stream?}` | `text_completion` |
| `POST /v1/chat/completions` | `{model, messages, ...}` (the tokenizer's chat template) | `chat.completion` |

`model` names the fine-tune (or the base, by its name); it is required, as OpenAI requires it. `temperature` absent
or 0 decodes greedily (OpenAI defaults to 1); above 0 it samples. `stream: true` answers server-sent events in
OpenAI's chunk format (`text_completion` / `chat.completion.chunk`), the last finish reason in the last chunk, then
`data: [DONE]`; with `stream_options: {include_usage: true}` a chunk with `usage` and no choices comes before it.
Finish reasons: `stop` (an EOS token) or `length`. Fields the server does not implement (`stop`, `n` > 1,
`logprobs`, penalties, tools, ...) are refused with a 422 naming the field (`openai_schemas.py`).

Errors under `/v1` have OpenAI's shape, which the `openai` client parses into its exceptions (404 `NotFoundError`,
422 `UnprocessableEntityError`, 424 / 413 `APIStatusError`, ...): `{"error": {"message", "type", "param", "code"},
"error_type"}`; `code` and `error_type` are the native `error_type` (`unknown_model`, `validation`, ...). An error
after a stream has started is one event `data: {"error": {...}}`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import Future
from typing import Any

from fastapi import APIRouter
from fastapi import Request as HttpRequest
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response, StreamingResponse

from . import schemas
from .context import RouteContext, stream_error
from .openai_schemas import ChatBody, CompletionBody, EmbeddingBody, OpenAIErrorBody
from .requests import EmbedRequest, ServingError

_FINISH = {"eos": "stop", "length": "length"}
_ERRORS = {status: {"model": OpenAIErrorBody} for status in (404, 413, 415, 422, 424, 429, 500, 503)}


def router(context: RouteContext) -> APIRouter:
    """The `/v1` routes over `context` (the app's own parsing and queueing)."""
    api = APIRouter(prefix="/v1", route_class=context.route_class, tags=["OpenAI-compatible"])
    engine, tokenizer = context.engine, context.tokenizer
    created = int(time.time())

    @api.get("/models")
    async def models() -> dict[str, Any]:
        """Every served model: the base and its fine-tunes (each names the base as `parent`)."""
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "hf_freeze", "parent": m.parent,
             "root": engine.base_name, "tasks": list(m.tasks), "max_model_len": m.max_input_tokens}
            for name, m in list(engine.models.items())]}  # a snapshot: fine-tunes may be added meanwhile

    @api.post("/embeddings", responses=_ERRORS)
    async def embeddings(body: EmbeddingBody, request: HttpRequest) -> Response:
        native = schemas.EmbedBody.model_construct(inputs=body.input, model=body.model, normalize=True, truncate=False)
        (served,), ids, _ = await context.parse(native, "embed", request)
        vectors = await context.run("embed", [EmbedRequest(i, model=served.name, normalize=True) for i in ids])

        def answer() -> dict[str, Any]:
            def encoded(vector: Any) -> Any:
                if body.encoding_format == "base64":  # little-endian float32, as OpenAI sends them
                    return base64.b64encode(vector.numpy().astype("<f4").tobytes()).decode()
                return vector.tolist()

            tokens = sum(len(i) for i in ids)
            return {"object": "list", "model": served.name, "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                    "data": [{"object": "embedding", "index": j, "embedding": encoded(v)}
                             for j, v in enumerate(vectors)]}

        return await context.json_answer(answer)

    @api.post("/completions", responses=_ERRORS)
    async def completions(body: CompletionBody, request: HttpRequest) -> Response:
        return await _complete(context, body, body.prompt, request, chat=False)

    @api.post("/chat/completions", responses=_ERRORS)
    async def chat_completions(body: ChatBody, request: HttpRequest) -> Response:
        ids = await run_in_threadpool(_chat_prompt, tokenizer, body)
        return await _complete(context, body, ids, request, chat=True)

    return api


async def _complete(context: RouteContext, body: CompletionBody | ChatBody, inputs: Any, request: HttpRequest,
                    chat: bool) -> Response:
    """A completion (or chat completion) of `inputs`: JSON, or with `stream` server-sent chunks."""
    max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens
    sampling = bool(body.temperature)
    parameters = schemas.GenerateParameters.model_construct(
        max_new_tokens=max_tokens, do_sample=sampling, temperature=body.temperature if sampling else 1.0,
        top_k=None, top_p=body.top_p if sampling else None, seed=body.seed, stop_token_ids=[])
    native = schemas.GenerateBody.model_construct(inputs=inputs, model=body.model, parameters=parameters,
                                                  truncate=False)
    head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
            "model": body.model}
    tokenizer = context.tokenizer
    # tokenized once: the prompts' lengths are the usage
    _, ids, single = await context.parse(native, "generate", request, count=False)  # counted when queued
    native.inputs = ids[0] if single else ids
    if body.stream:
        if not single:
            raise ServingError("`stream` takes one prompt; send a list of prompts without `stream`.")
        future, events = await context.start_stream(native, request)  # a bad body is refused here, before the stream
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_chunks(future, events, tokenizer, head, chat, len(ids[0]) if include_usage else None),
                                 media_type="text/event-stream")
    requests, _ = await context.generation_requests(native, request)
    results = await context.run("generate", requests, client=request)

    def answer() -> dict[str, Any]:
        choices = []
        for j, result in enumerate(results):
            text = _decode(tokenizer, result.token_ids)
            choice = {"index": j, "finish_reason": _FINISH[result.finish_reason], "logprobs": None}
            choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
            choices.append(choice)
        prompt = sum(len(r.input_ids) for r in requests)
        completion = sum(len(r.token_ids) for r in results)
        return {**head, "object": "chat.completion" if chat else "text_completion", "choices": choices,
                "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                          "total_tokens": prompt + completion}}

    return await context.json_answer(answer)


async def _chunks(future: Future, events: asyncio.Queue, tokenizer: Any, head: dict[str, Any], chat: bool,
                  usage_prompt: int | None) -> AsyncIterator[str]:
    """OpenAI's stream of one generation: a chunk per token that adds text, the finish reason in the last one,
    `usage` if asked (`usage_prompt`: the prompt's tokens), then `[DONE]`. Closing the stream (the client left)
    cancels the row."""
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(text: str | None, finish: str | None, role: bool = False) -> str:
        if chat:
            delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        return _event({**head, "object": obj, "choices": [choice]})

    deltas = _TextDeltas(tokenizer)
    try:
        if chat:
            yield chunk(None, None, role=True)
        while True:
            event = await events.get()
            if event is None:
                if not future.cancelled() and future.exception() is not None:
                    error = stream_error(future.exception())
                    yield _event({"error": {"message": error["error"], "type": "server_error", "param": None,
                                            "code": error["error_type"]}})
                    return
                break
            token, _, result = event
            text = deltas.add(token, final=result is not None)
            if result is not None:
                yield chunk(text, _FINISH[result.finish_reason])
                if usage_prompt is not None:
                    prompt, completion = usage_prompt, len(result.token_ids)
                    yield _event({**head, "object": obj, "choices": [], "usage": {
                        "prompt_tokens": prompt, "completion_tokens": completion,
                        "total_tokens": prompt + completion}})
            elif text:
                yield chunk(text, None)
        yield "data: [DONE]\n\n"
    finally:
        future.cancel()


class _TextDeltas:
    """The text each new token adds to a generation (special tokens skipped, as in the final text), held back
    while it ends in an incomplete character, so that the deltas concatenate to the decoded whole."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.tokens, self.sent = tokenizer, [], ""

    def add(self, token: int, final: bool) -> str:
        self.tokens.append(token)
        text = _decode(self.tokenizer, self.tokens)
        if (text.endswith("\ufffd") and not final) or not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta


def _decode(tokenizer: Any, token_ids: list[int]) -> str:
    return tokenizer.decode(token_ids, skip_special_tokens=True) if tokenizer is not None else ""


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _chat_prompt(tokenizer: Any, body: ChatBody) -> list[int]:
    """The token ids of `body.messages` through the tokenizer's chat template, ready for the assistant's turn."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ServingError("This server's tokenizer has no chat template, so /v1/chat/completions cannot format "
                           "messages; send the formatted text to /v1/completions instead.")
    messages = [{"role": m.role, "content": m.content if isinstance(m.content, str)
                 else "".join(part.text for part in m.content)} for m in body.messages]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not ids:
        raise ServingError("The messages are empty once formatted; send some text.")
    return ids


class OpenAIErrors:
    """ASGI middleware: an error answered under `/v1` (by any layer: routing, body limits, validation, the engine)
    is rewritten from the native `{error, error_type}` into OpenAI's `{"error": {message, type, param, code}}`,
    keeping `error_type` beside it."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not (scope["path"] + "/").startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        start: dict | None = None
        chunks: list[bytes] = []

        async def send_openai(message: dict) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                kind = dict(message.get("headers", [])).get(b"content-type", b"")
                if message["status"] >= 400 and kind.startswith(b"application/json"):
                    start = message  # held until the body is complete
                    return
            elif start is not None and message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                if message.get("more_body"):
                    return
                body = _openai_error(b"".join(chunks), start["status"])
                headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
                await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
            await send(message)

        await self.app(scope, receive, send_openai)


def _openai_error(raw: bytes, status: int) -> bytes:
    try:
        native = json.loads(raw)
    except ValueError:
        return raw
    if not isinstance(native, dict) or not isinstance(native.get("error"), str):
        return raw
    error_type = native.get("error_type", "internal")
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return json.dumps({"error": {"message": native["error"], "type": kind, "param": None, "code": error_type},
                       "error_type": error_type}).encode()



__all__ = ["OpenAIErrors", "router"]
