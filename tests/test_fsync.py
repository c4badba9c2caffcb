"""The one ``fsync_dir``: works on a directory, refuses anything else loudly."""

from __future__ import annotations

from pathlib import Path

import pytest

from batchd.plugins.fsync import fsync_dir


def test_fsync_dir_syncs_a_directory(tmp_path: Path) -> None:
    """A directory (as Path or str) is synced without error."""
    (tmp_path / "a").write_text("x")
    fsync_dir(tmp_path)
    fsync_dir(str(tmp_path))


def test_fsync_dir_refuses_a_file(tmp_path: Path) -> None:
    """A file is not a directory: the caller learns, rather than syncing the wrong thing."""
    target = tmp_path / "f"
    target.write_text("x")
    with pytest.raises(NotADirectoryError):
        fsync_dir(target)


def test_fsync_dir_of_a_missing_directory_raises(tmp_path: Path) -> None:
    """A missing directory raises FileNotFoundError, which callers map to their message."""
    with pytest.raises(FileNotFoundError):
        fsync_dir(tmp_path / "gone")
