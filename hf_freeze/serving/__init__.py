"""Serving fine-tunes of one base that share its frozen prefix: an engine, a repeated-input cache, dynamic
batching, continuous batching for generation (`GenerationScheduler`) and an HTTP app (FastAPI). `ServingEngine`
needs only torch and transformers; `app` needs the `serve` extra (FastAPI, uvicorn, prometheus-client)."""

from .batching import DynamicBatcher
from .engine import ServedModel, ServingEngine
from .prefix_cache import StateCache
from .requests import (
    BaseMismatchServingError,
    EmbedRequest,
    GenerationRequest,
    GenerationResult,
    OverloadedError,
    PayloadTooLargeError,
    Request,
    ServingError,
    UnavailableError,
    UnknownModelError,
    WrongTaskError,
)
from .scheduler import GenerationScheduler

__all__ = [
    "BaseMismatchServingError",
    "DynamicBatcher",
    "EmbedRequest",
    "GenerationRequest",
    "GenerationResult",
    "GenerationScheduler",
    "OverloadedError",
    "PayloadTooLargeError",
    "Request",
    "ServedModel",
    "ServingEngine",
    "ServingError",
    "StateCache",
    "UnavailableError",
    "UnknownModelError",
    "WrongTaskError",
]
