"""Atomic writes: a reader sees the old file or the new one, never half of one; nothing is left behind."""

import os

import pytest

from hf_freeze import atomic
from hf_freeze.atomic import write_text_atomic


def test_writes_and_replaces(tmp_path):
    path = tmp_path / "sub" / "results.json"
    write_text_atomic(path, "first")
    write_text_atomic(path, "second")
    assert path.read_text() == "second"
    assert os.listdir(path.parent) == ["results.json"]


@pytest.mark.parametrize("failing", ["write", "fsync", "replace"])
def test_a_failed_write_leaves_the_old_file_whole_and_no_temp_file(tmp_path, monkeypatch, failing):
    path = tmp_path / "index.json"
    path.write_text("old complete contents")

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    if failing == "write":
        # half of the new text reaches the disk, then the disk fills up
        real_fdopen = os.fdopen

        def fdopen(fd, mode):
            handle = real_fdopen(fd, mode)
            real_write = handle.write

            def write(text):
                real_write(text[: len(text) // 2])
                handle.flush()
                fail()

            handle.write = write
            return handle

        monkeypatch.setattr(atomic.os, "fdopen", fdopen)
    else:
        monkeypatch.setattr(atomic.os, failing, fail)
    with pytest.raises(OSError, match="No space left"):
        write_text_atomic(path, "new contents " * 1000)
    assert path.read_text() == "old complete contents"
    assert os.listdir(tmp_path) == ["index.json"]


def test_files_and_folders_get_the_usual_permissions(tmp_path):
    """Temp files and folders are private (0600 / 0700); what they become must be ordinary (umask applies)."""
    old = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "card.md", "text")
        atomic.write_folder_atomic(tmp_path / "model", lambda folder: (folder / "weights").write_text("w"),
                                   last="weights")
    finally:
        os.umask(old)
    assert (tmp_path / "card.md").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "model").stat().st_mode & 0o777 == 0o755
