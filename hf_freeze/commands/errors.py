"""How `hf-freeze` subcommands fail: one line on stderr naming the problem and the fix, a non-zero exit status.

`check_model_source` refuses, before anything is loaded, a path that does not exist, a folder whose `config.json`
is missing or unreadable, a name that is neither a folder nor a valid Hub id, a Hub id the Hub does not know or
cannot be reached for (one request, no retries), and a Hub id while the Hub is offline with no cached copy.
Whatever else goes wrong reaches `error_line` (called by `hf_freeze.cli.main`), which turns the exception into that
one line; `--debug` (or `HF_FREEZE_DEBUG=1`) shows the traceback instead.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

DEBUG_ENV = "HF_FREEZE_DEBUG"
_FOLDER_KINDS = "a local folder, a Hub id (`user/name`) or a packaged model name (minilm, mpnet, smollm2)"


class CommandError(Exception):
    """A mistake in a command's arguments or inputs; its message says what is wrong and how to fix it."""


def check_model_source(name: str, *, what: str = "the model") -> str:
    """`name` as something `from_pretrained` can load: a packaged model's folder for its short name, else `name`.

    Raises:
        `CommandError`: `name` looks like a path and does not exist (or is a file, or a folder without a readable
            `config.json`), is neither a folder nor a valid Hub id, is a Hub id the Hub does not know or cannot be
            reached for, or is a Hub id while `HF_HUB_OFFLINE=1` and nothing of it is cached.
    """
    from huggingface_hub import HfApi, constants, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError
    from huggingface_hub.utils import validate_repo_id

    from ..assets import MODEL_NAMES, resolve_model

    if name in MODEL_NAMES:
        return resolve_model(name)  # a packaged model that is not installed raises MissingAssetError, with its fix
    path = Path(name).expanduser()
    if path.is_file():
        raise CommandError(f"{what} {name} is a file; pass {_FOLDER_KINDS}.")
    if path.is_dir():
        check_model_folder(path, what=what)
        return name
    if _looks_like_a_path(name):
        raise CommandError(f"{what} {name} does not exist; pass {_FOLDER_KINDS}.")
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise CommandError(f"{what} {name!r} is neither a local folder nor a valid Hub id; pass "
                           f"{_FOLDER_KINDS}.") from None
    if constants.HF_HUB_OFFLINE:
        if not isinstance(try_to_load_from_cache(name, "config.json"), str):
            raise CommandError(f"{what} {name} is not a local folder and the Hub is offline (HF_HUB_OFFLINE=1) with "
                               f"no cached copy of it; unset HF_HUB_OFFLINE, download it first (`hf download {name}`), "
                               "or pass a local folder.")
        return name
    try:  # one request: the downloads that follow would retry an unreachable Hub for half a minute
        HfApi().model_info(name, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except RepositoryNotFoundError:
        raise CommandError(f"{what} {name} is not on the Hub at {constants.ENDPOINT} (or it is private and you are "
                           "not logged in); check the id, log in with `hf auth login`, or pass a local folder."
                           ) from None
    except Exception as error:  # connection refused, DNS, timeout, a server error
        raise CommandError(f"could not reach the Hub at {constants.ENDPOINT} for {what} {name} "
                           f"({type(error).__name__}: {_first_line(error)}); check the connection, or pass a local "
                           "folder (or a cached copy with HF_HUB_OFFLINE=1).") from None
    return name


def check_model_folder(path: str | os.PathLike, *, what: str = "the model") -> None:
    """Refuse a folder without a readable `config.json` (not a saved model, or a corrupt or partial copy), or with
    an unreadable `hf_freeze.json` or a weight file that no longer matches its recorded sha256 (`CheckpointError`),
    before anything is loaded (the load that follows does not hash the files again)."""
    from ..checkpoint import METADATA_NAME, read_metadata, verify_checksums

    if (Path(path) / METADATA_NAME).exists():
        verify_checksums(path, read_metadata(path))
    config = Path(path) / "config.json"
    if not config.is_file():
        raise CommandError(f"{what} {path} has no config.json, so it is not a saved model; pass the folder that "
                           "save_pretrained, save_suffix or FreezeTrainer wrote.")
    try:
        json.loads(config.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CommandError(f"{config} is unreadable ({_first_line(error)}): the folder is corrupt; save or download "
                           "it again.") from None


def debugging(flag: bool = False) -> bool:
    """Whether errors should show their traceback (`--debug`, or `HF_FREEZE_DEBUG=1`)."""
    return flag or os.environ.get(DEBUG_ENV, "").lower() not in ("", "0", "false", "no")


def error_line(command: str, error: BaseException) -> str:
    """The one line `hf-freeze COMMAND` prints on stderr for `error`.

    Example:
        ```python
        error_line("inspect", CommandError("the model /x does not exist; pass ..."))
        # 'hf-freeze inspect: error: the model /x does not exist; pass ...'
        ```
    """
    message = " ".join(str(error).split())
    if isinstance(error, (CommandError, OSError, ValueError, TypeError, RuntimeError, ImportError)):
        if not message:
            message = type(error).__name__
        if _is_offline_error(error):
            message += " (the Hub is offline: unset HF_HUB_OFFLINE, or pass a local folder)"
    else:
        message = (f"{type(error).__name__}: {message} (unexpected; rerun with --debug or {DEBUG_ENV}=1 for the "
                   "traceback)")
    return f"hf-freeze {command}: error: {message}"


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _looks_like_a_path(name: str) -> bool:
    return (name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1
            or name.endswith(("/", ".json", ".safetensors")))


def _is_offline_error(error: BaseException) -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) and "offline" not in str(error).lower() and (
        type(error).__name__ in ("OfflineModeIsEnabled", "LocalEntryNotFoundError"))
