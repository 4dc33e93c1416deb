"""Admin routes: load and remove fine-tunes while the server serves, behind a bearer token.

| route | body | answer |
|---|---|---|
| `POST /admin/models` | `{name, path}` (a local folder, a packaged name or a Hub id) | 201: the model, as in `/info` |
| `DELETE /admin/models/{name}` | | `{"removed": name}` |
| `POST /v1/load_lora_adapter` | vLLM's `{lora_name, lora_path}` | as `POST /admin/models` |
| `POST /v1/unload_lora_adapter` | vLLM's `{lora_name}` | as `DELETE /admin/models/{name}` |

The routes are off unless the server has an admin token (`hf-freeze serve --admin-token` or the environment
variable `HF_FREEZE_ADMIN_TOKEN`): they answer 404 saying how to turn them on. With one, a request needs
`Authorization: Bearer <token>`: 401 without it, 403 with another token (compared in constant time).

Loading runs in a worker thread, off the event loop; the weight files' sha256 are checked outside the engine's
lock (a plain transformers folder is loaded there entirely), so other requests keep being answered, and the lock is
held to read a checkpoint's suffix onto the base's shared tensors and register the model
(`ServingEngine.load_model`). Refused, with traffic undisturbed: a fine-tune of another base or a name in use (409
`conflict`), a missing path or a corrupt or unloadable folder (422
`bad_model_source`). Removing a model waits for the running batch; its requests still queued get a 404
(`unknown_model`), generations already decoding finish.
"""

from __future__ import annotations

import hmac
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Header
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, StrictStr

from .engine import ServingEngine
from .openai_schemas import OpenAIErrorBody
from .requests import BaseMismatchServingError, ServingError, UnknownModelError
from .schemas import ErrorBody

logger = logging.getLogger(__name__)
TOKEN_ENV = "HF_FREEZE_ADMIN_TOKEN"
# Served names are labels in /metrics and keys in URLs: keep them short and plain.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
Name = Annotated[StrictStr, Field(pattern=NAME_PATTERN, description="the name requests will use (letters, digits, "
                                                                    "`.`, `_`, `-`; at most 64)")]
Source = Annotated[StrictStr, Field(min_length=1, max_length=4096,
                                    description="a local folder (hf_freeze checkpoint or transformers folder), a "
                                                "packaged short name or a Hub id")]


class AdminDisabledError(ServingError):
    error_type = "not_found"
    status = 404


class UnauthorizedError(ServingError):
    error_type = "unauthorized"
    status = 401


class ForbiddenError(ServingError):
    error_type = "forbidden"
    status = 403


class ConflictError(ServingError):
    """A name in use, or a fine-tune of another base."""

    error_type = "conflict"
    status = 409


class BadSourceError(ServingError):
    error_type = "bad_model_source"
    status = 422


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class LoadBody(_Body):
    """`POST /admin/models`."""

    name: Name
    path: Source


class LoadLoraBody(_Body):
    """`POST /v1/load_lora_adapter` (vLLM's payload)."""

    lora_name: Name
    lora_path: Source


class UnloadLoraBody(_Body):
    """`POST /v1/unload_lora_adapter` (vLLM's payload)."""

    lora_name: StrictStr


class Removed(BaseModel):
    removed: str


def admin_token(explicit: str | None = None) -> str | None:
    """The admin token: `explicit`, else `$HF_FREEZE_ADMIN_TOKEN`; `None` (routes off) when neither is set."""
    token = explicit if explicit is not None else os.environ.get(TOKEN_ENV)
    return token or None


def admin_router(engine: ServingEngine, token: str | None, on_removed: Callable[[str], None] | None = None,
                 route_class: type[APIRoute] = APIRoute) -> APIRouter:
    """The admin routes over `engine` (see the module docstring); `on_removed(name)` runs after a removal (the
    metrics drop the model's series); `route_class`: one that bounds bodies in bytes, as on every route."""
    errors = {status: {"model": ErrorBody} for status in (401, 403, 404, 409, 413, 422)}
    # vLLM's aliases live under /v1, where every error has OpenAI's shape (openai.OpenAIErrors)
    openai_errors = {status: {"model": OpenAIErrorBody} for status in errors}

    def authorize(authorization: Annotated[str | None, Header()] = None) -> None:
        if token is None:
            raise AdminDisabledError(f"The admin routes are off; start the server with `--admin-token TOKEN` (or set "
                                     f"{TOKEN_ENV}) to load and remove fine-tunes while serving.")
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise UnauthorizedError("The admin routes need `Authorization: Bearer <admin token>`.")
        if not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise ForbiddenError("Wrong admin token.")

    router = APIRouter(dependencies=[Depends(authorize)], responses=errors, tags=["admin"], route_class=route_class)

    async def load(name: str, path: str) -> JSONResponse:
        if name in engine.models:
            raise ConflictError(f"A model named {name!r} is already served; remove it first "
                                f"(DELETE /admin/models/{name}) or choose another name.")
        try:
            served = await run_in_threadpool(_load, engine, name, path)
        except BaseMismatchServingError as error:
            raise ConflictError(" ".join(str(error).split())) from None
        logger.info("Loaded %r from %s", name, path)
        return JSONResponse(served.describe(), status_code=201)

    async def remove(name: str) -> Removed:
        try:
            await run_in_threadpool(engine.remove_model, name)
        except UnknownModelError:
            raise
        except ValueError as error:  # the base
            raise ConflictError(str(error)) from None
        if on_removed is not None:
            on_removed(name)
        logger.info("Removed %r", name)
        return Removed(removed=name)

    @router.post("/admin/models", status_code=201)
    async def load_model(body: LoadBody) -> JSONResponse:
        """Load a fine-tune of the base from `path` and serve it as `name`."""
        return await load(body.name, body.path)

    @router.delete("/admin/models/{name}")
    async def remove_model(name: str) -> Removed:
        """Stop serving the fine-tune `name`."""
        return await remove(name)

    @router.post("/v1/load_lora_adapter", status_code=201, responses=openai_errors)
    async def load_lora_adapter(body: LoadLoraBody) -> JSONResponse:
        """vLLM's route name and payload for `POST /admin/models`."""
        return await load(body.lora_name, body.lora_path)

    @router.post("/v1/unload_lora_adapter", responses=openai_errors)
    async def unload_lora_adapter(body: UnloadLoraBody) -> Removed:
        """vLLM's route name and payload for `DELETE /admin/models/{name}`."""
        return await remove(body.lora_name)

    return router


def _load(engine: ServingEngine, name: str, path: str):
    """`engine.load_model` with the source resolved (a Hub id downloaded, or taken from the local cache); every
    failure that is the source's fault becomes a `BadSourceError` naming it."""
    from ..checkpoint import CheckpointError
    from ..commands.errors import CommandError, check_model_source

    try:
        source = check_model_source(path, what=f"the model {name!r}:")
        if not Path(source).is_dir():  # a Hub id: its files, from the Hub or the local cache
            from huggingface_hub import snapshot_download

            source = snapshot_download(source)
        return engine.load_model(name, source)
    except (BaseMismatchServingError, ServingError):
        raise
    except ValueError as error:
        if name in engine.models:  # loaded meanwhile by a concurrent request
            raise ConflictError(str(error)) from None
        raise BadSourceError(_one_line(error)) from None
    except (CommandError, CheckpointError, OSError) as error:
        raise BadSourceError(_one_line(error)) from None
    except Exception as error:  # anything else the folder makes from_pretrained raise
        logger.warning("Loading %r from %s failed", name, path, exc_info=True)
        raise BadSourceError(f"Cannot load {path} as {name!r}: {type(error).__name__}: {_one_line(error)}") from None


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())

