"""The routes Hugging Face's own clients call: `huggingface_hub.InferenceClient(base_url=...)` and
`text_generation.Client(base_url)` post every task to the base URL itself, so `POST /` takes all of their payloads
(text-generation-inference's `{inputs, parameters, stream}`, text-embeddings-inference's `{inputs, normalize, ...}`,
the Inference API's `{inputs, parameters: {function_to_apply, top_k}}`) and answers in the shape each expects.
`POST /models/{model}` is the same for the fine-tune `model` (a base URL per fine-tune, for the tasks whose
payload cannot name one).

Which task a payload asks for, in order:
1. `generate` when it has `stream` or a generation parameter (any `parameters` key but `top_k`, `adapter_id`,
   `function_to_apply`): what both clients' `text_generation` always send;
2. `embed` when it has a feature-extraction field at its root (`normalize`, `truncation_direction`, `prompt_name`,
   `dimensions`, `encoding_format`);
3. `predict` when `parameters` has `function_to_apply`;
4. else the first of `predict`, `embed`, `generate` that the model serves (its task decides `{inputs}` alone).

The model is the one in the path, else `parameters.adapter_id` (text-generation-inference's name for a LoRA
adapter: here a fine-tune's name), else the base. Answers: classification `[[{label, score}]]` (one list per input,
best first), embeddings `[[float]]`, generation `[{generated_text, details}]` or, streamed, TGI's events with
`details.finish_reason` in TGI's words (`eos_token`, `length`). TGI's client sends every generation parameter,
nulls included: each is accepted at null or its default; a value the server does not implement (`best_of` > 1,
`stop` sequences, `repetition_penalty`, `watermark`, `grammar`, ...) is a 422 naming it. Errors are the native
`{error, error_type}`, which both clients turn into their exceptions (`validation` -> `ValidationError`, ...).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any, ClassVar, Literal

from fastapi import APIRouter
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError, model_validator

from . import schemas
from .context import RouteContext, token_events
from .requests import MAX_NEW_TOKENS, MAX_SEED, EmbedRequest, Request, ServingError

_TGI_FINISH = {"eos": "eos_token", "length": "length"}
_EMBED_FIELDS = ("normalize", "truncation_direction", "prompt_name", "dimensions", "encoding_format")
_ERRORS = {status: {"model": schemas.ErrorBody} for status in (404, 413, 415, 422, 424, 429, 500, 503)}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    # field -> the only values it may take (null and the clients' defaults)
    unsupported: ClassVar[dict[str, tuple[Any, ...]]] = {}

    @model_validator(mode="after")
    def _refuse_unsupported(self) -> _Strict:
        for name, allowed in self.unsupported.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"`{name}`={value!r} is not supported by this server; leave it out or send "
                                 f"{' or '.join(repr(a) for a in allowed)}.")
        return self


class RootBody(_Strict):
    """`POST /` and `POST /models/{model}`: any of the payloads above (`parameters` is checked once the task is
    known: `TGIParameters` or `ClassifyParameters`)."""

    inputs: schemas.Inputs
    parameters: dict[str, Any] | None = None
    stream: bool | None = None
    normalize: bool | None = Field(None, description="feature extraction: unit vectors (default true)")
    truncate: bool | None = Field(None, description="feature extraction / classification: cut long inputs")
    raw_scores: bool | None = Field(None, description="classification: logits instead of probabilities")
    truncation_direction: Literal["right", "Right"] | None = None
    prompt_name: None = None
    dimensions: None = None
    encoding_format: Literal["float"] | None = None


class TGIParameters(_Strict):
    """text-generation-inference's generation parameters, as its clients send them (nulls included)."""

    adapter_id: StrictStr | None = Field(None, description="the fine-tune to ask (TGI: a LoRA adapter)")
    max_new_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    do_sample: bool = False
    temperature: float | None = Field(None, gt=0, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=1)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    truncate: int | None = Field(None, ge=1, description="keep the prompt's last `truncate` tokens")
    details: bool = False
    return_full_text: bool = False
    best_of: int | None = None
    decoder_input_details: bool = False
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    typical_p: float | None = None
    top_n_tokens: int | None = None
    stop: list[StrictStr] = Field(default_factory=list)
    watermark: bool = False
    grammar: Any = None

    unsupported = {"best_of": (None, 1), "decoder_input_details": (False,), "frequency_penalty": (None, 0),
                   "repetition_penalty": (None, 1), "typical_p": (None, 1), "top_n_tokens": (None, 0),
                   "stop": ([],), "watermark": (False,), "grammar": (None,)}

    @property
    def sampling(self) -> bool:
        """TGI's rule: `do_sample`, or any warper away from its neutral value."""
        return (self.do_sample or self.temperature not in (None, 1) or self.top_k is not None
                or self.top_p not in (None, 1))


class ClassifyParameters(_Strict):
    """The Inference API's text-classification parameters."""

    adapter_id: StrictStr | None = None
    function_to_apply: Literal["softmax", "sigmoid", "none"] | None = None
    top_k: int | None = Field(None, ge=1)


_NOT_GENERATION = {"top_k", "adapter_id", "function_to_apply"}


def router(context: RouteContext) -> APIRouter:
    """`POST /` and `POST /models/{model}` over `context`."""
    api = APIRouter(route_class=context.route_class, tags=["Hugging Face clients"])

    @api.post("/", responses=_ERRORS)
    async def root(body: RootBody, request: HttpRequest) -> Response:
        """Text generation (TGI), feature extraction (TEI) or text classification, told apart by the payload."""
        return await _dispatch(context, body, None, request)

    @api.post("/models/{model}", responses=_ERRORS)
    async def root_of_model(model: str, body: RootBody, request: HttpRequest) -> Response:
        """`POST /` for the served model `model`."""
        return await _dispatch(context, body, model, request)

    return api


async def _dispatch(context: RouteContext, body: RootBody, model: str | None, request: HttpRequest) -> Response:
    parameters = body.parameters or {}
    adapter = parameters.get("adapter_id")
    if model is not None and adapter is not None and adapter != model:
        raise ServingError(f"The path names model {model!r} and `adapter_id` names {adapter!r}; send one.")
    name = model or adapter
    if body.stream is not None or set(parameters) - _NOT_GENERATION:
        task = "generate"
    elif any(getattr(body, f) is not None for f in _EMBED_FIELDS):
        task = "embed"
    elif "function_to_apply" in parameters:
        task = "predict"
    else:
        served = context.engine.models.get(name or context.engine.base_name)  # unknown: a 404 from `parse` below
        task = next((t for t in ("predict", "embed", "generate") if served and t in served.tasks), "predict")
    if task == "generate":
        return await _generate(context, body, _validated(TGIParameters, parameters), name, request)
    if body.stream is not None:
        raise ServingError("`stream` is for text generation only.")
    native = {"inputs": body.inputs, "model": name, "truncate": bool(body.truncate)}
    if task == "embed":
        if body.raw_scores is not None or parameters:
            raise ServingError("Feature extraction takes `inputs`, `normalize` and `truncate`; remove `parameters` "
                               "and `raw_scores`.")
        normalize = body.normalize is not False
        (served,), ids, _ = await context.parse(schemas.EmbedBody.model_construct(**native, normalize=normalize),
                                                "embed", request)
        vectors = await context.run("embed", [EmbedRequest(i, model=served.name, normalize=normalize) for i in ids])
        return await context.json_answer(lambda: [v.tolist() for v in vectors])
    classify = _validated(ClassifyParameters, parameters)
    (served,), ids, _ = await context.parse(schemas.PredictBody.model_construct(**native, raw_scores=False),
                                            "predict", request)
    logits = await context.run("predict", [Request(i, model=served.name) for i in ids])
    id2label = served.model.config.id2label
    apply = "none" if body.raw_scores else (classify.function_to_apply or "softmax")

    def answer() -> Any:
        answers = []
        for row in logits:
            scores = {"softmax": row.softmax(-1), "sigmoid": row.sigmoid(), "none": row}[apply]
            order = scores.argsort(descending=True).tolist()[: classify.top_k]
            answers.append([{"label": id2label.get(j, str(j)), "score": float(scores[j])} for j in order])
        return answers

    return await context.json_answer(answer)


async def _generate(context: RouteContext, body: RootBody, params: TGIParameters, name: str | None,
                    request: HttpRequest) -> Response:
    """TGI's `POST /`: `[{generated_text, details}]`, or with `stream` its server-sent events."""
    if any(getattr(body, f) is not None for f in (*_EMBED_FIELDS, "truncate", "raw_scores")):
        raise ServingError("Text generation takes `inputs`, `parameters` and `stream`; the other fields belong to "
                           "feature extraction and classification.")
    sampling = params.sampling
    parameters = schemas.GenerateParameters.model_construct(
        max_new_tokens=params.max_new_tokens, do_sample=sampling,
        temperature=params.temperature if sampling and params.temperature else 1.0,
        top_k=params.top_k if sampling else None, top_p=params.top_p if sampling else None, seed=params.seed,
        stop_token_ids=[])
    native = schemas.GenerateBody.model_construct(inputs=body.inputs, model=name, parameters=parameters,
                                                  truncate=False)
    _, ids, single = await context.parse(native, "generate", request, count=False)  # counted when queued
    if params.truncate is not None:  # TGI's truncate: the prompt's last tokens
        ids = [i[-params.truncate:] for i in ids]
    native.inputs = ids[0] if single else ids
    tokenizer = context.tokenizer
    if body.stream:
        future, events = await context.start_stream(native, request)
        return StreamingResponse(_tgi_events(token_events(future, events, tokenizer), params.seed, len(ids[0])),
                                 media_type="text/event-stream")
    requests, _ = await context.generation_requests(native, request)
    results = await context.run("generate", requests, client=request)
    special = set(getattr(tokenizer, "all_special_ids", ()) or ())

    def answer() -> list[dict[str, Any]]:
        answers = []
        for prompt, result in zip(ids, results):
            text = _decode(tokenizer, result.token_ids, skip_special=True)
            if params.return_full_text:
                text = _decode(tokenizer, prompt, skip_special=True) + text
            generated: dict[str, Any] = {"generated_text": text}
            if params.details:
                generated["details"] = {
                    "finish_reason": _TGI_FINISH[result.finish_reason], "generated_tokens": len(result.token_ids),
                    "seed": params.seed, "prefill": [], "top_tokens": None, "best_of_sequences": None,
                    "tokens": [{"id": t, "text": _decode(tokenizer, [t], skip_special=False), "logprob": lp,
                                "special": t in special} for t, lp in zip(result.token_ids, result.logprobs)]}
            answers.append(generated)
        return answers

    return await context.json_answer(answer)


async def _tgi_events(events: AsyncIterator[dict[str, Any]], seed: int | None, input_length: int
                      ) -> AsyncIterator[str]:
    """The native stream's events in TGI's words (errors pass through: they are already TGI's shape)."""
    try:
        async for event in events:
            if "token" in event:
                event["token"]["text"] = event["token"]["text"] or ""
                event["top_tokens"] = None
                if event["details"] is not None:
                    event["details"] = {"finish_reason": _TGI_FINISH[event["details"]["finish_reason"]],
                                        "generated_tokens": event["details"]["generated_tokens"], "seed": seed,
                                        "input_length": input_length}
            yield f"data: {json.dumps(event)}\n\n"
    finally:
        await events.aclose()  # the client left: the native stream cancels its row


def _validated(model: type[_Strict], parameters: dict[str, Any]) -> Any:
    """`parameters` as `model`, or the native 422 naming `parameters.<field>`."""
    try:
        return model.model_validate(parameters)
    except ValidationError as error:
        errors = error.errors(include_input=False)
        for e in errors:
            e["loc"] = ("body", "parameters", *e.get("loc", ()))
        raise RequestValidationError(errors) from None


def _decode(tokenizer: Any, token_ids: list[int], skip_special: bool) -> str:
    return tokenizer.decode(token_ids, skip_special_tokens=skip_special) if tokenizer is not None else ""
