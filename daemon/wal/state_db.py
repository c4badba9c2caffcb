"""
The state dir's SQLite files (the key ledger, the reconcile cache) checked before use.

Garbage bytes, a zero-length file, a directory in the file's place or a file another
user owns cannot be fixed by restarting: under systemd an exit 1 would restart batchd
into the same failure forever. So each is a :class:`ConfigError` (exit 2) naming the
file and what to do, checked before the file is opened for real: damage is
:class:`StateFileDamaged`, which ``batchd repair`` resolves (it sets the file aside and
rebuilds it); wrong ownership or mode is the operator's to fix with ``chown``/``chmod``.

The check is cheap (the header and one page of one table), not a full integrity scan.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
import stat
import time
from pathlib import Path
from urllib.parse import quote

from batchd.daemon.wal.storage_errors import storage_error
from batchd.plugins.errors import ConfigError

__all__ = (
    "REPAIR", "StateFileDamaged", "check_ledger", "check_reconcile_cache", "check_state_db",
    "set_aside",
)

REPAIR = "stop batchd and run `batchd repair CONFIG`"
_NOT_DAMAGE = frozenset({"SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_FULL"})


class StateFileDamaged(ConfigError):
    """A state file that is not what batchd wrote there; ``batchd repair`` resolves it."""

    prefix = "state needs repair"


def check_state_db(path: Path, what: str, *, table: str, then: str,
                   allow_empty: bool = False, deep: bool = False) -> None:
    """
    Refuse ``path`` unless it is missing or a readable SQLite file holding ``table``.

    ``what`` names the file for the operator ("key ledger"); ``then`` says what
    ``batchd repair`` does about it. A zero-length file is damage unless
    ``allow_empty`` (SQLite makes a new database of it: right for a cache, wrong for a
    ledger whose manifest has history). ``deep`` (for ``batchd repair``) also runs
    SQLite's ``quick_check`` over every page.

    Raises:
        StateFileDamaged: not a regular file, empty, not SQLite, or without ``table``.
        ConfigError: the file cannot be read and written by this user.
    """
    try:
        info = path.stat()
    except FileNotFoundError:
        return
    except OSError as exc:
        raise storage_error(exc, path, what) from None
    if not stat.S_ISREG(info.st_mode):
        raise _damaged(path, what, "is not a file (a directory or device is in its place)", then)
    if info.st_size == 0:
        if allow_empty:
            return
        raise _damaged(path, what, "is empty (0 bytes)", then)
    if not os.access(path, os.R_OK | os.W_OK):
        raise storage_error(PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path)),
                            path, what)
    try:
        uri = f"file:{quote(str(path))}?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True)) as db:
            db.execute(f'SELECT 1 FROM "{table}" LIMIT 1').fetchall()
            if deep:
                found = [row[0] for row in db.execute("PRAGMA quick_check(3)")]
                if found != ["ok"]:
                    said = "; ".join(" ".join(str(f).split()) for f in found)
                    raise _damaged(path, what, f"fails SQLite's check ({said})", then)
    except sqlite3.DatabaseError as exc:
        name = getattr(exc, "sqlite_errorname", "")
        if name in _NOT_DAMAGE:
            return  # in use or full, not damaged: the real open reports it
        problem = (f"holds no {table} table" if "no such table" in str(exc)
                   else f"is not a readable SQLite database ({exc})")
        raise _damaged(path, what, problem, then) from None


def _damaged(path: Path, what: str, problem: str, then: str) -> StateFileDamaged:
    return StateFileDamaged(f"{what} {path} {problem}: {REPAIR}, which {then}")


def set_aside(path: Path, stamp: str | None = None) -> list[Path]:
    """
    Move ``path`` and SQLite's companions (-wal, -shm, -journal) to ``*.replaced-<time>``
    (a directory in the file's place moves the same way); returns where they went.
    """
    stamp = stamp or time.strftime("%Y%m%dT%H%M%S")
    moved = []
    for file in (path, *(path.with_name(path.name + s) for s in ("-wal", "-shm", "-journal"))):
        if file.exists() or file.is_symlink():
            kept = file.with_name(f"{file.name}.replaced-{stamp}")
            os.replace(file, kept)
            moved.append(kept)
    return moved


def check_ledger(path: Path, *, allow_empty: bool = False, deep: bool = False) -> None:
    """:func:`check_state_db` for ``keys.sqlite``."""
    check_state_db(path, "key ledger", table="meta", allow_empty=allow_empty, deep=deep,
                   then="keeps it aside and rebuilds the ledger from the manifest, the spool "
                        "and the source")


def check_reconcile_cache(path: Path, *, deep: bool = False) -> None:
    """:func:`check_state_db` for ``reconcile.sqlite`` (a cache: empty is fine)."""
    check_state_db(path, "reconcile cache", table="batches", allow_empty=True, deep=deep,
                   then="keeps it aside (batchd reads the API's batches into a new one)")
