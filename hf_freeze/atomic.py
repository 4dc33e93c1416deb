"""Atomic file writes: a reader sees the old file or the new one, never a half-written one."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` to a temp file in the same folder, fsync it, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes it private; the result is an ordinary file
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_folder_atomic(directory: str | os.PathLike, write: Callable[[Path], None], *, last: str) -> Path:
    """Build a folder with `write(tmp)` in a temporary sibling folder, then move it into place.

    A new `directory` appears whole (one rename). An existing one (which may hold other files, e.g. a Trainer's
    `checkpoint-*` folders) first loses its `last` file, then gets each new file by rename and `last` at the end,
    so an interrupted save leaves no `last` file, which readers treat as no save at all.

    Returns:
        `Path`: `directory`.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.", suffix=".tmp"))
    try:
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the saved folder is an ordinary folder
        write(tmp)
        if not directory.exists():
            os.replace(tmp, directory)
            return directory
        (directory / last).unlink(missing_ok=True)
        for path in sorted(tmp.rglob("*"), key=lambda p: p.name == last):
            target = directory / path.relative_to(tmp)
            if path.is_dir():
                target.mkdir(parents=True, exist_ok=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, target)
        return directory
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    """The process's umask (read by setting it, then putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
