"""
A chunk the store gives a live worker that none of its runners drives: a seal (or a
claim) whose commit reached PostgreSQL while the database link dropped the reply. Its
owner heartbeats, so no one would ever take it over, and ``--until-drained`` never ends
(seen in ``test_cluster_drills.py``'s link cut). The heartbeat loop releases such a chunk
once it was so at two beats in a row; a chunk a runner holds stays held, and so does one
whose results it committed (no lease any more; the reader retires it in source order).

Real PostgreSQL (the test's schema), a real PgStore and its view; the runner is a plain
object holding leases, which is all the loop reads of one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest

from batchd.daemon.store.cluster_worker import heartbeat_loop
from batchd.daemon.store.contract import ChunkLease
from batchd.daemon.store.mirror import MirroredStore
from batchd.daemon.store.postgres import PgStore
from batchd.daemon.wal.manifest_state import Stage
from tests.fixtures.cluster import ClusterEnv


class Runner:
    """What heartbeat_loop reads of a pipeline runner: its leases."""

    def __init__(self) -> None:
        self.leases: dict[str, ChunkLease] = {}

    def leases_lost(self, chunks: set[str]) -> None:
        for chunk in chunks:
            self.leases.pop(chunk, None)


async def _owner(cluster: ClusterEnv, chunk: str) -> Any:
    return await cluster.conn.fetchrow(
        cluster.sql("SELECT owner, epoch FROM {s}.chunk WHERE chunk = $1"), chunk)


@pytest.mark.anyio
async def test_a_chunk_nobody_here_drives_is_released_and_a_driven_one_kept(
    cluster: ClusterEnv, tmp_path: Path
) -> None:
    store = PgStore(cluster.dsn, spool_dir=tmp_path / "spool", schema=cluster.sql.schema,
                    name="w", lease_ttl=3.0)
    await store.open()
    try:
        view = MirroredStore(store)
        shard = await cluster.shard(store.worker_id)
        await cluster.seal(shard, "stray")  # committed; the worker never heard of it
        await cluster.seal(shard, "driven")
        await cluster.seal(shard, "done")
        await view.refresh()
        # Its results committed here: no lease any more, the reader retires it in order.
        view.state.chunks["done"].stage = Stage.COMMITTED
        runner = Runner()
        runner.leases["driven"] = ChunkLease("driven", store.worker_id, 1)
        async with anyio.create_task_group() as tg:
            tg.start_soon(heartbeat_loop, view, lambda: [runner], 0.3)
            for _ in range(200):  # beats every 0.1 s: released at the second
                if (await _owner(cluster, "stray"))["owner"] is None:
                    break
                await anyio.sleep(0.05)
            await anyio.sleep(0.5)  # a few more beats
            tg.cancel_scope.cancel()
        stray, driven = await _owner(cluster, "stray"), await _owner(cluster, "driven")
        assert (stray["owner"], stray["epoch"]) == (None, 1)  # the next claim bumps it
        assert (driven["owner"], driven["epoch"]) == (store.worker_id, 1)
        assert (await _owner(cluster, "done"))["owner"] == store.worker_id
        assert set(runner.leases) == {"driven"}
        claimed = await store.claim_chunks("p", 4)  # and any worker may take it now
        assert [(c.lease.chunk, c.lease.epoch) for c in claimed] == [("stray", 2)]
    finally:
        await store.aclose()
