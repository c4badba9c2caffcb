"""
A worker's database link cut or stalled (a loopback proxy between it and
PostgreSQL): it stops acting at its local deadline, before anyone can take its
work, and once the link is back it learns what it lost and records nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from urllib.parse import urlsplit

import asyncpg
import pytest

from batchd.daemon.cluster import fencing, leases, workers
from batchd.daemon.cluster.deadline import LeaseDeadline, boottime, gated
from batchd.daemon.cluster.errors import FencedOut, LeaseExpired
from batchd.daemon.wal.manifest_state import Stage
from tests.fixtures.cluster import ClusterEnv
from tests.fixtures.tcp_proxy import TcpProxy, proxied_dsn

ProxyFactory = Callable[[str, int], Awaitable[TcpProxy]]


async def body() -> AsyncIterator[bytes]:
    for piece in (b'{"requests":[', b"{}", b"]}"):
        yield piece


async def through(cluster: ClusterEnv, tcp_proxy: ProxyFactory) -> tuple[TcpProxy, str]:
    target = urlsplit(cluster.dsn)
    proxy = await tcp_proxy(target.hostname or "127.0.0.1", target.port or 5432)
    return proxy, proxied_dsn(cluster.dsn, proxy)


@pytest.mark.anyio
class TestLinkCut:
    async def test_a_stalled_link_stops_the_worker_and_heals_fenced(
        self, cluster: ClusterEnv, tcp_proxy: ProxyFactory
    ) -> None:
        """
        The link stalls with a heartbeat in flight: the deadline passes, the gate
        refuses, a survivor takes the chunk; the late heartbeat renews nothing
        and its reply shows the chunk gone; the old owner's transition is fenced.
        """
        proxy, dsn = await through(cluster, tcp_proxy)
        link = await cluster.connect(dsn)
        now = [1000.0]
        deadline = LeaseDeadline(30.0, 5.0, clock=lambda: now[0])
        a = await workers.register(link, cluster.sql, "a", ttl=30.0)
        await workers.heartbeat(link, cluster.sql, a, deadline=deadline)
        shard = await cluster.shard(a, conn=link)
        (lease,) = (await cluster.seal(shard, "p-000001", conn=link)).created

        proxy.stall()
        beat = asyncio.create_task(workers.heartbeat(link, cluster.sql, a, deadline=deadline))
        await asyncio.sleep(0.05)
        assert not beat.done()  # neither failed nor returned: a partition, not an error
        now[0] += 26.0  # past sent + TTL − margin
        with pytest.raises(LeaseExpired):
            _ = [p async for p in gated(body(), deadline)]
        await cluster.silence(a)  # to the others, A went quiet
        b = await cluster.worker("b")
        (taken,) = await leases.claim_chunks(cluster.conn, cluster.sql, b, "p", 1, grace=5.0)

        proxy.restore()
        reply = await asyncio.wait_for(beat, 10)
        assert not deadline.valid()  # renewed from when it was sent: already past
        assert reply.lost_chunks({lease.chunk: lease.epoch}) == {lease.chunk}
        with pytest.raises(FencedOut):
            await fencing.apply_transition(link, cluster.sql, lease, Stage.SEALED,
                                           "submit_intent",
                                           {"chunk": lease.chunk, "at": 1.0, "requests": 3})
        assert await cluster.fenced_count(a) == 1
        assert taken.lease.epoch == lease.epoch + 1

    async def test_a_cut_link_expires_the_lease_before_takeover(
        self, cluster: ClusterEnv, tcp_proxy: ProxyFactory
    ) -> None:
        """
        Real clocks, a 1 s TTL: after the link is reset the worker's deadline passes
        before a survivor can claim its chunk (TTL + grace on the DB clock), and
        after reconnecting it is told the chunk is gone.
        """
        ttl, margin, grace = 1.0, 0.2, 0.5
        proxy, dsn = await through(cluster, tcp_proxy)
        link = await cluster.connect(dsn)
        deadline = LeaseDeadline(ttl, margin)
        a = await workers.register(link, cluster.sql, "a", ttl=ttl)
        await workers.heartbeat(link, cluster.sql, a, deadline=deadline)
        shard = await cluster.shard(a, conn=link)
        (lease,) = (await cluster.seal(shard, "p-000001", conn=link)).created
        await workers.heartbeat(link, cluster.sql, a, deadline=deadline)
        b = await cluster.worker("b", ttl=30.0)

        proxy.cut()
        with pytest.raises(asyncpg.PostgresConnectionError):
            await asyncio.wait_for(workers.heartbeat(link, cluster.sql, a, deadline=deadline), 5)
        expired_at = taken_at = None
        start = boottime()
        while taken_at is None and boottime() - start < 10:
            if expired_at is None and not deadline.valid():
                expired_at = boottime()
            got = await leases.claim_chunks(cluster.conn, cluster.sql, b, "p", 1, grace=grace)
            if got:
                taken_at = boottime()
                assert not deadline.valid(), "the survivor took a chunk the owner still acts on"
            await asyncio.sleep(0.02)
        assert expired_at is not None and taken_at is not None
        assert taken_at - expired_at >= grace  # grace + margin of slack, less polling
        with pytest.raises(LeaseExpired):
            _ = [p async for p in gated(body(), deadline)]

        proxy.restore()
        relink = await cluster.connect(dsn)
        reply = await workers.heartbeat(relink, cluster.sql, a, deadline=deadline)
        assert deadline.valid()  # a fresh heartbeat: the worker may act on what it holds
        assert reply.chunks == {} and reply.shards == {("p", "0"): shard.epoch}
        with pytest.raises(FencedOut):
            await fencing.apply_transition(relink, cluster.sql, lease, Stage.SEALED,
                                           "submit_intent",
                                           {"chunk": lease.chunk, "at": 1.0, "requests": 3})
