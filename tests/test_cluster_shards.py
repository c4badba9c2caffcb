"""
Intake shards and the shared key ledger: one reader per shard, the sealed floor
a new reader resumes at, the commit frontier, and keys claimed cluster-wide.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from batchd.daemon.cluster import fencing, key_ledger, shards
from batchd.daemon.cluster.errors import FencedOut
from batchd.daemon.wal.manifest_state import Stage
from tests.fixtures.cluster import GRACE, ClusterEnv


def committed(chunk: str, batch_id: str | None, **over: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "chunk": chunk, "batch_id": batch_id, "succeeded": 3, "truncated": 0, "dead": 0,
        "retried": 0, "cost_usd": 0.0, "input_tokens": 0, "output_tokens": 0,
        "retry_chunk": None,
    }
    fields.update(over)
    return fields


@pytest.mark.anyio
class TestShardLeases:
    async def test_one_reader_per_shard(self, cluster: ClusterEnv) -> None:
        """A live reader keeps its shard; other shards of the pipeline are free."""
        a, b = await cluster.worker("a"), await cluster.worker("b")
        c, sql = cluster.conn, cluster.sql
        first = await shards.acquire(c, sql, a, "p", "0", grace=GRACE)
        assert first is not None and (first.epoch, first.previous_owner) == (1, None)
        assert await shards.acquire(c, sql, b, "p", "0", grace=GRACE) is None
        assert await shards.acquire(c, sql, b, "p", "1", grace=GRACE) is not None

    async def test_a_new_reader_resumes_after_the_sealed_floor(self, cluster: ClusterEnv) -> None:
        """The next reader starts after the highest sealed position, never re-reading it."""
        a, b = await cluster.worker("a"), await cluster.worker("b")
        lease = await cluster.shard(a)
        await cluster.seal(lease, "p-000001", first_seq=1, last_seq=3, position={"line": 3})
        await cluster.seal(lease, "p-000002", first_seq=4, last_seq=9, position={"line": 9})
        await cluster.silence(a)
        new = await shards.acquire(cluster.conn, cluster.sql, b, "p", "0", grace=GRACE)
        assert new is not None
        assert (new.epoch, new.previous_owner, new.next_chunk_no) == (2, a, 2)
        assert (new.sealed_seq, new.sealed_position) == (9, {"line": 9})
        assert (new.committed_seq, new.committed_position) == (None, None)

    async def test_force_takes_a_live_readers_shard(self, cluster: ClusterEnv) -> None:
        """An operator's forced move fences the live reader; release frees at once."""
        a, b = await cluster.worker("a"), await cluster.worker("b")
        c, sql = cluster.conn, cluster.sql
        old = await cluster.shard(a)
        forced = await shards.acquire(c, sql, b, "p", "0", grace=GRACE, force=True)
        assert forced is not None and forced.epoch == 2
        assert not await shards.release(c, sql, old)
        with pytest.raises(FencedOut):
            await cluster.seal(old, "p-000001")
        assert await shards.release(c, sql, forced)
        assert await shards.acquire(c, sql, a, "p", "0", grace=GRACE) is not None

    async def test_the_frontier_stops_at_the_first_unfinished_family(
        self, cluster: ClusterEnv
    ) -> None:
        """Commit only up to the last root whose whole family is results-committed."""
        a = await cluster.worker("a")
        c, sql = cluster.conn, cluster.sql
        lease = await cluster.shard(a)
        chunk_leases = []
        for i in range(3):
            applied = await cluster.seal(lease, f"p-{i:06d}", first_seq=10 * i + 1,
                                         last_seq=10 * i + 10, position={"line": 10 * i + 10},
                                         requests=0)
            chunk_leases.append(applied.created[0])
        assert await shards.commit_frontier(c, sql, "p", "0") is None
        for i in (0, 2):  # empty chunks commit straight from sealed
            await fencing.apply_transition(c, sql, chunk_leases[i], Stage.SEALED,
                                           "results_committed", committed(f"p-{i:06d}", None))
        assert await shards.commit_frontier(c, sql, "p", "0") == shards.Frontier(10, {"line": 10})
        await fencing.apply_transition(c, sql, chunk_leases[1], Stage.SEALED,
                                       "results_committed", committed("p-000001", None))
        assert await shards.commit_frontier(c, sql, "p", "0") == shards.Frontier(30, {"line": 30})


@pytest.mark.anyio
class TestKeyLedger:
    async def test_duplicates_replays_and_leftovers(self, cluster: ClusterEnv) -> None:
        """The single daemon's ledger rules, with sealed-ness read from the chunk rows."""
        a = await cluster.worker("a")
        c, sql = cluster.conn, cluster.sql
        lease = await cluster.shard(a)
        first = await key_ledger.claim_keys(c, sql, lease, "p-000001",
                                            [("k1", {"line": 1}), ("k2", {"line": 2})])
        assert (first.duplicates, first.replays) == ({}, set())
        # The chunk was never sealed (the reader died): its claims are leftovers.
        again = await key_ledger.claim_keys(c, sql, lease, "p-000001b",
                                            [("k1", {"line": 1})])
        assert (again.duplicates, again.replays) == ({}, set())
        await cluster.seal(lease, "p-000001b")
        replay = await key_ledger.claim_keys(c, sql, lease, "p-000002",
                                             [("k1", {"line": 1}), ("k3", {"line": 5})])
        assert (replay.duplicates, replay.replays) == ({}, {"k1"})
        dup = await key_ledger.claim_keys(c, sql, lease, "p-000002", [("k1", {"line": 7})])
        assert dup.duplicates == {"k1": "p-000001b"}
        assert await key_ledger.release_keys(c, sql, "p", ["k1", "k3"]) == 2
        fresh = await key_ledger.claim_keys(c, sql, lease, "p-000002", [("k1", {"line": 7})])
        assert fresh.duplicates == {}

    async def test_another_shards_unsealed_claim_is_a_duplicate(
        self, cluster: ClusterEnv
    ) -> None:
        """A key read by two shards is in the source twice: reported, not stolen."""
        a, b = await cluster.worker("a"), await cluster.worker("b")
        c, sql = cluster.conn, cluster.sql
        zero = await cluster.shard(a)
        one = await cluster.shard(b, shard="1")
        await key_ledger.claim_keys(c, sql, zero, "p-0-000001", [("k", {"line": 1})])
        claim = await key_ledger.claim_keys(c, sql, one, "p-1-000001", [("k", {"part": 1})])
        assert claim.duplicates == {"k": "p-0-000001"}

    async def test_two_shards_claiming_one_key_at_once_do_not_both_get_it(
        self, cluster: ClusterEnv
    ) -> None:
        """
        The second claim waits on the first's insert and then sees it: a duplicate.
        (Probing first and upserting after let both readers think the key was theirs.)
        """
        a, b = await cluster.worker("a"), await cluster.worker("b")
        first, second = await cluster.connect(), await cluster.connect()
        zero = await cluster.shard(a)
        one = await cluster.shard(b, shard="1")
        sql = cluster.sql
        tx = first.transaction()
        await tx.start()
        mine = await key_ledger.claim_keys(first, sql, zero, "p-0-000001", [("k", {"line": 1})])
        assert mine.duplicates == {}
        racing = asyncio.ensure_future(
            key_ledger.claim_keys(second, sql, one, "p-1-000001", [("k", {"part": 1})]))
        await asyncio.sleep(0.3)
        assert not racing.done()  # waiting on the first claim's row
        await tx.commit()
        theirs = await asyncio.wait_for(racing, 10)
        assert theirs.duplicates == {"k": "p-0-000001"}
        assert await cluster.conn.fetchval(
            sql("SELECT chunk FROM {s}.key_ledger WHERE key = 'k'")) == "p-0-000001"

    async def test_a_fenced_reader_claims_nothing(self, cluster: ClusterEnv) -> None:
        """After losing its shard a reader's claims are refused and not written."""
        a, b = await cluster.worker("a"), await cluster.worker("b")
        c, sql = cluster.conn, cluster.sql
        old = await cluster.shard(a)
        await cluster.silence(a)
        new = await shards.acquire(c, sql, b, "p", "0", grace=GRACE)
        assert new is not None
        with pytest.raises(FencedOut, match="shard p/0"):
            await key_ledger.claim_keys(c, sql, old, "p-000001", [("k", None)])
        assert await c.fetchval(sql("SELECT count(*) FROM {s}.key_ledger")) == 0
        assert await c.fetchval(sql("SELECT count(*) FROM {s}.key_list")) == 0
        # A key already claimed sends the claim the slow way: refused there too.
        await key_ledger.claim_keys(c, sql, new, "p-000001", [("k", None)])
        with pytest.raises(FencedOut, match="shard p/0"):
            await key_ledger.claim_keys(c, sql, old, "p-000002", [("k", None), ("k2", None)])
        rows = await c.fetch(sql("SELECT key, chunk FROM {s}.key_ledger"))
        assert [(r["key"], r["chunk"]) for r in rows] == [("k", "p-000001")]
        assert await c.fetchval(sql("SELECT count(*) FROM {s}.key_list")) == 1
