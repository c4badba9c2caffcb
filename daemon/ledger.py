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
        rows = [(pipeline, key, chunk_no, chunk, position_identity(pos)) for key, pos in entries]
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
            db.executemany("INSERT OR REPLACE INTO keys VALUES (?, ?, ?, ?, ?)", fresh)
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
