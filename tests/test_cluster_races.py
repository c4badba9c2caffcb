"""
Races at the lock: a taker that waits on a row while another takes it must
re-check the row as it is now, not as it was when the wait began. Each test
holds one claim open in a transaction, lets a second claimer block on the row,
then commits the first: the second must get nothing.

(With the liveness check written as a LEFT JOIN to the worker table, PostgreSQL's
re-check of the chunk row's new version null-extended the stale join, and the
second claimer took the chunk again with a second epoch bump: found by the
concurrent-claims test under load, reproduced here deterministically. The
set-of-dead-workers form fixes it for chunks, shards and slots alike.)
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from batchd.daemon.cluster import create_slot, leases, shards
from tests.fixtures.cluster import GRACE, ClusterEnv


async def blocked_on_a_lock(cluster: ClusterEnv, conn: Any) -> None:
    """Wait until *conn*'s backend is waiting for a row lock."""
    pid = conn.get_server_pid()
    for _ in range(500):
        waiting = await cluster.conn.fetchval(
            "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1", pid)
        if waiting:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the second claimer never blocked on the row")


async def race(cluster: ClusterEnv, take: Callable[[Any, str], Awaitable[Any]]) -> tuple[Any, Any]:
    """First taker claims inside an open transaction; second blocks; first commits."""
    first, second = await cluster.worker("first"), await cluster.worker("second")
    one, two = await cluster.connect(), await cluster.connect()
    tx = one.transaction()
    await tx.start()
    got_first = await take(one, first)
    waiting = asyncio.create_task(take(two, second))
    await blocked_on_a_lock(cluster, two)
    await tx.commit()
    return got_first, await asyncio.wait_for(waiting, 10)


@pytest.mark.anyio
class TestRacesAtTheLock:
    async def test_a_chunk_is_not_claimed_twice(self, cluster: ClusterEnv) -> None:
        """claim_chunk waiting on a concurrent claim of a dead worker's chunk gets nothing."""
        dead = await cluster.worker("dead")
        await cluster.seal(await cluster.shard(dead), "p-000001")
        await cluster.silence(dead)

        async def take(conn: Any, me: str) -> Any:
            return await leases.claim_chunk(conn, cluster.sql, me, "p-000001", grace=GRACE)

        first, second = await race(cluster, take)
        assert first is not None and first.lease.epoch == 2
        assert second is None
        assert await cluster.conn.fetchval(cluster.sql("SELECT epoch FROM {s}.chunk")) == 2

    async def test_a_shard_is_not_acquired_twice(self, cluster: ClusterEnv) -> None:
        """acquire waiting on a concurrent acquire of a dead reader's shard gets nothing."""
        dead = await cluster.worker("dead")
        await cluster.shard(dead)
        await cluster.silence(dead)

        async def take(conn: Any, me: str) -> Any:
            return await shards.acquire(conn, cluster.sql, me, "p", "0", grace=GRACE)

        first, second = await race(cluster, take)
        assert first is not None and first.epoch == 2
        assert second is None

    async def test_a_create_slot_is_not_taken_twice(self, cluster: ClusterEnv) -> None:
        """take waiting on a concurrent take of a dead holder's slot gets nothing."""
        dead = await cluster.worker("dead")
        assert await create_slot.take(cluster.conn, cluster.sql, "ws", dead, grace=GRACE)
        await cluster.silence(dead)

        async def take(conn: Any, me: str) -> Any:
            return await create_slot.take(conn, cluster.sql, "ws", me, grace=GRACE)

        first, second = await race(cluster, take)
        assert first is not None and first.epoch == 2
        assert second is None
