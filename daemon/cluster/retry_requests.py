"""
Operators' dead-letter retries in cluster mode (``batchd dead-letters retry``), kept in
the cluster's store for whichever worker reads the source.

On one daemon a retry is a file in the state dir. In a cluster that file would wait on
one machine for that machine's worker to hold the source's shard, and its keys would be
forgotten only in a local ledger the shared claims never read (the resent records were
then skipped as a source's replays: nothing was sent). Here the request is a row; the
worker holding the shard *takes* it in one transaction, under its shard lease, that
forgets the keys in the shared ledger and marks the request taken, and then reads them
again from the source as new chunks.

A key is forgotten only while the ledger still gives it to the family of the chunk its
dead letter came from (the request names that chunk, or the batch, per key). A row sent
again since (by an earlier retry, from another machine's request, or by the same request
asked twice) belongs to a newer chunk: it stays claimed, and reading it again is a replay,
skipped. So a retry never pays twice for a row that has an answer, whatever the listing
the operator retried from showed.

Taking before resending makes a retry at most once: a worker that dies between the take
and the seal of the resent chunks leaves those keys unsent (still listed as dead letters,
to be retried again), never sent twice. A request taken twice cannot happen: the take
locks the request rows and checks the lease in the same transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from batchd.daemon.cluster.db import transaction
from batchd.daemon.cluster.schema import Sql
from batchd.daemon.cluster.shards import ShardLease, hold

__all__ = ("DeadRow", "RetryRequest", "request_retry", "take_retries")


@dataclass(frozen=True, slots=True)
class DeadRow:
    """A dead letter to retry: its key and where it came from (either may be unknown)."""

    key: str
    root: str | None  # the root chunk of the chunk that dead-lettered it
    batch_id: str | None


@dataclass(frozen=True, slots=True)
class RetryRequest:
    """A retry the reader took: its id, the keys to read again, those answered since."""

    id: int
    keys: tuple[str, ...]
    answered: tuple[str, ...] = ()


async def request_retry(conn: Any, sql: Sql, pipeline: str, rows: Sequence[DeadRow],
                        requested_by: str) -> int:
    """Queue a retry of *rows* for *pipeline*'s reader; the request's id."""
    return int(await conn.fetchval(
        sql("INSERT INTO {s}.retry_request (pipeline, keys, chunks, batch_ids, requested_by)"
            " VALUES ($1, $2::text[], $3::text[], $4::text[], $5) RETURNING id"),
        pipeline, [r.key for r in rows], [r.root for r in rows], [r.batch_id for r in rows],
        requested_by,
    ))


# The keys a take forgets: each one still given to the family its dead letter came from,
# that chunk named by the request or found by the dead letter's batch; a dead letter of
# unknown origin (no chunk, no batch) is the operator's word alone.
_FORGET = """
WITH wanted AS (
    SELECT t.key, coalesce(t.root, b.root) AS root, t.root IS NULL AND t.batch IS NULL AS blind
    FROM unnest($2::text[], $3::text[], $4::text[]) AS t(key, root, batch)
    LEFT JOIN {s}.chunk b ON t.root IS NULL AND b.batch_id = t.batch
)
DELETE FROM {s}.key_ledger l USING wanted w
WHERE l.pipeline = $1 AND l.key = w.key AND (w.blind OR l.chunk = w.root)
RETURNING l.key
"""


async def take_retries(conn: Any, sql: Sql, lease: ShardLease) -> list[RetryRequest]:
    """
    Take the pipeline's pending retries while *lease* holds the source's shard: the keys
    still given to their dead letters' chunks forgotten in the shared ledger, the
    requests marked taken by this worker.

    Raises:
        FencedOut: the shard lease was lost; nothing was taken or forgotten.
    """

    async def body() -> list[RetryRequest]:
        await hold(conn, sql, lease)
        rows = await conn.fetch(
            sql("UPDATE {s}.retry_request SET taken_by = $2, taken_at = now()"
                " WHERE id IN (SELECT id FROM {s}.retry_request WHERE pipeline = $1"
                " AND taken_at IS NULL ORDER BY id FOR UPDATE)"
                " RETURNING id, keys, chunks, batch_ids"),
            lease.pipeline, lease.owner,
        )
        if not rows:
            return []
        flat = [t for row in rows for t in zip(row["keys"], row["chunks"], row["batch_ids"],
                                                strict=True)]
        wanted = sorted({t[0] for t in flat})
        claimed = {r["key"] for r in await conn.fetch(
            sql("SELECT key FROM {s}.key_ledger WHERE pipeline = $1 AND key = ANY($2::text[])"),
            lease.pipeline, wanted)}
        forgotten = {r["key"] for r in await conn.fetch(
            sql(_FORGET), lease.pipeline, [t[0] for t in flat], [t[1] for t in flat],
            [t[2] for t in flat])}
        # Keys the ledger no longer holds at all (its retention forgot them) are sent again,
        # as one daemon does; each key once, by the oldest request naming it.
        resend = forgotten | (set(wanted) - claimed)
        taken: list[RetryRequest] = []
        given: set[str] = set()
        for row in sorted(rows, key=lambda r: r["id"]):
            keys = sorted(set(row["keys"]))
            mine = tuple(k for k in keys if k in resend and k not in given)
            given.update(mine)
            taken.append(RetryRequest(row["id"], mine, tuple(k for k in keys if k not in resend)))
        return taken

    return await transaction(conn, body)
