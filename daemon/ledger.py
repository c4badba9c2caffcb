"""
The key ledger: which keys a pipeline has already packed, kept on disk.

A duplicate key inside one source read is an error to report, not a silent
overwrite in the sink. Holding every key in memory would grow with the
source (a million keys is ~100 MB), so the ledger lives in SQLite beside
the manifest. A key re-read from the *same* position (a source replaying
after a crash or a Kafka rebalance) is a replay, not a duplicate.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path

import orjson

__all__ = ("KeyLedger",)


class KeyLedger:
    """Per-state-dir SQLite table ``keys(pipeline, key, chunk, position)``."""

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS keys ("
            " pipeline TEXT NOT NULL, key TEXT NOT NULL, chunk TEXT NOT NULL,"
            " position BLOB, PRIMARY KEY (pipeline, key)) WITHOUT ROWID"
        )

    def claim(
        self, pipeline: str, chunk: str, entries: Sequence[tuple[str, dict[str, object]]]
    ) -> dict[str, str]:
        """
        Record ``(key, position)`` pairs as belonging to ``chunk``.

        Returns ``{key: owning chunk}`` for keys already owned by *another*
        chunk at a different position: the duplicates. A key owned by the same
        chunk id (the chunk is being rebuilt after a crash) or seen at the
        same position (a replay) is not a duplicate.
        """
        if not entries:
            return {}
        rows = [(pipeline, key, chunk, orjson.dumps(pos)) for key, pos in entries]
        duplicates: dict[str, str] = {}
        db = self._db
        db.execute("BEGIN")
        try:
            db.execute("CREATE TEMP TABLE IF NOT EXISTS incoming (key TEXT, position BLOB)")
            db.execute("DELETE FROM incoming")
            db.executemany("INSERT INTO incoming VALUES (?, ?)", [(r[1], r[3]) for r in rows])
            for key, owner in db.execute(
                "SELECT k.key, k.chunk FROM incoming i JOIN keys k"
                " ON k.pipeline = ? AND k.key = i.key"
                " WHERE k.chunk != ? AND k.position IS NOT i.position",
                (pipeline, chunk),
            ):
                duplicates[key] = owner
            db.executemany(
                "INSERT INTO keys VALUES (?, ?, ?, ?) ON CONFLICT (pipeline, key) DO NOTHING", rows
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return duplicates

    def release(self, pipeline: str, keys: Sequence[str]) -> None:
        """Forget keys (an operator resubmitting dead letters on purpose)."""
        self._db.executemany(
            "DELETE FROM keys WHERE pipeline = ? AND key = ?", [(pipeline, k) for k in keys]
        )

    def close(self) -> None:
        self._db.close()
