"""
The cluster-wide create slot: one create at a time per workspace, and a dead
holder's pending intent handed to the next taker to resolve.
"""

from __future__ import annotations

import pytest

from batchd.daemon.cluster import create_slot, fencing, leases, limits
from batchd.daemon.cluster.errors import FencedOut
from batchd.daemon.cluster.leases import ChunkLease
from batchd.daemon.wal.manifest_state import Stage
from tests.fixtures.cluster import GRACE, ClusterEnv


async def sealed(cluster: ClusterEnv, worker: str, *chunks: str) -> list[ChunkLease]:
    shard = await cluster.shard(worker)
    out = []
    for i, chunk in enumerate(chunks):
        (lease,) = (await cluster.seal(shard, chunk, first_seq=3 * i + 1,
                                       last_seq=3 * i + 3)).created
        out.append(lease)
    return out


async def slot_row(cluster: ClusterEnv) -> tuple[object, ...]:
    row = await cluster.conn.fetchrow(
        cluster.sql("SELECT holder, epoch, pending_chunk, pending_epoch FROM {s}.create_slot"))
    return tuple(row)


@pytest.mark.anyio
class TestCreateSlot:
    async def test_one_holder_at_a_time(self, cluster: ClusterEnv) -> None:
        """A live holder keeps the slot; releasing lets the next one in with a new epoch."""
        a, b = await cluster.worker("a"), await cluster.worker("b")
        c, sql = cluster.conn, cluster.sql
        slot = await create_slot.take(c, sql, "ws", a, grace=GRACE)
        assert slot is not None and (slot.epoch, slot.pending) == (1, None)
        assert await create_slot.take(c, sql, "ws", b, grace=GRACE) is None
        assert await create_slot.take(c, sql, "other", b, grace=GRACE) is not None
        assert await create_slot.release(c, sql, slot)
        second = await create_slot.take(c, sql, "ws", b, grace=GRACE)
        assert second is not None and second.epoch == 2
        assert not await create_slot.release(c, sql, slot)  # the old epoch is void

    async def test_intent_and_submitted_hold_then_free_the_slot(self, cluster: ClusterEnv) -> None:
        """The intent marks the slot pending; submitted clears it and releases, atomically."""
        a = await cluster.worker("a")
        c, sql = cluster.conn, cluster.sql
        (lease,) = await sealed(cluster, a, "p-000001")
        slot = await create_slot.take(c, sql, "ws", a, grace=GRACE)
        assert slot is not None
        applied = await create_slot.record_intent(c, sql, slot, lease, 3)
        assert applied is not None and applied.record is not None
        db_now = await c.fetchval("SELECT extract(epoch FROM now())::float8")
        assert applied.record["at"] == pytest.approx(db_now, abs=5)  # the DB's clock
        assert await slot_row(cluster) == (a, 1, "p-000001", 1)
        await create_slot.record_submitted(c, sql, slot, lease, "msgbatch_1", "t")
        assert await slot_row(cluster) == (None, 1, None, None)

    async def test_a_dead_holders_pending_intent_goes_to_the_next_taker(
        self, cluster: ClusterEnv
    ) -> None:
        """
        A dies between intent and submitted. After TTL + grace, B takes the slot, is
        handed the pending intent, claims the chunk and adopts the batch it found;
        A's late submitted is fenced out.
        """
        a, b = await cluster.worker("a"), await cluster.worker("b")
        c, sql = cluster.conn, cluster.sql
        (lease,) = await sealed(cluster, a, "p-000001")
        slot = await create_slot.take(c, sql, "ws", a, grace=GRACE)
        assert slot is not None
        await create_slot.record_intent(c, sql, slot, lease, 3)
        assert await create_slot.take(c, sql, "ws", b, grace=GRACE) is None  # A still alive
        await cluster.silence(a)
        taken = await create_slot.take(c, sql, "ws", b, grace=GRACE)
        assert taken is not None and taken.previous_holder == a
        pending = taken.pending
        assert pending is not None
        assert (pending.chunk, pending.requests, pending.intent_epoch, pending.left_by) == (
            "p-000001", 3, 1, a)
        claimed = await leases.claim_chunk(c, sql, b, pending.chunk, grace=GRACE)
        assert claimed is not None and claimed.stage == "intent"
        await create_slot.record_submitted(c, sql, taken, claimed.lease, "msgbatch_found", "t")
        with pytest.raises(FencedOut):
            await create_slot.record_submitted(c, sql, slot, lease, "msgbatch_late", "t")
        assert await cluster.conn.fetchval(
            sql("SELECT batch_id FROM {s}.chunk WHERE chunk = 'p-000001'")) == "msgbatch_found"
        assert await slot_row(cluster) == (None, 2, None, None)

    async def test_a_settled_pending_intent_is_not_handed_on(self, cluster: ClusterEnv) -> None:
        """If the chunk got its batch recorded meanwhile, the next taker has nothing to resolve."""
        a, b = await cluster.worker("a"), await cluster.worker("b")
        c, sql = cluster.conn, cluster.sql
        (lease,) = await sealed(cluster, a, "p-000001")
        slot = await create_slot.take(c, sql, "ws", a, grace=GRACE)
        assert slot is not None
        await create_slot.record_intent(c, sql, slot, lease, 3)
        await cluster.silence(a)
        taken = await create_slot.take(c, sql, "ws", b, grace=GRACE)
        assert taken is not None and taken.pending is not None
        # A wakes before anyone claimed its chunk: its batch is recorded (right), the
        # slot it lost stays B's, and B's view of the pending intent is now settled.
        await create_slot.record_submitted(c, sql, slot, lease, "msgbatch_1", "t")
        assert await slot_row(cluster) == (b, 2, None, None)
        assert await create_slot.release(c, sql, taken)
        again = await create_slot.take(c, sql, "ws", b, grace=GRACE)
        assert again is not None and again.pending is None

    async def test_an_intent_needs_the_slot(self, cluster: ClusterEnv) -> None:
        """An intent under a lost slot is refused with the transition rolled back."""
        a, b = await cluster.worker("a"), await cluster.worker("b")
        c, sql = cluster.conn, cluster.sql
        (lease,) = await sealed(cluster, a, "p-000001")
        slot = await create_slot.take(c, sql, "ws", a, grace=GRACE)
        assert slot is not None
        await create_slot.release(c, sql, slot)
        await create_slot.take(c, sql, "ws", b, grace=GRACE)
        with pytest.raises(FencedOut, match="create slot ws"):
            await create_slot.record_intent(c, sql, slot, lease, 3)
        assert await c.fetchval(sql("SELECT stage FROM {s}.chunk")) == "sealed"
        assert await cluster.fenced_count(a) == 1

    async def test_the_queue_limit_gates_the_intent(self, cluster: ClusterEnv) -> None:
        """A full processing queue refuses the intent (nothing written) until a batch ends."""
        a = await cluster.worker("a")
        c, sql = cluster.conn, cluster.sql
        one, two = await sealed(cluster, a, "p-000001", "p-000002")
        await limits.define(c, sql, "queue:ws", 5)
        slot = await create_slot.take(c, sql, "ws", a, grace=GRACE)
        assert slot is not None
        assert await create_slot.record_intent(c, sql, slot, one, 3, queue_scope="queue:ws")
        await create_slot.record_submitted(c, sql, slot, one, "msgbatch_1", "t")
        slot = await create_slot.take(c, sql, "ws", a, grace=GRACE)
        assert slot is not None
        assert await create_slot.record_intent(c, sql, slot, two, 3,
                                               queue_scope="queue:ws") is None
        assert await c.fetchval(sql("SELECT stage FROM {s}.chunk WHERE chunk = 'p-000002'")) == (
            "sealed")
        assert await slot_row(cluster) == (a, 2, None, None)
        # The first batch ends: its queue hold goes with the ended transition.
        async def free_queue(conn: object) -> None:
            await limits.release(conn, sql, "p-000001", ["queue:ws"])

        await fencing.apply_transition(c, sql, one, Stage.SUBMITTED, "ended",
                                       {"chunk": "p-000001", "batch_id": "msgbatch_1",
                                        "counts": {}}, on_applied=free_queue)
        assert await create_slot.record_intent(c, sql, slot, two, 3, queue_scope="queue:ws")
        assert await limits.recompute(c, sql) == []
