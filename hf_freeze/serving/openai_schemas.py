"""Request bodies of the OpenAI-compatible routes (`openai.py`), as the official `openai` client sends them.

Fields the server does not implement are accepted at their OpenAI default (or null) and refused with a 422 naming
the field otherwise, so a client never gets an answer computed without a parameter it asked for. `temperature`
absent or 0 decodes greedily (OpenAI's own default is 1); above 0 it samples.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr, model_validator

from .requests import MAX_NEW_TOKENS, MAX_SEED, MIN_TEMPERATURE
from .schemas import Text, TokenIds

ModelName = Annotated[StrictStr, Field(min_length=1, description="a served model: a fine-tune's name or the base's "
                                                                  "(see GET /v1/models)")]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    # field -> the only values it may take (the OpenAI default, null)
    unsupported: ClassVar[dict[str, tuple[Any, ...]]] = {}

    @model_validator(mode="after")
    def _refuse_unsupported(self) -> _Body:
        for name, allowed in self.unsupported.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"`{name}`={value!r} is not supported by this server; leave it out "
                                 f"(accepted: {' or '.join(repr(a) for a in allowed)}).")
        return self


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = Field(False, description="a last chunk with `usage` and no choices")


class _Sampling(_Body):
    model: ModelName
    max_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS, description="new tokens at most; absent: as the "
                                                                               "model's generation_config says")
    temperature: float | None = Field(None, ge=0, le=100, allow_inf_nan=False,
                                      description="0 or absent: greedy; above 0: sampling at this temperature")
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False, description="nucleus sampling")
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    n: int | None = Field(None, description="1 (one choice per prompt)")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: Any = Field(None, description="not supported (null); use max_tokens or the model's EOS")
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None
    user: StrictStr | None = None

    unsupported = {"n": (None, 1), "stop": (None, [], ""), "presence_penalty": (None, 0),
                    "frequency_penalty": (None, 0), "logit_bias": (None, {})}

    @model_validator(mode="after")
    def _temperature_floor(self) -> _Sampling:
        if self.temperature is not None and 0 < self.temperature < MIN_TEMPERATURE:
            raise ValueError(f"`temperature` must be 0 (greedy) or >= {MIN_TEMPERATURE}, got {self.temperature}.")
        return self


class CompletionBody(_Sampling):
    """`POST /v1/completions`."""

    prompt: Text | TokenIds | Annotated[list[Text], Field(min_length=1)] | Annotated[
        list[TokenIds], Field(min_length=1)]
    echo: bool | None = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: StrictStr | None = None

    unsupported = {**_Sampling.unsupported, "echo": (None, False), "logprobs": (None,), "best_of": (None, 1),
                    "suffix": (None, "")}


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: StrictStr


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | Annotated[list[TextPart], Field(min_length=1)]
    name: StrictStr | None = None


class ChatBody(_Sampling):
    """`POST /v1/chat/completions`: the messages through the tokenizer's chat template."""

    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS, description="alias of max_tokens")
    logprobs: bool | None = False
    top_logprobs: int | None = None
    response_format: Any = None
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None

    unsupported = {**_Sampling.unsupported, "logprobs": (None, False), "top_logprobs": (None,),
                    "response_format": (None, {"type": "text"}), "tools": (None, []), "tool_choice": (None, "none"),
                    "parallel_tool_calls": (None,)}


class EmbeddingBody(_Body):
    """`POST /v1/embeddings`: vectors as `embed` computes them (normalized)."""

    model: ModelName
    input: Text | TokenIds | Annotated[list[Text], Field(min_length=1)] | Annotated[
        list[TokenIds], Field(min_length=1)]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: StrictStr | None = None

    unsupported = {"dimensions": (None,)}




class OpenAIError(BaseModel):
    message: str = Field(description="what went wrong and how to fix it")
    type: str = Field(description="invalid_request_error, or server_error for a 5xx")
    param: str | None = None
    code: str = Field(description="the native error_type (unknown_model, validation, wrong_task, ...)")


class OpenAIErrorBody(BaseModel):
    """Every 4xx and 5xx under `/v1`: OpenAI's error shape, the native `error_type` beside it."""

    error: OpenAIError
    error_type: str
