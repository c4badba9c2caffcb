"""
What the cluster forgets (daemon/cluster/retention.py): keys of chunks retired longer
ago than the ledger retention, never a live or recently retired chunk's, one worker
at a time; worker rows stopped or dead for a week that hold nothing. The rows still
replay from the event log afterwards.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import anyio
import pytest

from batchd.daemon.cluster import event_log, fencing, key_ledger, retention, shards, workers
from batchd.daemon.cluster.shards import ShardLease
from batchd.daemon.emulator import EmulatorThread
from batchd.daemon.wal.manifest_state import Stage
from tests.fixtures.cluster import ClusterEnv
from tests.fixtures.cluster_workers import ROWS, ClusterFactory


def committed(chunk: str) -> dict[str, Any]:
    return {"chunk": chunk, "batch_id": None, "succeeded": 0, "truncated": 0, "dead": 0,
            "retried": 0, "cost_usd": 0.0, "input_tokens": 0, "output_tokens": 0,
            "retry_chunk": None}


async def seal(cluster: ClusterEnv, shard: ShardLease, n: int) -> Any:
    """Seal chunk ``p-00000n`` (records 10n+1..10n+10, nothing to send)."""
    applied = await cluster.seal(shard, f"p-{n:06d}", first_seq=10 * n + 1,
                                 last_seq=10 * n + 10, position={"line": 10 * n + 10},
                                 requests=0)
    return applied.created[0]


async def retire(cluster: ClusterEnv, shard: ShardLease, lease: Any) -> None:
    """Take a sealed empty chunk through commit, source commit and retirement."""
    c, sql = cluster.conn, cluster.sql
    await fencing.apply_transition(c, sql, lease, Stage.SEALED, "results_committed",
                                   committed(lease.chunk))
    frontier = await shards.commit_frontier(c, sql, "p", "0")
    assert frontier is not None
    await fencing.commit_source(c, sql, shard, {"pipeline": "p", "position": frontier.position,
                                                "seq": frontier.seq})
    await fencing.retire_chunk(c, sql, shard, lease.chunk)


async def ledger(cluster: ClusterEnv) -> dict[str, str]:
    rows = await cluster.conn.fetch(cluster.sql("SELECT key, chunk FROM {s}.key_ledger"))
    return {r["key"]: r["chunk"] for r in rows}


async def claim(cluster: ClusterEnv, shard: ShardLease, chunk: str, *keys: str) -> Any:
    return await key_ledger.claim_keys(cluster.conn, cluster.sql, shard, chunk,
                                       [(k, {"k": k}) for k in keys])


@pytest.mark.anyio
class TestLedgerRetention:
    async def test_only_keys_of_chunks_retired_past_the_retention_go(
        self, cluster: ClusterEnv
    ) -> None:
        """Retired long ago: forgotten, and a key read again is new; live or recent: kept."""
        c, sql = cluster.conn, cluster.sql
        shard = await cluster.shard(await cluster.worker("a"))
        await claim(cluster, shard, "p-000000", "old1", "old2")
        await retire(cluster, shard, await seal(cluster, shard, 0))
        await claim(cluster, shard, "p-000001", "live")
        live = await seal(cluster, shard, 1)
        await claim(cluster, shard, "p-000002", "building")  # no chunk row yet
        await asyncio.sleep(0.3)

        # A long retention keeps everything (the old chunk retired only just now).
        kept = await retention.prune_ledger(c, sql, "p", 3600.0)
        assert (kept.keys, kept.chunks) == (0, 0)
        pruned = await retention.prune_ledger(c, sql, "p", 0.2)
        assert (pruned.keys, pruned.chunks) == (2, 1)
        assert await ledger(cluster) == {"live": "p-000001", "building": "p-000002"}
        # Read again at the same positions: a live chunk's key is still known (a replay,
        # skipped); a forgotten one is a new record, claimed by the new chunk.
        again = await claim(cluster, shard, "p-000003", "old1", "live")
        assert (again.duplicates, again.replays) == ({}, {"live"})
        assert (await ledger(cluster))["old1"] == "p-000003"

        # The next pass starts at the watermark and still finds a chunk retired since.
        await retire(cluster, shard, live)
        assert (await retention.prune_ledger(c, sql, "p", 3600.0, since=pruned.watermark)
                ).keys == 0
        await asyncio.sleep(0.3)
        later = await retention.prune_ledger(c, sql, "p", 0.2, since=pruned.watermark)
        assert later.keys == 1  # (p-000000 looked at again: within the watermark's margin)
        assert later.watermark is not None and pruned.watermark is not None
        assert later.watermark > pruned.watermark
        assert "live" not in await ledger(cluster)
        # Chunk rows and the event log are untouched: the rows still replay from the log.
        assert await event_log.drift(c, sql) == []

    async def test_a_listed_key_another_chunk_holds_is_kept(self, cluster: ClusterEnv) -> None:
        """
        A chunk's key lists name every key its claims tried (replays and duplicates too):
        when it retires, only the keys the ledger still gives it go.
        """
        c, sql = cluster.conn, cluster.sql
        shard = await cluster.shard(await cluster.worker("a"))
        await claim(cluster, shard, "p-000000", "mine")
        old = await seal(cluster, shard, 0)
        await claim(cluster, shard, "p-000001", "theirs")
        await seal(cluster, shard, 1)
        await c.execute(sql("INSERT INTO {s}.key_list (pipeline, chunk, n, keys)"
                            " VALUES ('p', 'p-000000', 1, '{theirs}')"))
        await retire(cluster, shard, old)
        await asyncio.sleep(0.3)
        pruned = await retention.prune_ledger(c, sql, "p", 0.2)
        assert (pruned.keys, pruned.chunks) == (1, 1)
        assert await ledger(cluster) == {"theirs": "p-000001"}
        assert await c.fetchval(sql("SELECT count(*) FROM {s}.key_list WHERE chunk = 'p-000000'")
                                ) == 0

    async def test_a_retired_chunk_with_a_live_family_member_keeps_its_keys(
        self, cluster: ClusterEnv
    ) -> None:
        """A retry still in flight keeps its root's keys, and the pass comes back for them."""
        c, sql = cluster.conn, cluster.sql
        shard = await cluster.shard(await cluster.worker("a"))
        await claim(cluster, shard, "p-000000", "k")
        await retire(cluster, shard, await seal(cluster, shard, 0))
        await seal(cluster, shard, 1)
        # Stand in for a retry: the live chunk made a member of the retired one's family.
        await c.execute(sql("UPDATE {s}.chunk SET root = 'p-000000' WHERE chunk = 'p-000001'"))
        await asyncio.sleep(0.3)
        held = await retention.prune_ledger(c, sql, "p", 0.2)
        assert (held.keys, held.chunks) == (0, 0)
        assert await ledger(cluster) == {"k": "p-000000"}
        await c.execute(sql("UPDATE {s}.chunk SET root = chunk WHERE chunk = 'p-000001'"))
        after = await retention.prune_ledger(c, sql, "p", 0.2, since=held.watermark)
        assert after.keys == 1
        assert await ledger(cluster) == {}

    async def test_two_workers_pruning_at_once_do_not_conflict(
        self, cluster: ClusterEnv
    ) -> None:
        """Batched deletes, two workers at once: every old key goes once, nobody fails."""
        sql = cluster.sql
        shard = await cluster.shard(await cluster.worker("a"))
        for n in range(4):
            await claim(cluster, shard, f"p-{n:06d}", *(f"k{n}-{i}" for i in range(2500)))
            await retire(cluster, shard, await seal(cluster, shard, n))
        await asyncio.sleep(0.3)
        one, two = await cluster.connect(), await cluster.connect()
        results = await asyncio.gather(*(
            retention.prune_ledger(conn, sql, "p", 0.2, keys_per_delete=500, chunks_per_page=2)
            for conn in (one, two)))
        assert sum(r.keys for r in results) == 10000
        assert await ledger(cluster) == {}
        # The lock went with the pass: a later pass runs (and finds nothing left).
        assert not (await retention.prune_ledger(two, sql, "p", 0.2)).skipped
        assert not (await retention.prune_ledger(one, sql, "p", 0.2)).skipped

    async def test_a_pass_another_worker_holds_is_skipped(self, cluster: ClusterEnv) -> None:
        other = await cluster.connect()
        name = f"batchd:{cluster.sql.schema}:retention:ledger:p"
        assert await other.fetchval("SELECT pg_try_advisory_lock(hashtext($1))", name)
        skipped = await retention.prune_ledger(cluster.conn, cluster.sql, "p", 0.2)
        assert skipped.skipped and skipped.keys == 0


@pytest.mark.anyio
class TestRetentionLoop:
    async def test_a_failed_pass_is_tried_again_at_the_next(self, cluster: ClusterEnv) -> None:
        """The database away for one pass: logged, and the next pass (its own connection) prunes."""
        shard = await cluster.shard(await cluster.worker("a"))
        await claim(cluster, shard, "p-000000", "k1", "k2")
        await retire(cluster, shard, await seal(cluster, shard, 0))
        attempts = 0

        @asynccontextmanager
        async def flaky() -> AsyncIterator[Any]:
            nonlocal attempts
            attempts += 1
            if attempts == 1:
                raise OSError("connection refused")
            async with retention.dedicated_connection(cluster.dsn, "test") as conn:
                yield conn

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(partial(retention.retention_loop, flaky, cluster.sql, "p", 0.2,
                                      every=0.1))
                for _ in range(200):  # the ledger polled until the loop emptied it
                    if not await ledger(cluster):
                        break
                    await anyio.sleep(0.05)
                tg.cancel_scope.cancel()
        assert await ledger(cluster) == {}
        assert attempts >= 2


@pytest.mark.anyio
class TestWorkerRetention:
    async def test_week_old_stopped_and_dead_idle_workers_go(self, cluster: ClusterEnv) -> None:
        """Stopped or silent a week and holding nothing: purged; anything else stays."""
        c, sql = cluster.conn, cluster.sql
        live = await cluster.worker("live")
        stopped_recently = await cluster.worker("recent")
        stopped_long_ago = await cluster.worker("old")
        dead_idle = await cluster.worker("dead")
        dead_holding = await cluster.worker("holding")
        await shards.join_readers(c, sql, "p", stopped_long_ago)
        await cluster.seal(await cluster.shard(dead_holding), "p-000001")
        for w in (stopped_recently, stopped_long_ago):
            await workers.deregister(c, sql, w)
        week = retention.WORKERS_KEPT + 3600
        await c.execute(sql("UPDATE {s}.worker SET stopped_at = stopped_at - $2 * interval '1s'"
                            " WHERE worker_id = $1"), stopped_long_ago, week)
        await cluster.silence(dead_idle, week)
        await cluster.silence(dead_holding, week)

        assert await retention.purge_workers(c, sql) == 2
        left = {i.worker_id for i in await workers.workers(c, sql)}
        assert left == {live, stopped_recently, dead_holding}
        assert await c.fetchval(sql("SELECT count(*) FROM {s}.shard_reader")) == 0
        # A pass with no ledger retention purges the workers and spool orphans only.
        keeper = retention.Retention("p", None)
        assert await keeper.run_once(c, sql) == retention.Pass(None, 0, 0)

    async def test_a_pass_drops_orphan_spool_blocks_and_keeps_live_ones(
        self, cluster: ClusterEnv
    ) -> None:
        """A refused seal's blocks (an hour old) and a retired chunk's go; a live chunk's stay."""
        c, sql = cluster.conn, cluster.sql
        shard = await cluster.shard(await cluster.worker("a"))
        await retire(cluster, shard, await seal(cluster, shard, 2))
        await cluster.spool("p-000002", shard.epoch)  # as if its worker died before deleting
        await seal(cluster, shard, 5)  # live, its blocks in use
        await cluster.spool("p-000009", shard.epoch)  # a seal that never committed
        keeper = retention.Retention("p", None)
        assert (await keeper.run_once(c, sql)).spool_blocks == 1  # the retired chunk's
        await c.execute(sql("UPDATE {s}.spool_block SET created_at = now() - interval '2 hours'"))
        assert (await keeper.run_once(c, sql)).spool_blocks == 1  # the refused seal's
        left = await c.fetch(sql("SELECT DISTINCT chunk FROM {s}.spool_block"))
        assert [r["chunk"] for r in left] == ["p-000005"]


class TestRetentionRun:
    def test_workers_prune_the_ledger_while_they_run_and_pay_each_key_once(
        self, cluster_factory: ClusterFactory, emulator: EmulatorThread
    ) -> None:
        """
        Three real workers with ``ledger_retention = "0.5s"`` and a pass every 0.2 s: keys
        of retired chunks are forgotten during the run, and still every key has one
        outcome and every custom_id reached the emulator once (forgetting never let a
        live chunk's key, or a replayed record, be sent again).
        """
        cluster = cluster_factory(pipeline={"ledger_retention": "0.5s"})
        env = {retention.PRUNE_ENV: "0.2"}
        for i in range(3):
            cluster.start(i, env=env)
        cluster.wait([0, 1, 2])
        cluster.check(emulator)
        left = cluster.query(f'SELECT count(*) AS n FROM "{cluster.schema}".key_ledger')[0]["n"]
        assert left < ROWS, f"no key was forgotten ({left} of {ROWS} left)\n{cluster.logs()}"
        assert "key ledger pruned" in "".join(
            (ws.root / "run.log").read_text() for ws in cluster.workers)
