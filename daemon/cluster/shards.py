"""
Intake shards: exactly one worker reads a source shard at a time.

A file or table source is one shard (``"0"``); a Kafka source is one shard per
topic-partition (``"tickets:3"``), and each worker reads the partitions whose
shards it holds (the consumer is ``assign()``-ed to exactly those, so the lease
here is the only thing that decides who reads what). Acquiring a shard bumps its
epoch, which fences the previous reader: its seals, source commits, retirements
and key claims are refused from then on.

A new owner resumes reading after ``sealed_position`` (the highest position any
sealed chunk of the shard covers), so records already sealed are never read,
sent or paid for twice; it commits the source at :func:`commit_frontier`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from batchd.daemon.cluster.db import from_json
from batchd.daemon.cluster.errors import FencedOut
from batchd.daemon.cluster.leases import ALIVE, DEAD
from batchd.daemon.cluster.schema import Sql

__all__ = (
    "Frontier",
    "ShardLease",
    "acquire",
    "commit_frontier",
    "free_shards",
    "hold",
    "join_readers",
    "live_readers",
    "next_chunk_number",
    "release",
)


@dataclass(frozen=True)
class ShardLease:
    """The right to read a shard, seal its chunks and commit its source position."""

    pipeline: str
    shard: str
    owner: str
    epoch: int
    next_chunk_no: int
    sealed_seq: int | None
    sealed_position: dict[str, Any] | None
    committed_seq: int | None
    committed_position: dict[str, Any] | None
    previous_owner: str | None


@dataclass(frozen=True)
class Frontier:
    """Where a shard's source may be committed: every record up to it is done."""

    seq: int
    position: dict[str, Any] | None


_ACQUIRE = f"""
WITH dead AS MATERIALIZED ({DEAD}),
current AS (
    SELECT h.pipeline, h.shard, h.owner AS previous_owner
    FROM {{s}}.shard h
    WHERE h.pipeline = $3 AND h.shard = $4
      AND ($5 OR h.owner IS NULL OR h.owner = $1 OR h.owner IN (SELECT worker_id FROM dead))
      AND {ALIVE}
    FOR UPDATE OF h
)
UPDATE {{s}}.shard h SET owner = $1, epoch = h.epoch + 1, acquired_at = now()
FROM current
WHERE h.pipeline = current.pipeline AND h.shard = current.shard
RETURNING h.*, current.previous_owner
"""


async def acquire(
    conn: Any,
    sql: Sql,
    worker_id: str,
    pipeline: str,
    shard: str,
    *,
    grace: float,
    force: bool = False,
) -> ShardLease | None:
    """
    Take a shard nobody live reads, with a new epoch; None while a live worker holds it.

    Re-acquiring a shard this worker holds bumps the epoch too (a restarted
    reader must not trust its earlier reads). With *force* (an operator's
    command) a live holder loses it as well: its epoch no longer matches.
    """
    await conn.execute(
        sql("INSERT INTO {s}.shard (pipeline, shard) VALUES ($1, $2) ON CONFLICT DO NOTHING"),
        pipeline,
        shard,
    )
    row = await conn.fetchrow(sql(_ACQUIRE), worker_id, grace, pipeline, shard, force)
    if row is None:
        return None
    return ShardLease(
        pipeline=pipeline,
        shard=shard,
        owner=worker_id,
        epoch=row["epoch"],
        next_chunk_no=row["next_chunk_no"],
        sealed_seq=row["sealed_seq"],
        sealed_position=from_json(row["sealed_position"]),
        committed_seq=row["committed_seq"],
        committed_position=from_json(row["committed_position"]),
        previous_owner=row["previous_owner"],
    )


async def hold(conn: Any, sql: Sql, lease: ShardLease) -> None:
    """
    Check *lease* inside the caller's transaction and keep the shard row share-locked
    until it ends, so no takeover commits in between (a claim, a retry's take).

    Raises:
        FencedOut: the shard is another worker's now, or this worker's at a later epoch.
    """
    held = await conn.fetchrow(
        sql("SELECT owner, epoch FROM {s}.shard WHERE pipeline = $1 AND shard = $2 FOR SHARE"),
        lease.pipeline, lease.shard,
    )
    if held is None or (held["owner"], held["epoch"]) != (lease.owner, lease.epoch):
        raise FencedOut(f"shard {lease.pipeline}/{lease.shard}",
                        f"lost by {lease.owner} at epoch {lease.epoch}")


async def release(conn: Any, sql: Sql, lease: ShardLease) -> bool:
    """Stop reading a shard; anyone may acquire it at once. False if already lost."""
    done = await conn.execute(
        sql("UPDATE {s}.shard SET owner = NULL"
            " WHERE pipeline = $1 AND shard = $2 AND owner = $3 AND epoch = $4"),
        lease.pipeline,
        lease.shard,
        lease.owner,
        lease.epoch,
    )
    return bool(done == "UPDATE 1")


_FRONTIER = """
WITH family AS (
    SELECT c.root, bool_and(c.stage IN ('committed', 'source_committed', 'retired')) AS done
    FROM {s}.chunk c WHERE c.pipeline = $1 AND c.shard = $2
    GROUP BY c.root
), roots AS (
    SELECT r.first_seq, r.last_seq, r.position, f.done
    FROM {s}.chunk_range r JOIN family f ON f.root = r.chunk
    WHERE r.pipeline = $1 AND r.shard = $2
), blocker AS (
    -- An operator's resubmission (no read sequence) sorts first, as in advance().
    SELECT min(coalesce(first_seq, 0)) AS first_seq FROM roots WHERE NOT done
)
SELECT roots.last_seq, roots.position FROM roots, blocker
WHERE roots.done AND roots.last_seq IS NOT NULL
  AND (blocker.first_seq IS NULL OR roots.last_seq < blocker.first_seq)
ORDER BY roots.last_seq DESC LIMIT 1
"""


async def commit_frontier(conn: Any, sql: Sql, pipeline: str, shard: str) -> Frontier | None:
    """
    The highest read position below which every chunk family of the shard is done.

    A family is a root chunk and its retries; it is done once every member is
    results-committed. This is the single daemon's ``Pipeline.advance`` rule,
    read from the rows: commit up to the last root whose whole family is done,
    stopping at the first that is not. None when no root is done yet.
    """
    row = await conn.fetchrow(sql(_FRONTIER), pipeline, shard)
    if row is None:
        return None
    return Frontier(row["last_seq"], from_json(row["position"]))


_NEXT_NUMBER = """
INSERT INTO {s}.chunk_number AS n (pipeline, next)
VALUES ($1, 1 + greatest(
    (SELECT coalesce(max(next_chunk_no), 0) FROM {s}.shard WHERE pipeline = $1),
    (SELECT coalesce(max(next_chunk_no), 0) FROM {s}.pipeline WHERE name = $1)))
ON CONFLICT (pipeline) DO UPDATE SET next = n.next + 1
RETURNING n.next - 1
"""


async def next_chunk_number(conn: Any, sql: Sql, pipeline: str) -> int:
    """
    A chunk number no other reader of *pipeline* gets: readers of several shards at once.

    A shard's own ``next_chunk_no`` counts its chunks only, so two shards' readers
    would make the same chunk id from it. The first number handed out is past every
    number a shard or the pipeline counted so far. A number whose chunk is never
    sealed (a reader stopped mid-chunk) is a gap, never reused.
    """
    number: int = await conn.fetchval(sql(_NEXT_NUMBER), pipeline)
    return number


async def join_readers(conn: Any, sql: Sql, pipeline: str, worker_id: str) -> None:
    """List *worker_id* among the workers reading *pipeline*'s shards (until it is purged)."""
    await conn.execute(
        sql("INSERT INTO {s}.shard_reader (pipeline, worker_id) VALUES ($1, $2)"
            " ON CONFLICT DO NOTHING"),
        pipeline, worker_id,
    )


async def live_readers(conn: Any, sql: Sql, pipeline: str) -> int:
    """
    The workers reading *pipeline*'s shards whose heartbeat is within their TTL: how
    many share them. A worker that runs other pipelines only is not one of them.
    """
    count: int = await conn.fetchval(sql(
        "SELECT count(*) FROM {s}.shard_reader r JOIN {s}.worker w USING (worker_id)"
        " WHERE r.pipeline = $1 AND w.stopped_at IS NULL"
        " AND w.heartbeat_at + w.lease_ttl > now()"
    ), pipeline)
    return count


_FREE = f"""
WITH dead AS MATERIALIZED ({DEAD})
SELECT n.shard FROM unnest($3::text[]) WITH ORDINALITY AS n(shard, i)
WHERE NOT EXISTS (
    SELECT 1 FROM {{s}}.shard h
    WHERE h.pipeline = $4 AND h.shard = n.shard AND h.owner IS NOT NULL AND h.owner <> $1
      AND h.owner NOT IN (SELECT worker_id FROM dead))
ORDER BY n.i
"""


async def free_shards(conn: Any, sql: Sql, worker_id: str, pipeline: str,
                      names: list[str], *, grace: float) -> list[str]:
    """
    Which of *names* :func:`acquire` would give *worker_id* now (nobody else live holds
    them), in the given order: one read instead of one attempt per shard each poll.
    """
    rows = await conn.fetch(sql(_FREE), worker_id, grace, names, pipeline)
    return [row["shard"] for row in rows]
