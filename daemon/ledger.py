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

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

__all__ = ("Claim", "KeyLedger", "position_identity")


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
    """Per-state-dir SQLite table ``keys(pipeline, key, chunk_no, chunk, position)``."""

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS keys ("
            " pipeline TEXT NOT NULL, key TEXT NOT NULL, chunk_no INTEGER NOT NULL,"
            " chunk TEXT NOT NULL, position BLOB, PRIMARY KEY (pipeline, key)) WITHOUT ROWID"
        )
        self._db.execute("CREATE TEMP TABLE incoming (key TEXT PRIMARY KEY, position BLOB)")

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
        claim = Claim()
        if not entries:
            return claim
        db = self._db
        db.execute("BEGIN")
        try:
            db.execute("DELETE FROM incoming")
            db.executemany(
                "INSERT OR IGNORE INTO incoming VALUES (?, ?)",
                [(key, position_identity(pos)) for key, pos in entries],
            )
            for key, owner, same_position in db.execute(
                "SELECT k.key, k.chunk, k.position = i.position FROM incoming i JOIN keys k"
                " ON k.pipeline = ? AND k.key = i.key WHERE k.chunk_no < ?",
                (pipeline, chunk_no),
            ):
                if same_position:
                    claim.replays.add(key)
                else:
                    claim.duplicates[key] = owner
            db.execute(
                "INSERT INTO keys SELECT ?, key, ?, ?, position FROM incoming WHERE true"
                " ON CONFLICT (pipeline, key) DO UPDATE SET chunk_no = excluded.chunk_no,"
                " chunk = excluded.chunk, position = excluded.position"
                " WHERE keys.chunk_no >= ?",
                (pipeline, chunk_no, chunk, chunk_no),
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return claim

    def release(self, pipeline: str, keys: Sequence[str]) -> None:
        """Forget keys (an operator resubmitting dead letters on purpose)."""
        self._db.executemany(
            "DELETE FROM keys WHERE pipeline = ? AND key = ?", [(pipeline, k) for k in keys]
        )

    def close(self) -> None:
        self._db.close()
