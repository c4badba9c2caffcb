"""
Chunk leases: who may record a chunk's next transition, and taking over a dead
worker's chunks.

A lease is (chunk, owner, epoch). Every claim bumps the epoch, so an old owner's
lease can never match again, whatever it believes: that is the fence the store
checks on every transition (``daemon/cluster/fencing.py``). Liveness comes from
the owner's heartbeat, never from the chunk's age: a chunk is claimable when it
has no owner, its owner stopped, or its owner's last heartbeat (DB clock) is older
than the owner's lease TTL plus the claimer's takeover grace. A claimer must
itself be alive. (An owner always has a worker row: purging one sets what it held
to no owner, by foreign key.)

Claims use ``FOR UPDATE OF c SKIP LOCKED``, so workers claiming at once split the
chunks between them without waiting on each other, and a chunk whose row is
locked by a transition in progress is simply skipped this round.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from batchd.daemon.cluster.schema import Sql

__all__ = ("ALIVE", "DEAD", "ChunkLease", "Claimed", "claim_chunk", "claim_chunks", "release")


@dataclass(frozen=True, slots=True)
class ChunkLease:
    """The right to record a chunk's transitions, while the epoch is current."""

    chunk: str
    owner: str
    epoch: int


@dataclass(frozen=True, slots=True)
class Claimed:
    """A chunk just claimed: the lease, the stage to resume at and who held it before."""

    lease: ChunkLease
    stage: str
    previous_owner: str | None


# The claimer must be alive (a worker past its own TTL would claim what it cannot keep).
ALIVE = """EXISTS (SELECT 1 FROM {s}.worker me WHERE me.worker_id = $1
                  AND me.stopped_at IS NULL AND me.heartbeat_at + me.lease_ttl > now())"""

# Workers whose work may be taken: stopped, or silent for their TTL plus the taker's grace.
# Computed once per statement as a set, never as an outer join on the locked row: when
# a concurrent claim commits first, PostgreSQL re-checks the locked row's new version
# against the same set, where its new (live) owner is absent, so the row is skipped.
# (With a LEFT JOIN the re-check null-extends the stale join and the row looks ownerless.)
DEAD = """SELECT worker_id FROM {s}.worker
          WHERE stopped_at IS NOT NULL
             OR heartbeat_at + lease_ttl + $2 * interval '1 second' < now()"""

_CLAIM = f"""
WITH dead AS MATERIALIZED ({DEAD}),
candidate AS (
    SELECT c.chunk, c.owner AS previous_owner
    FROM {{s}}.chunk c
    WHERE c.pipeline = $3 AND c.stage <> 'retired'
      AND (c.owner IS NULL OR c.owner IN (SELECT worker_id FROM dead))
      AND (cardinality($5::text[]) = 0 OR c.stage = ANY($5::text[]))
      AND {ALIVE}
    ORDER BY c.sealed_event
    LIMIT $4
    FOR UPDATE OF c SKIP LOCKED
)
UPDATE {{s}}.chunk c
SET owner = $1, epoch = c.epoch + 1, claimed_at = now()
FROM candidate
WHERE c.chunk = candidate.chunk
RETURNING c.chunk, c.epoch, c.stage, candidate.previous_owner, c.sealed_event
"""

_CLAIM_ONE = f"""
WITH dead AS MATERIALIZED ({DEAD}),
candidate AS (
    SELECT c.chunk, c.owner AS previous_owner
    FROM {{s}}.chunk c
    WHERE c.chunk = $3 AND c.stage <> 'retired'
      AND (c.owner IS NULL OR c.owner IN (SELECT worker_id FROM dead))
      AND {ALIVE}
    FOR UPDATE OF c
)
UPDATE {{s}}.chunk c
SET owner = $1, epoch = c.epoch + 1, claimed_at = now()
FROM candidate
WHERE c.chunk = candidate.chunk
RETURNING c.chunk, c.epoch, c.stage, candidate.previous_owner
"""


async def claim_chunks(
    conn: Any,
    sql: Sql,
    worker_id: str,
    pipeline: str,
    limit: int,
    *,
    grace: float,
    stages: Sequence[str] = (),
) -> list[Claimed]:
    """
    Claim up to *limit* of *pipeline*'s unretired chunks nobody live holds, oldest first.

    Args:
        limit: how many more this worker may drive (``max_in_flight`` minus what it owns).
        grace: seconds past an owner's TTL before its chunks are taken (``takeover_grace``).
        stages: only chunks at these stages (all unretired stages when empty).
    """
    if limit <= 0:
        return []
    rows = await conn.fetch(sql(_CLAIM), worker_id, grace, pipeline, limit, list(stages))
    rows = sorted(rows, key=lambda r: r["sealed_event"])
    return [
        Claimed(ChunkLease(r["chunk"], worker_id, r["epoch"]), r["stage"], r["previous_owner"])
        for r in rows
    ]


async def claim_chunk(
    conn: Any, sql: Sql, worker_id: str, chunk: str, *, grace: float
) -> Claimed | None:
    """
    Claim one named chunk (say, a create slot's pending chunk) if nobody live holds it.

    Waits for the row lock instead of skipping it. Returns the current lease
    without a new epoch when this worker already holds it; None when a live
    worker does, or the chunk is unknown or retired.
    """
    row = await conn.fetchrow(sql(_CLAIM_ONE), worker_id, grace, chunk)
    if row is not None:
        return Claimed(ChunkLease(row["chunk"], worker_id, row["epoch"]), row["stage"],
                       row["previous_owner"])
    mine = await conn.fetchrow(
        sql("SELECT epoch, stage FROM {s}.chunk WHERE chunk = $1 AND owner = $2"
            " AND stage <> 'retired'"),
        chunk,
        worker_id,
    )
    if mine is None:
        return None
    return Claimed(ChunkLease(chunk, worker_id, mine["epoch"]), mine["stage"], worker_id)


async def release(conn: Any, sql: Sql, lease: ChunkLease) -> bool:
    """
    Give a chunk up (a graceful stop, or shedding load): anyone may claim it at once.

    The epoch stays; the next claim bumps it. False if the lease was already lost.
    """
    done = await conn.execute(
        sql("UPDATE {s}.chunk SET owner = NULL WHERE chunk = $1 AND owner = $2 AND epoch = $3"),
        lease.chunk,
        lease.owner,
        lease.epoch,
    )
    return bool(done == "UPDATE 1")
