"""What the engine takes and returns, and the errors the engine, the batcher and the app refuse requests with
(each carries its HTTP status)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


class ServingError(ValueError):
    """A request the engine refuses; `error_type` and `status` are what the HTTP layer reports."""

    error_type = "validation"
    status = 422


class UnknownModelError(ServingError):
    error_type = "unknown_model"
    status = 404


class WrongTaskError(ServingError):
    error_type = "wrong_task"
    status = 424


class PayloadTooLargeError(ServingError):
    """The request body or its client batch is over the server's limit; split the request."""

    error_type = "payload_too_large"
    status = 413


class OverloadedError(ServingError):
    """The queue is full; retry later."""

    error_type = "overloaded"
    status = 429


class UnavailableError(ServingError):
    """The batcher is not running; retry later."""

    error_type = "unhealthy"
    status = 503


class ClientClosedError(ServingError):
    """The client disconnected before its answer was ready (nginx's 499); its inputs were cancelled."""

    error_type = "client_closed"
    status = 499


class BaseMismatchServingError(ValueError):
    """A fine-tune's frozen prefix is not the base's (raised at load time, never per request)."""


@dataclass
class Request:
    """One input for `predict` or `score`: token ids for the fine-tune `model` (`None`: the base)."""

    input_ids: Sequence[int]
    model: str | None = None


@dataclass
class EmbedRequest(Request):
    """One input for `embed`; `normalize` scales the pooled vector to unit L2 norm."""

    normalize: bool = True


@dataclass
class GenerationRequest(Request):
    """One prompt for `generate`.

    Attributes:
        max_new_tokens (`int`, *optional*): at most this many new tokens; `None`: as the model's
            `generation_config` says (its `max_new_tokens`, else its `max_length` counted as `generate` does).
        do_sample (`bool`): sample (with `temperature`, `top_k`, `top_p`, `seed`) instead of greedy decoding.
        stop_token_ids (`Sequence[int]`): generation ends after any of these (the model's EOS ids always stop it).
    """

    max_new_tokens: int | None = None
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop_token_ids: Sequence[int] = ()


@dataclass
class GenerationResult:
    """New token ids (the stop token included when one ended it), why generation ended (`eos` or `length`), and
    each token's log-probability under the distribution it was chosen from (after the logits processors)."""

    token_ids: list[int]
    finish_reason: str
    logprobs: list[float] = field(default_factory=list)


# Bounds of the generation parameters, checked by the engine (`validate_generation`) and declared in the HTTP
# schemas (`schemas.py`), as text-generation-inference and vLLM bound theirs.
MAX_SEED = 2**64 - 1  # seeds are uint64, as in TGI (torch.Generator takes 0 .. 2**64 - 1)
MIN_TEMPERATURE = 1e-2  # below it, logits / temperature overflows to inf and sampling fails (vLLM clamps at 1e-2)
MAX_NEW_TOKENS = 2**16  # also at most the model's positions minus the prompt, when the model has positions
MAX_TOKEN_ID = 2**31 - 1  # token ids and top_k: beyond int32 no vocabulary reaches
MAX_STOP_TOKENS = 64


def validate_generation(request: GenerationRequest) -> None:
    """Refuse bad generation parameters, naming the parameter and what it must be (the bounds above: every value
    that passes decodes without error, so one request cannot fail the batch it runs in)."""

    def number(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    def integer(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    n = request.max_new_tokens
    if n is not None and (not integer(n) or not 1 <= n <= MAX_NEW_TOKENS):
        raise ServingError(f"`max_new_tokens` must be an int in [1, {MAX_NEW_TOKENS}] (or null: the model's "
                           f"generation_config decides), got {n!r}.")
    if not isinstance(request.do_sample, bool):
        raise ServingError(f"`do_sample` must be true or false, got {request.do_sample!r}.")
    if not number(request.temperature) or not request.temperature >= MIN_TEMPERATURE:
        raise ServingError(f"`temperature` must be a finite number >= {MIN_TEMPERATURE}, got "
                           f"{request.temperature!r}; for the most likely tokens decode greedily (do_sample false).")
    if request.top_p is not None and (not number(request.top_p) or not 0 < request.top_p <= 1):
        raise ServingError(f"`top_p` must be a number in (0, 1], got {request.top_p!r}.")
    if request.top_k is not None and (not integer(request.top_k) or not 0 <= request.top_k <= MAX_TOKEN_ID):
        raise ServingError(f"`top_k` must be an int in [0, {MAX_TOKEN_ID}] (0: no top-k), got {request.top_k!r}.")
    if request.seed is not None and (not integer(request.seed) or not 0 <= request.seed <= MAX_SEED):
        raise ServingError(f"`seed` must be an int in [0, 2**64 - 1], got {request.seed!r}.")
    stops = request.stop_token_ids
    if (not isinstance(stops, (list, tuple)) or len(stops) > MAX_STOP_TOKENS
            or not all(integer(t) and 0 <= t <= MAX_TOKEN_ID for t in stops)):
        raise ServingError(f"`stop_token_ids` must be a list of at most {MAX_STOP_TOKENS} token ids (ints >= 0), "
                           f"got {stops!r}.")
