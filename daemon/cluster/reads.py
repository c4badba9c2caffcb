"""
Reads of the materialized rows, as the replay state's types: what the runtime's
``manifest.state`` lookups become once they are awaited calls on a PgStore.

No locks are taken: a read is a hint for what to do next, and whatever is done
with it goes through a fenced transition that re-checks the row under lock.
"""

from __future__ import annotations

from typing import Any

from batchd.daemon.cluster.chunk_rows import chunk_from_row, pipeline_from_row
from batchd.daemon.cluster.db import from_json
from batchd.daemon.cluster.schema import Sql
from batchd.daemon.wal.manifest_state import (
    ALARMS_KEPT,
    Alarm,
    ChunkState,
    ManifestState,
    PipelineState,
)

__all__ = ("batch_owner", "chunk", "chunks", "ledger_summary", "live_state", "pipeline")


async def chunk(conn: Any, sql: Sql, chunk_id: str) -> ChunkState | None:
    """A live chunk as replay would hold it; None if unknown or retired."""
    row = await conn.fetchrow(
        sql("SELECT * FROM {s}.chunk WHERE chunk = $1 AND stage <> 'retired'"), chunk_id
    )
    return None if row is None else chunk_from_row(row)


async def chunks(
    conn: Any, sql: Sql, pipeline_name: str, *, owner: str | None = None
) -> list[ChunkState]:
    """A pipeline's live chunks in seal order; with *owner*, only those it holds."""
    rows = await conn.fetch(
        sql("SELECT * FROM {s}.chunk WHERE pipeline = $1 AND stage <> 'retired'"
            " AND ($2::text IS NULL OR owner = $2) ORDER BY sealed_event"),
        pipeline_name, owner,
    )
    return [chunk_from_row(r) for r in rows]


async def pipeline(conn: Any, sql: Sql, name: str) -> PipelineState | None:
    row = await conn.fetchrow(sql("SELECT * FROM {s}.pipeline WHERE name = $1"), name)
    return None if row is None else pipeline_from_row(row)


async def batch_owner(conn: Any, sql: Sql, batch_id: str) -> str | None:
    """The chunk a batch id was recorded for, retired ones included; None if foreign."""
    owner: str | None = await conn.fetchval(
        sql("SELECT chunk FROM {s}.chunk WHERE batch_id = $1"), batch_id
    )
    return owner


async def live_state(conn: Any, sql: Sql) -> ManifestState:
    """
    Every pipeline, every live chunk (whoever owns it) and the newest alarms, for
    ``batchd status``: its progress is the whole cluster's. Retired chunks are left
    out, so the read stays the size of the work in flight, not of the history.
    """
    state = ManifestState(seq=await conn.fetchval(sql("SELECT coalesce(max(seq), 0)"
                                                      " FROM {s}.event")))
    rows = await conn.fetch(sql("SELECT * FROM {s}.chunk WHERE stage <> 'retired'"
                                " ORDER BY sealed_event"))
    for row in rows:
        live = chunk_from_row(row)
        state.chunks[live.chunk] = live
        if live.batch_id is not None:
            state.live_batches[live.batch_id] = live.chunk
    for row in await conn.fetch(sql("SELECT * FROM {s}.pipeline ORDER BY name")):
        found = pipeline_from_row(row)
        state.pipelines[found.name] = found
    alarms = await conn.fetch(
        sql("SELECT seq, ts, record FROM {s}.event WHERE kind = 'alarm' ORDER BY seq DESC"
            " LIMIT $1"),
        ALARMS_KEPT,
    )
    for row in reversed(alarms):
        fields = from_json(row["record"])
        state.alarms.append(Alarm(seq=row["seq"], ts=row["ts"], pipeline=fields["pipeline"],
                                  chunk=fields["chunk"], kind=fields["alarm_kind"],
                                  message=fields["message"]))
    return state


async def ledger_summary(conn: Any, sql: Sql) -> dict[str, Any]:
    """
    The shared key ledger's keys per pipeline and its size on disk (table, indexes and
    the key lists retention reads).
    """
    rows = await conn.fetch(sql("SELECT pipeline, count(*) AS n FROM {s}.key_ledger"
                                " GROUP BY pipeline"))
    size = await conn.fetchval(
        "SELECT pg_total_relation_size(format('%I.key_ledger', $1::text)::regclass)"
        " + coalesce(pg_total_relation_size(to_regclass(format('%I.key_list', $1::text))), 0)",
        sql.schema)
    return {"keys": {r["pipeline"]: int(r["n"]) for r in rows}, "bytes": int(size or 0)}
