"""
The state directory is private: mode 0700, its files 0600, whatever the umask.

The spool holds every prompt and the manifest every batch id; run by hand with a
shell's umask 022 they would otherwise be world-readable. ``batchd run`` (and the
commands that write state) set the process umask to 077 first, so everything created
afterwards — state files, SQLite's side files, sink outputs — starts private; files an
older version left behind are tightened here. A sink that must share its output says
so with its ``mode`` option.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from batchd.daemon.wal.storage_errors import storage_error

__all__ = ("PRIVATE_UMASK", "make_private")

PRIVATE_UMASK = 0o077
# batchd's own entries in the state dir (dead letters are a sink's output, with its mode).
_OWN_FILES = ("manifest.jsonl", "manifest.lock", "keys.sqlite", "keys.sqlite-wal",
              "keys.sqlite-shm", "keys.sqlite-journal", "reconcile.sqlite",
              "reconcile.sqlite-wal", "reconcile.sqlite-shm")
_OWN_DIRS = ("spool", "retry-requests", "resume-requests")


def make_private(state_dir: Path) -> int:
    """
    Set the umask, create the state dir (0700) and tighten what is already in it; then
    prove it is writable, so a read-only or full file system is one line at start.
    Returns the umask it replaced (for a caller that runs in a longer-lived process).

    Raises:
        ConfigError: the state dir is read-only or not ours (exit 2).
        StorageFull: there is no room to write in it.
    """
    previous = os.umask(PRIVATE_UMASK)
    try:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        _tighten(state_dir, 0o700)
        for name in _OWN_FILES:
            _tighten(state_dir / name, 0o600)
        for name in _OWN_DIRS:
            directory = state_dir / name
            if directory.is_dir():
                _tighten(directory, 0o700)
                for entry in directory.iterdir():
                    _tighten(entry, 0o600)
        probe = state_dir / f".write-test-{os.getpid()}"
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, b"x" * 4096)
                os.fsync(fd)
            finally:
                os.close(fd)
        finally:
            with contextlib.suppress(OSError):
                probe.unlink()
    except OSError as exc:
        os.umask(previous)
        raise storage_error(exc, state_dir, "state dir") from None
    return previous


def _tighten(path: Path, mode: int) -> None:
    try:
        current = path.lstat()
    except FileNotFoundError:
        return
    if stat.S_ISLNK(current.st_mode) or stat.S_IMODE(current.st_mode) == mode:
        return
    if current.st_uid == os.geteuid():
        path.chmod(mode)
