"""Serving fine-tunes of one base that share its frozen prefix: an engine, a repeated-input cache, dynamic
batching and an HTTP app (FastAPI). `ServingEngine` needs only torch and transformers; `app` needs the `serve`
extra (FastAPI, uvicorn, prometheus-client)."""

from .engine import (
    EmbedRequest,
    GenerationRequest,
    Request,
    ServedModel,
    ServingEngine,
    ServingError,
    UnknownModelError,
    WrongTaskError,
)
from .prefix_cache import StateCache

__all__ = [
    "EmbedRequest",
    "GenerationRequest",
    "Request",
    "ServedModel",
    "ServingEngine",
    "ServingError",
    "StateCache",
    "UnknownModelError",
    "WrongTaskError",
]
