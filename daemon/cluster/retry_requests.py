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

__all__ = ("RetryRequest", "request_retry", "take_retries")


@dataclass(frozen=True, slots=True)
class RetryRequest:
    """A retry the reader took: its id (for the log) and the keys to read again."""

    id: int
    keys: tuple[str, ...]


async def request_retry(conn: Any, sql: Sql, pipeline: str, keys: Sequence[str],
                        requested_by: str) -> int:
    """Queue a retry of *keys* for *pipeline*'s reader; the request's id."""
    return int(await conn.fetchval(
        sql("INSERT INTO {s}.retry_request (pipeline, keys, requested_by)"
            " VALUES ($1, $2::text[], $3) RETURNING id"),
        pipeline, sorted(set(keys)), requested_by,
    ))


async def take_retries(conn: Any, sql: Sql, lease: ShardLease) -> list[RetryRequest]:
    """
    Take the pipeline's pending retries while *lease* holds the source's shard: their
    keys forgotten in the shared ledger, the requests marked taken by this worker.

    Raises:
        FencedOut: the shard lease was lost; nothing was taken or forgotten.
    """

    async def body() -> list[RetryRequest]:
        await hold(conn, sql, lease)
        rows = await conn.fetch(
            sql("UPDATE {s}.retry_request SET taken_by = $2, taken_at = now()"
                " WHERE id IN (SELECT id FROM {s}.retry_request WHERE pipeline = $1"
                " AND taken_at IS NULL ORDER BY id FOR UPDATE)"
                " RETURNING id, keys"),
            lease.pipeline, lease.owner,
        )
        keys = sorted({key for row in rows for key in row["keys"]})
        if keys:
            await conn.execute(
                sql("DELETE FROM {s}.key_ledger WHERE pipeline = $1 AND key = ANY($2::text[])"),
                lease.pipeline, keys,
            )
        return sorted((RetryRequest(row["id"], tuple(row["keys"])) for row in rows),
                      key=lambda r: r.id)

    return await transaction(conn, body)
