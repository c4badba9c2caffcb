"""
The key ledger: which keys a pipeline has already packed, kept on disk.

A duplicate key inside one source read is an error to report, not a silent
overwrite in the sink. Holding every key in memory would grow with the
source (a million keys is ~100 MB), so the ledger lives in SQLite beside
the manifest.

Two look-alikes are not duplicates:

* a key claimed by a chunk that was never sealed (the daemon died while
  building it): the records are being read again, the claim is replaced;
* a key seen again at the same source position after its chunk was sealed
  (a source replaying, e.g. after a Kafka rebalance): the record is already
  on its way, so it is skipped.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import orjson

from batchd.daemon.wal.state_db import REPAIR, StateFileDamaged, check_ledger
from batchd.plugins.errors import FatalError

__all__ = (
    "LEDGER_NAME", "Claim", "KeyLedger", "ledger_files", "ledger_summary", "position_identity",
)

LEDGER_NAME = "keys.sqlite"
T = TypeVar("T")


def ledger_files(path: Path) -> list[Path]:
    """The database and the files SQLite keeps beside it."""
    return [path, *(path.with_name(path.name + suffix) for suffix in ("-wal", "-shm", "-journal"))]


def position_identity(position: dict[str, Any] | None) -> bytes:
    """Bytes that identify a position; a Kafka-style ``next`` snapshot is not identity."""
    if not position:
        return b"null"
    if "next" in position:
        position = {k: v for k, v in position.items() if k != "next"}
    return orjson.dumps(position, option=orjson.OPT_SORT_KEYS)


@dataclass(slots=True)
class Claim:
    duplicates: dict[str, str] = field(default_factory=dict)  # key -> chunk that owns it
    replays: set[str] = field(default_factory=set)


class KeyLedger:
    """
    Per-state-dir SQLite table ``keys(pipeline, key, chunk_no, chunk, position, at)``.

    The ledger has an id (table ``meta``), recorded in the manifest, so a ledger that
    does not belong with the manifest (deleted and recreated, copied from another
    state dir) is noticed at start instead of silently forgetting which keys were sent.
    ``at`` is when a key was claimed; ``prune`` forgets keys older than a retention.
    Every SQLite failure is a :class:`FatalError` naming the file.
    """

    def __init__(self, path: Path, *, now: Callable[[], float] = time.time) -> None:
        self.path = path
        self._now = now
        self._db = self._guard("open", lambda: sqlite3.connect(
            path, isolation_level=None, check_same_thread=False
        ))
        self._guard("open", self._init)

    def _init(self) -> None:
        db = self._db
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute(
            "CREATE TABLE IF NOT EXISTS keys ("
            " pipeline TEXT NOT NULL, key TEXT NOT NULL, chunk_no INTEGER NOT NULL,"
            " chunk TEXT NOT NULL, position BLOB, at REAL, PRIMARY KEY (pipeline, key))"
            " WITHOUT ROWID"
        )
        columns = {row[1] for row in db.execute("PRAGMA table_info(keys)")}
        if "at" not in columns:  # a ledger from before claims were timed
            db.execute("ALTER TABLE keys ADD COLUMN at REAL")
        db.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT)")
        db.execute("INSERT OR IGNORE INTO meta VALUES ('id', ?)", (uuid.uuid4().hex,))

    def _guard(self, action: str, call: Callable[[], T]) -> T:
        """Run a SQLite call; a failure names the ledger file (a full disk, a read-only dir)."""
        try:
            return call()
        except sqlite3.Error as exc:
            name = getattr(exc, "sqlite_errorname", "")
            if name == "SQLITE_NOTADB" or name.startswith("SQLITE_CORRUPT"):
                # Damaged on disk: a restart meets it again; repair rebuilds the ledger.
                raise StateFileDamaged(
                    f"key ledger {self.path} is damaged (cannot {action}: {exc}): {REPAIR}, "
                    "which keeps it aside and rebuilds the ledger from the manifest, the "
                    "spool and the source") from None
            raise FatalError(f"key ledger {self.path}: cannot {action}: {exc}") from None

    @property
    def id(self) -> str:
        """A random id given the ledger when it was created."""
        row = self._guard("read", lambda: self._db.execute(
            "SELECT value FROM meta WHERE name = 'id'"
        ).fetchone())
        return str(row[0])

    def set_id(self, value: str) -> None:
        """Give the ledger a chosen id (``batchd repair`` binding a rebuilt ledger)."""
        self._guard("write", lambda: self._db.execute(
            "INSERT OR REPLACE INTO meta VALUES ('id', ?)", (value,)
        ))

    def is_empty(self) -> bool:
        return self._guard("read", lambda: self._db.execute(
            "SELECT 1 FROM keys LIMIT 1"
        ).fetchone()) is None

    def count(self, pipeline: str) -> int:
        """Keys held for ``pipeline`` (a scan of its part of the index: for status, not loops)."""
        row = self._guard("read", lambda: self._db.execute(
            "SELECT COUNT(*) FROM keys WHERE pipeline = ?", (pipeline,)
        ).fetchone())
        return int(row[0])

    def size_bytes(self) -> int:
        """The ledger's size on disk, its write-ahead log included."""
        total = 0
        for path in ledger_files(self.path):
            with contextlib.suppress(OSError):
                total += path.stat().st_size
        return total

    def owners(
        self, pipeline: str, keys: Sequence[str]
    ) -> dict[str, tuple[int, str, bytes | None]]:
        """key → (chunk_no, chunk, position identity) for the keys the ledger holds."""
        found: dict[str, tuple[int, str, bytes | None]] = {}

        def lookup(part: list[str]) -> list[Any]:
            marks = ",".join("?" * len(part))
            return self._db.execute(
                f"SELECT key, chunk_no, chunk, position FROM keys"
                f" WHERE pipeline = ? AND key IN ({marks})",
                (pipeline, *part),
            ).fetchall()

        for start in range(0, len(keys), 900):
            part = list(keys[start : start + 900])
            rows = self._guard("read", partial(lookup, part))
            for key, owner_no, owner, position in rows:
                found[key] = (owner_no, owner, position)
        return found

    def keys_of(self, pipeline: str, chunk: str) -> Iterator[tuple[str, bytes | None]]:
        """(key, position identity) of every key ``chunk`` claimed."""
        rows = self._guard("read", lambda: self._db.execute(
            "SELECT key, position FROM keys WHERE pipeline = ? AND chunk = ? ORDER BY key",
            (pipeline, chunk),
        ).fetchall())
        yield from rows

    def prune(self, pipeline: str, older_than: float, below_chunk_no: int) -> int:
        """
        Forget keys claimed before ``now - older_than`` by chunks numbered below
        ``below_chunk_no`` (every live chunk's keys stay); returns how many.
        """
        cutoff = self._now() - older_than

        def delete() -> int:
            self._db.execute(
                "CREATE INDEX IF NOT EXISTS keys_by_age ON keys (pipeline, at)"
            )
            cursor = self._db.execute(
                "DELETE FROM keys WHERE pipeline = ? AND (at IS NULL OR at < ?)"
                " AND chunk_no < ?",
                (pipeline, cutoff, below_chunk_no),
            )
            return int(cursor.rowcount)

        return self._guard("prune", delete)

    def claim(
        self,
        pipeline: str,
        chunk_no: int,
        chunk: str,
        entries: Sequence[tuple[str, dict[str, Any] | None]],
    ) -> Claim:
        """
        Claim ``(key, position)`` pairs for the chunk being built (``chunk_no``).

        Every chunk numbered below ``chunk_no`` is sealed, so an owner at or
        above it is a leftover of a chunk that never sealed.
        """
        if not entries:
            return Claim()
        return self._guard("write", lambda: self._claim(pipeline, chunk_no, chunk, entries))

    def _claim(
        self,
        pipeline: str,
        chunk_no: int,
        chunk: str,
        entries: Sequence[tuple[str, dict[str, Any] | None]],
    ) -> Claim:
        claim = Claim()
        db = self._db
        at = self._now()
        rows = [
            (pipeline, key, chunk_no, chunk, position_identity(pos), at) for key, pos in entries
        ]
        db.execute("BEGIN")
        try:
            # Probe the few keys already known (one indexed IN query per batch, not a join),
            # then write the claims in one executemany.
            keys = [row[1] for row in rows]
            known: dict[str, tuple[int, str, bytes]] = {}
            for start in range(0, len(keys), 900):
                part = keys[start : start + 900]
                marks = ",".join("?" * len(part))
                for key, owner_no, owner, position in db.execute(
                    f"SELECT key, chunk_no, chunk, position FROM keys"
                    f" WHERE pipeline = ? AND key IN ({marks})",
                    (pipeline, *part),
                ):
                    known[key] = (owner_no, owner, position)
            fresh = []
            for row in rows:
                found = known.get(row[1])
                if found is None or found[0] >= chunk_no:  # new, or a never-sealed leftover
                    fresh.append(row)
                elif found[2] == row[4]:
                    claim.replays.add(row[1])
                else:
                    claim.duplicates[row[1]] = found[1]
            db.executemany(
                "INSERT OR REPLACE INTO keys (pipeline, key, chunk_no, chunk, position, at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                fresh,
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return claim

    def release(self, pipeline: str, keys: Sequence[str]) -> None:
        """Forget keys (an operator resubmitting dead letters on purpose)."""
        self._guard("write", lambda: self._db.executemany(
            "DELETE FROM keys WHERE pipeline = ? AND key = ?", [(pipeline, k) for k in keys]
        ))

    def restore(
        self, rows: Sequence[tuple[str, str, int, str, bytes | None]]
    ) -> int:
        """Insert (pipeline, key, chunk_no, chunk, position identity) as they were claimed,
        keeping a key already there; returns how many were new."""
        at = self._now()
        cursor = self._guard("write", lambda: self._db.executemany(
            "INSERT OR IGNORE INTO keys (pipeline, key, chunk_no, chunk, position, at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            [(*row, at) for row in rows],
        ))
        return int(cursor.rowcount)

    def close(self) -> None:
        self._db.close()


def ledger_summary(path: Path, pipelines: Sequence[str]) -> dict[str, Any]:
    """
    The ledger's size on disk and its keys per pipeline, read-only (beside a running
    daemon) for ``batchd status``; zeros when there is no ledger yet.
    """
    size = 0
    for file in ledger_files(path):
        with contextlib.suppress(OSError):
            size += file.stat().st_size
    keys = dict.fromkeys(pipelines, 0)
    check_ledger(path, allow_empty=True)
    if path.exists() and path.stat().st_size > 0:  # an emptied one is refused by `run`
        try:
            with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
                for name in pipelines:
                    row = db.execute("SELECT COUNT(*) FROM keys WHERE pipeline = ?", (name,))
                    keys[name] = int(row.fetchone()[0])
        except sqlite3.Error as exc:
            raise FatalError(f"key ledger {path}: cannot read it: {exc}") from None
    return {"path": str(path), "bytes": size, "keys": keys}
