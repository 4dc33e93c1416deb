"""Request and response bodies of the HTTP routes (pydantic models): validation in one place, before the queue, as
text-generation-inference's router does. FastAPI publishes them at `/openapi.json` and `/docs`.

Bodies are strict (a string is not a number, `"false"` is not a boolean, `1.0` is not a token id) and refuse
unknown fields. The bounds are those the engine checks (`requests.py`), so a body that passes can only fail on
what depends on the model (its vocabulary, its positions, its task): those the engine refuses with a 4xx too.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from .requests import (
    MAX_NEW_TOKENS,
    MAX_SEED,
    MAX_STOP_TOKENS,
    MAX_TOKEN_ID,
    MIN_TEMPERATURE,
)

TokenId = Annotated[StrictInt, Field(ge=0, le=MAX_TOKEN_ID)]
TokenIds = Annotated[list[TokenId], Field(min_length=1, description="token ids of one input")]
Text = Annotated[StrictStr, Field(min_length=1, description="one input, tokenized with the base's tokenizer")]
Inputs = Annotated[
    Text | TokenIds | Annotated[list[Text | TokenIds], Field(min_length=1)],
    Field(description="a string, a list of token ids, or a list of either (a client batch)"),
]
ModelName = Annotated[StrictStr | None, Field(description="the fine-tune to ask; absent: the base")]
FanOut = Annotated[
    Literal["*"] | Annotated[list[StrictStr], Field(min_length=1, max_length=256)] | None,
    Field(description="fan-out: run every input through each of these models (or `\"*\"`: all that can do the "
                      "task) instead of `model`; the answer is then `{model name: answer}`"),
]
Truncate = Annotated[bool, Field(description="cut inputs longer than the model's positions instead of refusing them "
                                             "(the first tokens are kept; for /generate the last ones)")]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _FanOutBody(_Body):
    """What /predict, /embed and /score share: inputs for one model (`model`) or a fan-out (`models`)."""

    inputs: Inputs
    model: ModelName = None
    models: FanOut = None
    truncate: Truncate = False


class PredictBody(_FanOutBody):
    """`POST /predict`: sequence classification."""

    raw_scores: bool = Field(False, description="logits instead of probabilities")


class EmbedBody(_FanOutBody):
    """`POST /embed`: pooled last hidden states."""

    normalize: bool = Field(True, description="scale each vector to unit L2 norm")


class ScoreBody(_FanOutBody):
    """`POST /score`: log-likelihood of each token after the first, under a causal LM."""


class GenerateParameters(_Body):
    """Decoding parameters, bounded as text-generation-inference bounds them."""

    max_new_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS,
                                       description="at most this many new tokens (prompt + these fit the model's "
                                                   "positions); absent: as the model's generation_config says")
    do_sample: bool = Field(False, description="sample instead of greedy decoding")
    temperature: float = Field(1.0, ge=MIN_TEMPERATURE, allow_inf_nan=False,
                               description="divides the logits before sampling")
    top_k: int | None = Field(None, ge=0, le=MAX_TOKEN_ID, description="sample among the k most likely (0: all)")
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False,
                                description="sample among the most likely tokens whose probabilities sum to top_p")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="uint64 seed of this request's sampling")
    stop_token_ids: list[TokenId] = Field(default_factory=list, max_length=MAX_STOP_TOKENS,
                                          description="generation ends after any of these (and the model's EOS)")


class GenerateBody(_Body):
    """`POST /generate` and `POST /generate_stream` (one input): decoding, in text-generation-inference's shape;
    what `parameters` leaves out follows the model's `generation_config`."""

    inputs: Inputs
    model: ModelName = None
    parameters: GenerateParameters | None = None
    truncate: Truncate = False


class Label(BaseModel):
    label: str
    score: float


class Scored(BaseModel):
    token_ids: list[int]
    logprobs: list[float] = Field(description="log-likelihood of each token after the first")


class GenerationDetails(BaseModel):
    finish_reason: str = Field(description="`eos` (an EOS or stop token ended it) or `length`")
    generated_tokens: int


class Generated(BaseModel):
    generated_text: str | None = Field(description="the new tokens decoded (null when the server has no tokenizer)")
    token_ids: list[int]
    details: GenerationDetails


class StreamToken(BaseModel):
    id: int
    text: str | None = Field(description="the text this token adds (null when the server has no tokenizer)")
    logprob: float = Field(description="its log-probability under the distribution it was chosen from")
    special: bool = Field(description="whether it is one of the tokenizer's special tokens")


class StreamEvent(BaseModel):
    """One `data:` event of `POST /generate_stream` (text-generation-inference's shape)."""

    index: int = Field(description="the token's position among the new tokens, from 1")
    token: StreamToken
    generated_text: str | None = Field(description="on the last event: all new tokens decoded; else null")
    details: GenerationDetails | None = Field(description="on the last event; else null")


PredictResponse = list[Label] | list[list[Label]] | dict[str, list[Label] | list[list[Label]]]
EmbedResponse = list[list[float]] | dict[str, list[list[float]]]
ScoreResponse = Scored | list[Scored] | dict[str, Scored | list[Scored]]
GenerateResponse = Generated | list[Generated]


class Health(BaseModel):
    status: str


class Info(BaseModel):
    model_config = ConfigDict(extra="allow")

    base: str
    base_name: str
    fingerprint: str
    num_blocks: int
    dtype: str
    models: list[dict[str, Any]]
    limits: dict[str, Any]


class ErrorBody(BaseModel):
    """Every 4xx and 5xx answer."""

    error: str = Field(description="what went wrong and how to fix it")
    error_type: str = Field(description="validation, unknown_model, wrong_task, payload_too_large, overloaded, "
                                        "not_found, method_not_allowed, unhealthy, internal; on the admin routes "
                                        "unauthorized, forbidden, conflict or bad_model_source")
