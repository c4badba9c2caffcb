"""
Fenced transitions against the real PostgreSQL: the manifest's records applied
only under a current lease, duplicates as no-ops, the replay code's refusals,
and the event log replaying to exactly the rows.
"""

from __future__ import annotations

from typing import Any

import pytest

from batchd.daemon.cluster import event_log, fencing, leases, reads, shards, workers
from batchd.daemon.cluster.errors import FencedOut, IllegalTransition
from batchd.daemon.cluster.leases import ChunkLease
from batchd.daemon.wal.manifest_state import Stage
from tests.fixtures.cluster import GRACE, ClusterEnv


def committed(chunk: str, batch_id: str | None, **over: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "chunk": chunk, "batch_id": batch_id, "succeeded": 3, "truncated": 0, "dead": 0,
        "retried": 0, "cost_usd": 0.25, "input_tokens": 30, "output_tokens": 60,
        "retry_chunk": None,
    }
    fields.update(over)
    return fields


async def drive_to_ended(cluster: ClusterEnv, lease: ChunkLease, batch_id: str) -> None:
    """submit_intent, submitted, ended for a 3-request chunk."""
    c, sql, chunk = cluster.conn, cluster.sql, lease.chunk
    await fencing.apply_transition(c, sql, lease, Stage.SEALED, "submit_intent",
                                   {"chunk": chunk, "at": 1000.5, "requests": 3})
    await fencing.apply_transition(c, sql, lease, Stage.INTENT, "submitted",
                                   {"chunk": chunk, "batch_id": batch_id, "created_at": "t"})
    await fencing.apply_transition(c, sql, lease, Stage.SUBMITTED, "ended",
                                   {"chunk": chunk, "batch_id": batch_id,
                                    "counts": {"succeeded": 3}})


async def stage_of(cluster: ClusterEnv, chunk: str) -> str:
    stage: str = await cluster.conn.fetchval(
        cluster.sql("SELECT stage FROM {s}.chunk WHERE chunk = $1"), chunk)
    return stage


@pytest.mark.anyio
class TestChunkLifecycle:
    async def test_a_whole_lifecycle_replays_to_the_rows(self, cluster: ClusterEnv) -> None:
        """Seal → intent → submitted → ended → committed → source → retired; log == rows."""
        w = await cluster.worker("a")
        shard = await cluster.shard(w)
        (lease,) = (await cluster.seal(shard, "p-000001")).created
        await drive_to_ended(cluster, lease, "msgbatch_1")
        await fencing.apply_transition(cluster.conn, cluster.sql, lease, Stage.ENDED,
                                       "results_committed", committed("p-000001", "msgbatch_1"))
        frontier = await shards.commit_frontier(cluster.conn, cluster.sql, "p", "0")
        assert frontier == shards.Frontier(3, {"line": 3})
        await fencing.commit_source(cluster.conn, cluster.sql, shard,
                                    {"pipeline": "p", "position": frontier.position,
                                     "seq": frontier.seq})
        assert await stage_of(cluster, "p-000001") == "source_committed"
        await fencing.retire_chunk(cluster.conn, cluster.sql, shard, "p-000001")
        assert await stage_of(cluster, "p-000001") == "retired"
        kinds = [r["kind"] async for r in event_log.records(cluster.conn, cluster.sql)]
        assert kinds == ["chunk_sealed", "submit_intent", "submitted", "ended",
                         "results_committed", "source_committed", "chunk_retired"]
        assert await event_log.drift(cluster.conn, cluster.sql) == []
        state = await event_log.rows_state(cluster.conn, cluster.sql)
        assert state.pipelines["p"].succeeded == 3
        assert state.batch_owner("msgbatch_1") == "p-000001"

    async def test_every_record_is_stored_unchanged(self, cluster: ClusterEnv) -> None:
        """The event holds exactly the fields given, with the lease that wrote it."""
        w = await cluster.worker("a")
        (lease,) = (await cluster.seal(await cluster.shard(w), "p-000001")).created
        applied = await fencing.apply_transition(
            cluster.conn, cluster.sql, lease, Stage.SEALED, "submit_intent",
            {"chunk": "p-000001", "at": 1000.125, "requests": 3})
        assert applied.record is not None
        row = await cluster.conn.fetchrow(
            cluster.sql("SELECT worker, fence, epoch FROM {s}.event WHERE seq = $1"),
            applied.record["seq"])
        assert tuple(row) == (w, "chunk", 1)
        (record,) = [r async for r in event_log.records(cluster.conn, cluster.sql,
                                                       after=applied.record["seq"] - 1)]
        assert record == applied.record
        assert {k: record[k] for k in ("chunk", "at", "requests")} == {
            "chunk": "p-000001", "at": 1000.125, "requests": 3}

    async def test_a_duplicate_is_a_noop_even_from_a_fenced_owner(
        self, cluster: ClusterEnv
    ) -> None:
        """An effect already present changes nothing, whoever sends it; nothing is logged."""
        a, b = await cluster.worker("a"), await cluster.worker("b")
        (lease,) = (await cluster.seal(await cluster.shard(a), "p-000001")).created
        await drive_to_ended(cluster, lease, "msgbatch_1")
        await cluster.silence(a)
        await leases.claim_chunks(cluster.conn, cluster.sql, b, "p", 1, grace=GRACE)
        before = await cluster.conn.fetchval(cluster.sql("SELECT count(*) FROM {s}.event"))
        again = await fencing.apply_transition(
            cluster.conn, cluster.sql, lease, Stage.SUBMITTED, "ended",
            {"chunk": "p-000001", "batch_id": "msgbatch_1", "counts": {"succeeded": 3}})
        assert again.noop and again.chunk is not None and again.chunk.stage is Stage.ENDED
        assert await cluster.conn.fetchval(cluster.sql("SELECT count(*) FROM {s}.event")) == before
        assert await cluster.fenced_count(a) == 0

    async def test_replays_refusals_in_the_manifests_words(self, cluster: ClusterEnv) -> None:
        """A transition replay refuses is refused here, with replay's message, nothing written."""
        w = await cluster.worker("a")
        (lease,) = (await cluster.seal(await cluster.shard(w), "p-000001")).created
        with pytest.raises(IllegalTransition, match="intent for 5 requests, chunk p-000001 has 3"):
            await fencing.apply_transition(cluster.conn, cluster.sql, lease, Stage.SEALED,
                                           "submit_intent",
                                           {"chunk": "p-000001", "at": 1.0, "requests": 5})
        with pytest.raises(IllegalTransition, match="submitted without submit_intent"):
            await fencing.apply_transition(cluster.conn, cluster.sql, lease, Stage.SEALED,
                                           "submitted", {"chunk": "p-000001", "batch_id": "b",
                                                         "created_at": "t"})
        with pytest.raises(IllegalTransition, match="missing batch_id"):
            await fencing.apply_transition(cluster.conn, cluster.sql, lease, Stage.SEALED,
                                           "ended", {"chunk": "p-000001", "counts": {}})
        with pytest.raises(IllegalTransition, match="unknown chunk p-000404"):
            await fencing.apply_transition(
                cluster.conn, cluster.sql, ChunkLease("p-000404", w, 1), Stage.SEALED,
                "submit_intent", {"chunk": "p-000404", "at": 1.0, "requests": 3})
        assert await stage_of(cluster, "p-000001") == "sealed"

    async def test_a_batch_id_belongs_to_one_chunk(self, cluster: ClusterEnv) -> None:
        """Recording another chunk's batch id is refused, naming the owner."""
        w = await cluster.worker("a")
        shard = await cluster.shard(w)
        (one,) = (await cluster.seal(shard, "p-000001")).created
        (two,) = (await cluster.seal(shard, "p-000002", first_seq=4, last_seq=6)).created
        await drive_to_ended(cluster, one, "msgbatch_1")
        await fencing.apply_transition(cluster.conn, cluster.sql, two, Stage.SEALED,
                                       "submit_intent", {"chunk": "p-000002", "at": 5.0,
                                                         "requests": 3})
        with pytest.raises(IllegalTransition, match="batch msgbatch_1 already belongs to chunk "
                                                    "p-000001"):
            await fencing.apply_transition(cluster.conn, cluster.sql, two, Stage.INTENT,
                                           "submitted", {"chunk": "p-000002",
                                                         "batch_id": "msgbatch_1",
                                                         "created_at": "t"})

    async def test_a_retry_chunk_is_sealed_with_the_commit(self, cluster: ClusterEnv) -> None:
        """results_committed with retry_chunk creates the child, owned by the same worker."""
        w = await cluster.worker("a")
        (lease,) = (await cluster.seal(await cluster.shard(w), "p-000001")).created
        await drive_to_ended(cluster, lease, "msgbatch_1")
        retry = {"pipeline": "p", "chunk": "p-000001-r1", "attempt": 2, "requests": 1,
                 "bytes": 100, "rejects": 0, "first_seq": None, "last_seq": None,
                 "position": None, "parent": "p-000001"}
        with pytest.raises(IllegalTransition, match="needs its spool uploaded"):
            await fencing.apply_transition(cluster.conn, cluster.sql, lease, Stage.ENDED,
                                           "results_committed",
                                           committed("p-000001", "msgbatch_1", retried=1,
                                                     retry_chunk=retry))
        digest = await cluster.spool("p-000001-r1", lease.epoch, lines=1)
        applied = await fencing.apply_transition(
            cluster.conn, cluster.sql, lease, Stage.ENDED, "results_committed",
            committed("p-000001", "msgbatch_1", retried=1, retry_chunk=retry),
            retry_spool=digest)
        assert applied.created == (ChunkLease("p-000001-r1", w, 1),)
        row = await cluster.conn.fetchrow(
            cluster.sql("SELECT root, shard, covers_seq, stage FROM {s}.chunk"
                        " WHERE chunk = 'p-000001-r1'"))
        assert tuple(row) == ("p-000001", "0", 3, "sealed")
        # The family is not done while the retry is pending: no source commit past it.
        assert await shards.commit_frontier(cluster.conn, cluster.sql, "p", "0") is None
        assert await event_log.drift(cluster.conn, cluster.sql) == []

    async def test_pause_resume_and_alarms_need_no_lease(self, cluster: ClusterEnv) -> None:
        """Pipeline-wide records are logged and replay to the pipeline row."""
        c, sql = cluster.conn, cluster.sql
        await fencing.record_pipeline_event(c, sql, "pipeline_paused",
                                            {"pipeline": "p", "reason": "billing"})
        again = await fencing.record_pipeline_event(c, sql, "pipeline_paused",
                                                    {"pipeline": "p", "reason": "billing"})
        assert again.noop
        await fencing.record_pipeline_event(c, sql, "alarm", {"pipeline": "q", "chunk": None,
                                                              "kind": "duplicate_create",
                                                              "message": "m"})
        state = await event_log.rows_state(c, sql)
        assert state.pipelines["p"].paused == "billing"
        assert "q" not in state.pipelines  # an alarm alone creates no pipeline, as in replay
        assert [a.kind for a in state.alarms] == ["duplicate_create"]
        await fencing.record_pipeline_event(c, sql, "pipeline_resumed", {"pipeline": "p"})
        assert await event_log.drift(c, sql) == []
        with pytest.raises(IllegalTransition, match="needs a chunk or shard lease"):
            await fencing.record_pipeline_event(c, sql, "chunk_retired", {"chunk": "x"})


@pytest.mark.anyio
class TestFencing:
    async def test_a_paused_owner_is_fenced_out_and_counted(self, cluster: ClusterEnv) -> None:
        """
        SIGSTOP, in process: A falls silent past TTL + grace, B takes the chunk;
        A wakes and tries to record its batch: FencedOut, counted, nothing written.
        """
        a, b = await cluster.worker("a"), await cluster.worker("b")
        (stale,) = (await cluster.seal(await cluster.shard(a), "p-000001")).created
        await fencing.apply_transition(cluster.conn, cluster.sql, stale, Stage.SEALED,
                                       "submit_intent", {"chunk": "p-000001", "at": 1.0,
                                                         "requests": 3})
        await cluster.silence(a)  # SIGSTOP: no heartbeat for an hour
        (taken,) = await leases.claim_chunks(cluster.conn, cluster.sql, b, "p", 1, grace=GRACE)
        # SIGCONT: A's heartbeat goes through, but the reply no longer lists the chunk.
        beat = await workers.heartbeat(cluster.conn, cluster.sql, a)
        assert beat.lost_chunks({"p-000001": stale.epoch}) == {"p-000001"}
        with pytest.raises(FencedOut, match=f"now {b} at epoch 2"):
            await fencing.apply_transition(cluster.conn, cluster.sql, stale, Stage.INTENT,
                                           "submitted", {"chunk": "p-000001",
                                                         "batch_id": "msgbatch_zombie",
                                                         "created_at": "t"})
        assert await cluster.fenced_count(a) == 1
        assert await stage_of(cluster, "p-000001") == "intent"
        # The new owner adopts its own finding; the zombie's batch id was never recorded.
        await fencing.apply_transition(cluster.conn, cluster.sql, taken.lease, Stage.INTENT,
                                       "submitted", {"chunk": "p-000001",
                                                     "batch_id": "msgbatch_1",
                                                     "created_at": "t"})
        with pytest.raises(FencedOut):
            await fencing.apply_transition(cluster.conn, cluster.sql, stale, Stage.SUBMITTED,
                                           "ended", {"chunk": "p-000001",
                                                     "batch_id": "msgbatch_1", "counts": {}})
        assert await cluster.fenced_count(a) == 2
        assert await event_log.drift(cluster.conn, cluster.sql) == []

    async def test_a_stale_stage_is_fenced_out(self, cluster: ClusterEnv) -> None:
        """The owner's own stale view (expected stage wrong) changes nothing."""
        w = await cluster.worker("a")
        (lease,) = (await cluster.seal(await cluster.shard(w), "p-000001")).created
        with pytest.raises(FencedOut, match="at stage sealed, expected intent"):
            await fencing.apply_transition(cluster.conn, cluster.sql, lease, Stage.INTENT,
                                           "submit_intent", {"chunk": "p-000001", "at": 1.0,
                                                             "requests": 3})

    async def test_a_fenced_reader_seals_commits_and_retires_nothing(
        self, cluster: ClusterEnv
    ) -> None:
        """After another worker takes the shard, the old reader's shard records all fail."""
        a, b = await cluster.worker("a"), await cluster.worker("b")
        old = await cluster.shard(a)
        (lease,) = (await cluster.seal(old, "p-000001")).created
        await drive_to_ended(cluster, lease, "msgbatch_1")
        await fencing.apply_transition(cluster.conn, cluster.sql, lease, Stage.ENDED,
                                       "results_committed", committed("p-000001", "msgbatch_1"))
        await cluster.silence(a)
        new = await shards.acquire(cluster.conn, cluster.sql, b, "p", "0", grace=GRACE)
        assert new is not None and (new.epoch, new.previous_owner) == (2, a)
        assert (new.sealed_seq, new.sealed_position) == (3, {"line": 3})
        with pytest.raises(FencedOut, match="shard p/0"):
            await cluster.seal(old, "p-000002", first_seq=4, last_seq=6)
        with pytest.raises(FencedOut):
            await fencing.commit_source(cluster.conn, cluster.sql, old,
                                        {"pipeline": "p", "position": {"line": 3}, "seq": 3})
        with pytest.raises(FencedOut):
            await fencing.retire_chunk(cluster.conn, cluster.sql, old, "p-000001")
        assert await cluster.fenced_count(a) == 3
        await fencing.commit_source(cluster.conn, cluster.sql, new,
                                    {"pipeline": "p", "position": {"line": 3}, "seq": 3})
        await fencing.retire_chunk(cluster.conn, cluster.sql, new, "p-000001")
        assert await event_log.drift(cluster.conn, cluster.sql) == []

    async def test_source_commits_never_go_backwards(self, cluster: ClusterEnv) -> None:
        """A commit below the recorded one is refused in replay's words; equal is a no-op."""
        w = await cluster.worker("a")
        shard = await cluster.shard(w)
        c, sql = cluster.conn, cluster.sql
        await fencing.commit_source(c, sql, shard, {"pipeline": "p", "position": {"l": 9},
                                                    "seq": 9})
        assert (await fencing.commit_source(c, sql, shard, {"pipeline": "p",
                                                            "position": {"l": 9},
                                                            "seq": 9})).noop
        with pytest.raises(IllegalTransition, match="went from 9 back to 4"):
            await fencing.commit_source(c, sql, shard, {"pipeline": "p", "position": {"l": 4},
                                                        "seq": 4})

    async def test_retire_needs_results_and_the_chunks_own_shard(
        self, cluster: ClusterEnv
    ) -> None:
        """A chunk is retired only once committed, and only by its own shard's reader."""
        w = await cluster.worker("a")
        shard = await cluster.shard(w)
        other = await cluster.shard(w, shard="1")
        await cluster.seal(shard, "p-000001")
        with pytest.raises(IllegalTransition, match="belongs to shard p/0, not p/1"):
            await fencing.retire_chunk(cluster.conn, cluster.sql, other, "p-000001")
        with pytest.raises(IllegalTransition, match="retired at sealed"):
            await fencing.retire_chunk(cluster.conn, cluster.sql, shard, "p-000001")


@pytest.mark.anyio
class TestReads:
    async def test_rows_read_back_as_replay_types(self, cluster: ClusterEnv) -> None:
        """chunk(), chunks(), pipeline() and batch_owner() give what replay would."""
        a, b = await cluster.worker("a"), await cluster.worker("b")
        shard = await cluster.shard(a)
        (one,) = (await cluster.seal(shard, "p-000001")).created
        await cluster.seal(shard, "p-000002", first_seq=4, last_seq=6, position={"line": 6})
        await drive_to_ended(cluster, one, "msgbatch_1")
        c, sql = cluster.conn, cluster.sql
        state = await event_log.replay(c, sql)
        assert await reads.chunk(c, sql, "p-000001") == state.chunks["p-000001"]
        assert await reads.chunk(c, sql, "p-000404") is None
        assert [x.chunk for x in await reads.chunks(c, sql, "p")] == ["p-000001", "p-000002"]
        assert await reads.chunks(c, sql, "p", owner=b) == []
        assert await reads.pipeline(c, sql, "p") == state.pipelines["p"]
        assert await reads.batch_owner(c, sql, "msgbatch_1") == "p-000001"
        assert await reads.batch_owner(c, sql, "msgbatch_other") is None
