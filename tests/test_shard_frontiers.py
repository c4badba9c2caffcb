"""
Per-shard read sequences: a source split in shards (a Kafka topic's partitions, read
apart by cluster workers) numbers each shard's records on its own, so seals and source
commits carry the shard, and each shard has its own sealed and committed frontier.

In the pure replay state (what one daemon's manifest and the cluster's event log both
replay through) and in PostgreSQL (the fenced transitions and their rows). A source
read as one is unchanged: its records and snapshots are written as release 0.1 wrote.
"""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from batchd.daemon.cluster import event_log, fencing, shards
from batchd.daemon.cluster.errors import IllegalTransition
from batchd.daemon.cluster.leases import ChunkLease
from batchd.daemon.wal.manifest_state import ManifestCorrupt, ManifestState, Stage
from batchd.daemon.wal.records import ChunkSealed, SourceCommitted, record_from
from tests.fixtures.cluster import ClusterEnv, sealed_fields
from tests.test_cluster_fencing import committed, drive_to_ended


class _Log:
    """Feeds records to a ManifestState with increasing seqs."""

    def __init__(self) -> None:
        self.state = ManifestState()
        self.seq = 0

    def apply(self, kind: str, **fields: Any) -> None:
        self.seq += 1
        self.state.apply({"seq": self.seq, "ts": 0.0, "kind": kind, **fields})

    def to_committed(self, chunk: str, retry: dict[str, Any] | None = None) -> None:
        batch = f"b-{chunk}"
        self.apply("submit_intent", chunk=chunk, at=1.0, requests=3)
        self.apply("submitted", chunk=chunk, batch_id=batch, created_at="t")
        self.apply("ended", chunk=chunk, batch_id=batch, counts={})
        self.apply("results_committed", **committed(chunk, batch, retry_chunk=retry))


def _two_shards() -> _Log:
    log = _Log()
    log.apply("chunk_sealed", **sealed_fields("p-000001", shard="t:0", first_seq=1, last_seq=3,
                                              position={"next": {"t:0": 3}}))
    log.apply("chunk_sealed", **sealed_fields("p-000002", shard="t:1", first_seq=1, last_seq=5,
                                              position={"next": {"t:1": 5}}))
    log.to_committed("p-000001")
    log.to_committed("p-000002")
    return log


class TestReplay:
    def test_each_shard_has_its_own_frontiers(self) -> None:
        log = _two_shards()
        pipeline = log.state.pipelines["p"]
        assert pipeline.last_sealed_seq is None and pipeline.committed_seq is None
        assert pipeline.shards["t:0"]["last_sealed_seq"] == 3
        assert pipeline.shards["t:1"]["last_sealed_position"] == {"next": {"t:1": 5}}
        log.apply("source_committed", pipeline="p", position={"next": {"t:1": 5}},
                  source_seq=5, shard="t:1")
        chunks = log.state.chunks
        assert chunks["p-000002"].stage is Stage.SOURCE_COMMITTED
        assert chunks["p-000001"].stage is Stage.COMMITTED  # another shard's sequence
        # A lower sequence of another shard is no step backwards...
        log.apply("source_committed", pipeline="p", position={"next": {"t:0": 3}},
                  source_seq=3, shard="t:0")
        assert chunks["p-000001"].stage is Stage.SOURCE_COMMITTED
        assert log.state.pipelines["p"].committed_seq_of("t:0") == 3
        # ...but one within a shard is refused, naming the shard.
        with pytest.raises(ManifestCorrupt, match="p shard t:1 went from 5 back to 4"):
            log.apply("source_committed", pipeline="p", position=None, source_seq=4,
                      shard="t:1")

    def test_a_chunk_committed_after_its_shards_commit_is_covered_at_once(self) -> None:
        log = _Log()
        log.apply("chunk_sealed", **sealed_fields("p-000001", shard="t:0", last_seq=3))
        log.apply("source_committed", pipeline="p", position=None, source_seq=3, shard="t:0")
        log.apply("chunk_sealed", **sealed_fields("p-000002", shard="t:1", last_seq=2))
        log.to_committed("p-000002")
        assert log.state.chunks["p-000002"].stage is Stage.COMMITTED  # t:1 not committed
        log.to_committed("p-000001")
        assert log.state.chunks["p-000001"].stage is Stage.SOURCE_COMMITTED

    def test_a_retry_chunk_is_read_from_its_parents_shard(self) -> None:
        log = _Log()
        log.apply("chunk_sealed", **sealed_fields("p-000001", shard="t:2"))
        retry = ChunkSealed.retry(pipeline="p", parent="p-000001", parent_attempt=1,
                                  chunk="p-000001-r1", requests=1, bytes=10)
        assert "shard" not in retry.to_fields()
        log.to_committed("p-000001", retry=retry.to_fields())
        assert log.state.chunks["p-000001-r1"].shard == "t:2"
        log.apply("chunk_sealed", **retry.to_fields())  # a duplicate seal: a no-op
        assert log.state.chunks["p-000001-r1"].shard == "t:2"

    def test_a_source_read_as_one_writes_what_release_0_1_wrote(self) -> None:
        sealed = ChunkSealed(pipeline="p", chunk="p-000001", attempt=1, requests=3, bytes=9,
                             rejects=0, first_seq=1, last_seq=3, position=None, parent=None)
        assert "shard" not in sealed.to_fields()
        commit = SourceCommitted(pipeline="p", position=None, source_seq=3)
        assert list(commit.to_fields()) == ["pipeline", "position", "source_seq"]
        assert record_from("chunk_sealed", sealed.to_fields()) == sealed
        log = _Log()
        log.apply("chunk_sealed", **sealed.to_fields())
        snapshot = log.state.to_snapshot()
        assert "shard" not in snapshot["chunks"][0]
        assert "shards" not in snapshot["pipelines"][0]
        sharded = _two_shards().state
        again = ManifestState.from_snapshot(sharded.to_snapshot())
        assert again == sharded and again.chunks["p-000002"].shard == "t:1"

    def test_a_shard_must_be_a_name(self) -> None:
        with pytest.raises(ValueError, match=r"chunk_sealed\.shard must be a non-empty str"):
            record_from("chunk_sealed", sealed_fields("p-000001", shard=3))
        with pytest.raises(ValueError, match=r"source_committed\.shard must be"):
            record_from("source_committed", {"pipeline": "p", "position": None,
                                             "source_seq": 1, "shard": ""})


@pytest.mark.anyio
class TestPostgres:
    async def test_seals_and_commits_stay_in_their_shard(self, cluster: ClusterEnv) -> None:
        w = await cluster.worker("a")
        zero = await cluster.shard(w, shard="t:0")
        one = await cluster.shard(w, shard="t:1")
        with pytest.raises(IllegalTransition, match="read from shard 0 sealed under"):
            await cluster.seal(one, "p-000009")  # no shard: the whole source's
        await cluster.seal(zero, "p-000001", shard="t:0", last_seq=3)
        await cluster.seal(one, "p-000002", shard="t:1", last_seq=5)
        for chunk in ("p-000001", "p-000002"):
            lease = ChunkLease(chunk, w, 1)
            await drive_to_ended(cluster, lease, f"b-{chunk}")
            await fencing.apply_transition(cluster.conn, cluster.sql, lease, Stage.ENDED,
                                           "results_committed", committed(chunk, f"b-{chunk}"))
        c, sql = cluster.conn, cluster.sql
        with pytest.raises(IllegalTransition, match="source commit of shard t:0 under"):
            await fencing.commit_source(c, sql, one, {"pipeline": "p", "position": None,
                                                      "seq": 5, "shard": "t:0"})
        await fencing.commit_source(c, sql, one, {"pipeline": "p", "position": {"o": 5},
                                                  "seq": 5, "shard": "t:1"})
        stages = dict(await c.fetch(sql("SELECT chunk, stage FROM {s}.chunk ORDER BY chunk")))
        assert stages == {"p-000001": "committed", "p-000002": "source_committed"}
        await fencing.commit_source(c, sql, zero, {"pipeline": "p", "position": {"o": 3},
                                                   "seq": 3, "shard": "t:0"})
        row = await c.fetchrow(sql("SELECT committed_seq, shards FROM {s}.pipeline"))
        assert row["committed_seq"] is None
        frontiers = await event_log.rows_state(c, sql)
        assert frontiers.pipelines["p"].shards["t:0"]["committed_seq"] == 3
        assert frontiers.chunks["p-000002"].shard == "t:1"
        assert await event_log.drift(c, sql) == []

    async def test_chunk_numbers_are_unique_across_readers(self, cluster: ClusterEnv) -> None:
        conns = [await cluster.connect() for _ in range(4)]
        got: list[int] = []

        async def take(conn: Any) -> None:
            for _ in range(25):
                got.append(await shards.next_chunk_number(conn, cluster.sql, "p"))

        async with anyio.create_task_group() as tg:
            for conn in conns:
                tg.start_soon(take, conn)
        assert sorted(got) == list(range(100))  # from 0, as a shard counts

    async def test_readers_are_the_live_workers_of_the_pipeline(self, cluster: ClusterEnv) -> None:
        c, sql = cluster.conn, cluster.sql
        a, b = await cluster.worker("a"), await cluster.worker("b")
        await cluster.worker("other-pipelines-only")
        assert await shards.live_readers(c, sql, "p") == 0
        for worker in (a, b, a):
            await shards.join_readers(c, sql, "p", worker)
        assert await shards.live_readers(c, sql, "p") == 2
        assert await shards.live_readers(c, sql, "q") == 0
        await cluster.silence(b)
        assert await shards.live_readers(c, sql, "p") == 1

    async def test_free_shards_are_those_nobody_else_live_holds(
        self, cluster: ClusterEnv
    ) -> None:
        c, sql = cluster.conn, cluster.sql
        a, b, dead = (await cluster.worker("a"), await cluster.worker("b"),
                      await cluster.worker("dead"))
        await cluster.shard(a, shard="t:0")
        await cluster.shard(b, shard="t:1")
        await cluster.shard(dead, shard="t:2")
        await cluster.silence(dead)
        names = ["t:3", "t:2", "t:1", "t:0"]  # t:3 was never taken: it has no row yet
        assert await shards.free_shards(c, sql, a, "p", names, grace=5.0) == ["t:3", "t:2", "t:0"]
        for name in ("t:3", "t:2", "t:0"):
            assert await shards.acquire(c, sql, a, "p", name, grace=5.0) is not None
        assert await shards.acquire(c, sql, a, "p", "t:1", grace=5.0) is None
