"""
Reads of the materialized rows, as the replay state's types: what the runtime's
``manifest.state`` lookups become once they are awaited calls on a PgStore.

No locks are taken: a read is a hint for what to do next, and whatever is done
with it goes through a fenced transition that re-checks the row under lock.
"""

from __future__ import annotations

from typing import Any

from batchd.daemon.cluster.chunk_rows import chunk_from_row, pipeline_from_row
from batchd.daemon.cluster.schema import Sql
from batchd.daemon.wal.manifest_state import ChunkState, PipelineState

__all__ = ("batch_owner", "chunk", "chunks", "pipeline")


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
