"""
Workers, heartbeats and chunk leases against the real PostgreSQL: who may claim
what, when, and that concurrent claimers never share a chunk.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict

import pytest

from batchd.daemon.cluster import leases, workers
from batchd.daemon.cluster.deadline import LeaseDeadline
from batchd.daemon.cluster.errors import WorkerGone
from tests.fixtures.cluster import GRACE, ClusterEnv


async def sealed_chunks(cluster: ClusterEnv, sealer: str, count: int) -> list[str]:
    """*count* chunks sealed by *sealer*, then released so anyone may claim them."""
    lease = await cluster.shard(sealer)
    ids = [f"p-{i:06d}" for i in range(count)]
    for i, chunk in enumerate(ids):
        applied = await cluster.seal(lease, chunk, first_seq=3 * i + 1, last_seq=3 * i + 3)
        await leases.release(cluster.conn, cluster.sql, applied.created[0])
    return ids


@pytest.mark.anyio
class TestWorkers:
    async def test_heartbeat_lists_what_the_worker_holds(self, cluster: ClusterEnv) -> None:
        """The reply names every chunk, shard and slot the worker holds, with epochs."""
        w = await cluster.worker("a")
        lease = await cluster.shard(w)
        await cluster.seal(lease, "p-000001")
        beat = await workers.heartbeat(cluster.conn, cluster.sql, w)
        assert beat.chunks == {"p-000001": 1}
        assert beat.shards == {("p", "0"): 1}
        assert beat.slots == {}
        assert beat.lost_chunks({"p-000001": 1, "p-000009": 4}) == {"p-000009"}

    async def test_heartbeat_uses_the_database_clock(self, cluster: ClusterEnv) -> None:
        """heartbeat_at is the DB's now(), and the reply carries that clock."""
        w = await cluster.worker("a")
        beat = await workers.heartbeat(cluster.conn, cluster.sql, w)
        stored = await cluster.conn.fetchval(
            cluster.sql("SELECT extract(epoch FROM heartbeat_at)::float8 FROM {s}.worker"
                        " WHERE worker_id = $1"), w)
        assert stored == pytest.approx(beat.db_now, abs=1e-6)

    async def test_heartbeat_renews_the_deadline_from_the_send_time(
        self, cluster: ClusterEnv
    ) -> None:
        """The local deadline is sent + TTL − margin, sent being read before the query."""
        now = [100.0]
        deadline = LeaseDeadline(30.0, 5.0, clock=lambda: now[0])
        w = await cluster.worker("a")
        assert not deadline.valid()
        await workers.heartbeat(cluster.conn, cluster.sql, w, deadline=deadline)
        assert deadline.remaining() == pytest.approx(25.0)
        now[0] = 125.0
        assert not deadline.valid()

    async def test_a_stopped_worker_must_register_again(self, cluster: ClusterEnv) -> None:
        """After deregister, a heartbeat raises WorkerGone and expires the deadline."""
        deadline = LeaseDeadline(30.0, 5.0)
        w = await cluster.worker("a")
        await workers.heartbeat(cluster.conn, cluster.sql, w, deadline=deadline)
        await workers.deregister(cluster.conn, cluster.sql, w)
        with pytest.raises(WorkerGone, match=w):
            await workers.heartbeat(cluster.conn, cluster.sql, w, deadline=deadline)
        assert not deadline.valid()

    async def test_deregister_hands_everything_back_at_once(self, cluster: ClusterEnv) -> None:
        """A graceful stop frees chunks and shards without waiting for the TTL."""
        a, b = await cluster.worker("a"), await cluster.worker("b")
        lease = await cluster.shard(a)
        await cluster.seal(lease, "p-000001")
        await workers.deregister(cluster.conn, cluster.sql, a)
        claimed = await leases.claim_chunks(cluster.conn, cluster.sql, b, "p", 10, grace=GRACE)
        assert [(c.lease.chunk, c.lease.epoch, c.previous_owner) for c in claimed] == [
            ("p-000001", 2, None)]
        assert await cluster.shard(b)

    async def test_status_lists_workers_with_what_they_hold(self, cluster: ClusterEnv) -> None:
        """workers() shows each worker's liveness, holdings and fenced count."""
        a, b = await cluster.worker("a"), await cluster.worker("b")
        await cluster.seal(await cluster.shard(a), "p-000001")
        await cluster.silence(b)
        info = {i.worker_id: i for i in await workers.workers(cluster.conn, cluster.sql)}
        assert (info[a].alive, info[a].chunks, info[a].shards) == (True, 1, 1)
        assert (info[b].alive, info[b].chunks) == (False, 0)
        assert info[b].heartbeat_age > 3000

    async def test_purge_forgets_only_idle_dead_workers(self, cluster: ClusterEnv) -> None:
        """A long-dead worker that still holds a chunk is kept (the row explains the lease)."""
        a, b = await cluster.worker("a"), await cluster.worker("b")
        await cluster.seal(await cluster.shard(a), "p-000001")
        await cluster.silence(a)
        await cluster.silence(b)
        assert await workers.purge_stopped(cluster.conn, cluster.sql, older_than=600) == 1
        left = [i.worker_id for i in await workers.workers(cluster.conn, cluster.sql)]
        assert left == [a]


@pytest.mark.anyio
class TestClaims:
    async def test_a_live_owners_chunks_are_not_claimable(self, cluster: ClusterEnv) -> None:
        """Nothing is taken from a worker whose heartbeat is within TTL + grace."""
        a, b = await cluster.worker("a"), await cluster.worker("b")
        await cluster.seal(await cluster.shard(a), "p-000001")
        assert await leases.claim_chunks(cluster.conn, cluster.sql, b, "p", 10, grace=GRACE) == []
        await cluster.silence(a, 30.0 + GRACE - 2)  # silent, but not past TTL + grace yet
        assert await leases.claim_chunks(cluster.conn, cluster.sql, b, "p", 10, grace=GRACE) == []

    async def test_a_silent_owners_chunks_are_taken_with_a_new_epoch(
        self, cluster: ClusterEnv
    ) -> None:
        """Past TTL + grace the chunk moves, epoch bumped, at whatever stage it was."""
        a, b = await cluster.worker("a"), await cluster.worker("b")
        await cluster.seal(await cluster.shard(a), "p-000001")
        await cluster.silence(a, 30.0 + GRACE + 2)
        (claimed,) = await leases.claim_chunks(cluster.conn, cluster.sql, b, "p", 10,
                                               grace=GRACE)
        assert claimed.lease == leases.ChunkLease("p-000001", b, 2)
        assert (claimed.stage, claimed.previous_owner) == ("sealed", a)
        beat = await workers.heartbeat(cluster.conn, cluster.sql, a)
        assert beat.lost_chunks({"p-000001": 1}) == {"p-000001"}

    async def test_a_silent_worker_claims_nothing(self, cluster: ClusterEnv) -> None:
        """A claimer past its own TTL would take what it cannot keep: it gets nothing."""
        a, b = await cluster.worker("a"), await cluster.worker("b")
        await sealed_chunks(cluster, a, 2)
        await cluster.silence(b, 31)
        assert await leases.claim_chunks(cluster.conn, cluster.sql, b, "p", 10, grace=GRACE) == []

    async def test_claims_oldest_first_up_to_the_limit(self, cluster: ClusterEnv) -> None:
        """max_in_flight caps a claim; the oldest seals go first."""
        a, b = await cluster.worker("a"), await cluster.worker("b")
        ids = await sealed_chunks(cluster, a, 5)
        claimed = await leases.claim_chunks(cluster.conn, cluster.sql, b, "p", 3, grace=GRACE)
        assert [c.lease.chunk for c in claimed] == ids[:3]
        assert await leases.claim_chunks(cluster.conn, cluster.sql, b, "p", 0, grace=GRACE) == []

    async def test_claim_one_named_chunk(self, cluster: ClusterEnv) -> None:
        """claim_chunk takes a named chunk from a dead owner; a holder gets its own lease."""
        a, b = await cluster.worker("a"), await cluster.worker("b")
        await cluster.seal(await cluster.shard(a), "p-000001")
        assert await leases.claim_chunk(cluster.conn, cluster.sql, b, "p-000001",
                                        grace=GRACE) is None
        mine = await leases.claim_chunk(cluster.conn, cluster.sql, a, "p-000001", grace=GRACE)
        assert mine is not None and mine.lease.epoch == 1
        await cluster.silence(a)
        taken = await leases.claim_chunk(cluster.conn, cluster.sql, b, "p-000001", grace=GRACE)
        assert taken is not None and taken.lease == leases.ChunkLease("p-000001", b, 2)

    async def test_release_is_fenced(self, cluster: ClusterEnv) -> None:
        """An old lease cannot release a chunk someone else now holds."""
        a, b = await cluster.worker("a"), await cluster.worker("b")
        applied = await cluster.seal(await cluster.shard(a), "p-000001")
        await cluster.silence(a)
        await leases.claim_chunks(cluster.conn, cluster.sql, b, "p", 1, grace=GRACE)
        assert not await leases.release(cluster.conn, cluster.sql, applied.created[0])

    async def test_concurrent_claimers_never_share_a_chunk(self, cluster: ClusterEnv) -> None:
        """Four workers claiming at once, over three takeover rounds: one owner per epoch."""
        sealer = await cluster.worker("sealer")
        ids = await sealed_chunks(cluster, sealer, 60)
        names = [f"w{i}" for i in range(4)]
        conns = [await cluster.connect() for _ in names]
        seen: dict[str, list[tuple[int, str]]] = defaultdict(list)
        for _round in range(3):
            ws = [await cluster.worker(n, conn=c) for n, c in zip(names, conns, strict=True)]

            async def claimer(worker_id: str, conn: object) -> None:
                while got := await leases.claim_chunks(conn, cluster.sql, worker_id, "p", 4,
                                                       grace=GRACE):
                    for c in got:
                        seen[c.lease.chunk].append((c.lease.epoch, worker_id))
                    await asyncio.sleep(0)

            await asyncio.gather(*(claimer(w, c) for w, c in zip(ws, conns, strict=True)))
            for w in ws:
                await cluster.silence(w)
        assert sorted(seen) == ids
        for chunk, claims in seen.items():
            epochs = [e for e, _ in claims]
            assert epochs == [2, 3, 4], (chunk, claims)  # one claim per round, epochs rising
        rows = await cluster.conn.fetch(cluster.sql("SELECT chunk, epoch FROM {s}.chunk"))
        assert {r["epoch"] for r in rows} == {4}
