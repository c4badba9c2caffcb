"""
The state store contract, one suite run against both stores: LocalStore on a
state dir in tmp_path, PgStore on the real PostgreSQL (each test its own schema).

Whatever a runtime written against ``StateStore`` sees must be the same on
either: the state a chunk's life leaves, the refusals, replay after a reopen,
the spool's checksum, the key ledger's verdicts and the limits. What only a
shared store can show (fencing between workers, takeover) is at the end.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import anyio
import pytest

from batchd.daemon.intake.ledger import LEDGER_NAME, KeyLedger
from batchd.daemon.intake.spool_check import spool_damage
from batchd.daemon.store.contract import (
    ChunkLease,
    Claimed,
    FencedOut,
    LimitUndefined,
    ShardLease,
    SpoolCorrupt,
)
from batchd.daemon.store.local import LocalStore
from batchd.daemon.wal.manifest import replay
from batchd.daemon.wal.manifest_state import ManifestState, Stage
from batchd.daemon.wal.records import (
    AlarmRaised,
    BatchDisowned,
    ChunkRetired,
    ChunkSealed,
    Ended,
    Figures,
    IdScheme,
    PipelinePaused,
    PipelineResumed,
    ResultsCommitted,
    SourceCommitted,
    SubmitIntent,
    Submitted,
)
from tests.fixtures.store import BUDGET, QUEUE, Harness, local_harness, pg_harness

DATA = Path(__file__).parent / "data" / "manifests"
KINDS = ("local", "postgres")


@pytest.fixture(params=KINDS)
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> Harness:
    if request.param == "local":
        return local_harness(tmp_path)
    return pg_harness(request.getfixturevalue("pg_dsn"), request.getfixturevalue("pg_schema"),
                      tmp_path)


# -- records the tests drive a chunk with ---------------------------------------------


def sealed(chunk: str = "p-000001", **over: Any) -> ChunkSealed:
    fields: dict[str, Any] = {
        "pipeline": "p", "chunk": chunk, "attempt": 1, "requests": 3, "bytes": 300,
        "rejects": 0, "first_seq": 1, "last_seq": 3, "position": {"line": 3}, "parent": None,
    }
    fields.update(over)
    return ChunkSealed(**fields)


def committed(chunk: str, batch_id: str | None,
              retry: ChunkSealed | None = None) -> ResultsCommitted:
    return ResultsCommitted(chunk=chunk, batch_id=batch_id,
                            figures=Figures(succeeded=2, dead=0, retried=1 if retry else 0,
                                            cost_usd=0.25, input_tokens=30, output_tokens=60),
                            retry_chunk=retry)


async def seal(h: Harness, store: Any, shard: ShardLease, chunk: str = "p-000001",
               **over: Any) -> ChunkLease:
    digest = await store.put_spool(chunk, shard.epoch, h.spool_file(chunk))
    applied = await store.append(sealed(chunk, **over), lease=shard, spool=digest)
    assert applied.written
    (lease,) = applied.created
    return lease


def comparable(state: ManifestState) -> dict[str, Any]:
    """What both stores keep of the state (seq, clocks and the ledger binding are each store's)."""
    return {
        "chunks": {c: asdict(s) for c, s in state.chunks.items()},
        "pipelines": {p: asdict(s) for p, s in state.pipelines.items()},
        "live_batches": state.live_batches,
        "retired_batches": state.retired_batches,
        "retired_chunks": state.retired_chunks,
        "alarms": [(a.pipeline, a.chunk, a.kind, a.message) for a in state.alarms],
    }


async def whole_life(h: Harness, store: Any) -> None:
    """Seal, intent, submitted, ended, collect (cutting a retry), source commit, retire."""
    shard = await store.acquire_shard("p")
    lease = await seal(h, store, shard)
    await store.append(SubmitIntent(chunk=lease.chunk, at=1000.5, requests=3), lease=lease,
                       expected=Stage.SEALED)
    await store.append(Submitted(chunk=lease.chunk, batch_id="msgbatch_1", created_at="t"),
                       lease=lease, expected=Stage.INTENT)
    await store.append(Ended(chunk=lease.chunk, batch_id="msgbatch_1",
                             counts={"succeeded": 2, "errored": 1}),
                       lease=lease, expected=Stage.SUBMITTED)
    retry = ChunkSealed.retry(pipeline="p", parent=lease.chunk, parent_attempt=1,
                              chunk="p-000001-r1", requests=1, bytes=100)
    retry_spool = await store.put_spool(retry.chunk, lease.epoch, h.spool_file(retry.chunk, 1))
    applied = await store.append(committed(lease.chunk, "msgbatch_1", retry), lease=lease,
                                 expected=Stage.ENDED, spool=retry_spool)
    (retry_lease,) = applied.created
    assert applied.chunk is not None and applied.chunk.stage is Stage.COMMITTED
    await store.append(committed(retry_lease.chunk, None), lease=retry_lease,
                       expected=Stage.SEALED)
    await store.append(SourceCommitted(pipeline="p", position={"line": 3}, source_seq=3),
                       lease=shard)
    for chunk in (lease.chunk, retry_lease.chunk):
        assert (await store.chunk(chunk)).stage is Stage.SOURCE_COMMITTED
        await store.append(ChunkRetired(chunk=chunk), lease=shard)
    await store.append(PipelinePaused(pipeline="p", reason="sink down"))
    await store.append(PipelineResumed(pipeline="p"))
    await store.append(AlarmRaised(pipeline="p", chunk=None, alarm_kind="sink_failed",
                                   message="sink down"))


# -- the contract, on both stores -------------------------------------------------------


@pytest.mark.anyio
class TestRecords:
    async def test_a_whole_life_leaves_the_same_state_on_both(self, harness: Harness) -> None:
        """The state after a chunk's whole life equals the manifest's own replay of it."""
        async with harness.opened() as store:
            await whole_life(harness, store)
            state = await store.snapshot()
            assert await store.chunk("p-000001") is None
            assert await store.batch_owner("msgbatch_1") == "p-000001"
            assert await store.batch_owner("msgbatch_other") is None
        # The same records through a bare ManifestState: what the single daemon replays.
        expected = ManifestState()
        for seq, record in enumerate(_whole_life_records(), start=1):
            expected.apply({"seq": seq, "ts": 0.0, "kind": record.KIND, **record.to_fields()})
        assert comparable(state) == comparable(expected)
        assert state.pipelines["p"].succeeded == 4 and state.pipelines["p"].paused is None

    async def test_a_duplicate_is_a_noop_that_writes_nothing(self, harness: Harness) -> None:
        async with harness.opened() as store:
            lease = await seal(harness, store, await store.acquire_shard("p"))
            intent = SubmitIntent(chunk=lease.chunk, at=1000.5, requests=3)
            first = await store.append(intent, lease=lease, expected=Stage.SEALED)
            again = await store.append(intent, lease=lease, expected=Stage.SEALED)
            assert first.written and first.record is not None
            assert again.noop and again.fenced is None and again.record is None
            assert again.chunk is not None and again.chunk.stage is Stage.INTENT
            seq = (await store.snapshot()).seq
            assert (await store.append(PipelinePaused(pipeline="p", reason="x"))).written
            assert (await store.append(PipelinePaused(pipeline="p", reason="x"))).noop
            assert (await store.snapshot()).seq > seq

    async def test_an_illegal_transition_is_a_value_error_on_both(self, harness: Harness) -> None:
        """Replay's refusals, in replay's words, and nothing written."""
        async with harness.opened() as store:
            lease = await seal(harness, store, await store.acquire_shard("p"))
            before = comparable(await store.snapshot())
            with pytest.raises(ValueError, match=r"illegal submit_intent record: .*intent for 5 "
                                                 r"requests, chunk p-000001 has 3"):
                await store.append(SubmitIntent(chunk=lease.chunk, at=1.0, requests=5),
                                   lease=lease, expected=Stage.SEALED)
            with pytest.raises(ValueError, match=r"illegal ended record: .*ended before it was "
                                                 r"submitted"):
                await store.append(Ended(chunk=lease.chunk, batch_id="b", counts={}),
                                   lease=lease)
            with pytest.raises(ValueError, match="unknown chunk p-000009"):
                await store.append(SubmitIntent(chunk="p-000009", at=1.0, requests=3),
                                   lease=ChunkLease("p-000009", lease.owner, lease.epoch),
                                   expected=Stage.SEALED)
            assert comparable(await store.snapshot()) == before

    async def test_a_record_under_the_wrong_lease_is_refused(self, harness: Harness) -> None:
        async with harness.opened() as store:
            shard = await store.acquire_shard("p")
            lease = await seal(harness, store, shard)
            with pytest.raises(ValueError, match="submit_intent record needs a chunk lease"):
                await store.append(SubmitIntent(chunk=lease.chunk, at=1.0, requests=3),
                                   lease=shard)
            with pytest.raises(ValueError, match="for chunk p-000001 under a lease on p-000002"):
                await store.append(SubmitIntent(chunk=lease.chunk, at=1.0, requests=3),
                                   lease=ChunkLease("p-000002", lease.owner, lease.epoch))
            with pytest.raises(ValueError, match="chunk_retired record needs a shard lease"):
                await store.append(ChunkRetired(chunk=lease.chunk), lease=lease)
            assert (await store.chunk(lease.chunk)).stage is Stage.SEALED

    async def test_a_stale_expected_stage_is_fenced_not_written(self, harness: Harness) -> None:
        """The caller believed the chunk was sealed; it is submitted: nothing is recorded."""
        async with harness.opened() as store:
            lease = await seal(harness, store, await store.acquire_shard("p"))
            await store.append(SubmitIntent(chunk=lease.chunk, at=1.5, requests=3),
                               lease=lease, expected=Stage.SEALED)
            await store.append(Submitted(chunk=lease.chunk, batch_id="b1", created_at="t"),
                               lease=lease, expected=Stage.INTENT)
            stale = await store.append(SubmitIntent(chunk=lease.chunk, at=9.5, requests=3),
                                       lease=lease, expected=Stage.SEALED)
            assert stale.noop and stale.fenced is not None and "submitted" in stale.fenced
            assert (await store.chunk(lease.chunk)).stage is Stage.SUBMITTED

    async def test_reopening_replays_to_the_same_state(self, harness: Harness) -> None:
        async with harness.opened() as store:
            await whole_life(harness, store)
            lease = await seal(harness, store, await store.acquire_shard("p"), "p-000002",
                               first_seq=4, last_seq=6, position={"line": 6})
            await store.append(SubmitIntent(chunk=lease.chunk, at=2000.25, requests=3),
                               lease=lease, expected=Stage.SEALED)
            before = comparable(await store.snapshot())
        async with harness.opened(name="b") as store:
            assert comparable(await store.snapshot()) == before
            (chunk,) = await store.chunks("p")
            assert chunk.chunk == "p-000002" and chunk.stage is Stage.INTENT
            assert (await store.pipeline("p")).next_chunk_no == 2


@pytest.mark.anyio
class TestLeasesAndSlots:
    async def test_claims_hand_out_live_chunks_once(self, harness: Harness) -> None:
        async with harness.opened() as store:
            shard = await store.acquire_shard("p")
            await seal(harness, store, shard, "p-000001")
            await seal(harness, store, shard, "p-000002", first_seq=4, last_seq=6)
            owned = await store.chunks("p", owned=True)
            assert [c.chunk for c in owned] == ["p-000001", "p-000002"]  # the sealer's
            beat = await store.heartbeat()
            held = {c.chunk: beat.chunks[c.chunk] for c in owned}
            assert beat.lost_chunks(held) == set()
            assert await store.claim_chunks("p", 10) == []  # nobody else's to take
            for chunk in held:
                assert await store.release(ChunkLease(chunk, store.worker_id, held[chunk]))
            claimed = await store.claim_chunks("p", 1)
            assert [c.lease.chunk for c in claimed] == ["p-000001"]
            assert claimed[0].stage == "sealed"
            assert [c.lease.chunk for c in await store.claim_chunks("p", 5)] == ["p-000002"]

    async def test_the_create_slot_is_held_once_and_names_a_pending_intent(
            self, harness: Harness) -> None:
        async with harness.opened() as store:
            lease = await seal(harness, store, await store.acquire_shard("p"))
            slot = await store.acquire_create_slot("default")
            assert slot is not None and slot.pending is None
            assert await store.acquire_create_slot("default") is None
            intent = await store.record_intent(slot, lease, 3)
            assert intent is not None and intent.written
            assert intent.chunk is not None and intent.chunk.stage is Stage.INTENT
            # The create's outcome is unknown and the holder gives up the slot: whoever
            # takes it next must resolve that intent first.
            assert await store.release_create_slot(slot)
            # (PgStore clears the pending mark on a definite failure; here it was not one.)
            again = await store.acquire_create_slot("default")
            assert again is not None
            done = await store.record_submitted(again, lease, "msgbatch_7", "t")
            assert done.written and done.chunk is not None and done.chunk.batch_id == "msgbatch_7"
            third = await store.acquire_create_slot("default")
            assert third is not None and third.pending is None  # the submitted freed it

    async def test_the_queue_scope_refuses_an_intent_that_does_not_fit(
            self, harness: Harness) -> None:
        async with harness.opened() as store:
            shard = await store.acquire_shard("p")
            first = await seal(harness, store, shard, "p-000001")
            second = await seal(harness, store, shard, "p-000002", first_seq=4, last_seq=6)
            slot = await store.acquire_create_slot("default")
            assert slot is not None
            assert await store.record_intent(slot, first, 3, queue_scope=QUEUE) is not None
            # 3 of 5 in the queue: 3 more do not fit, and nothing is written.
            assert await store.record_intent(slot, second, 3, queue_scope=QUEUE) is None
            assert (await store.chunk(second.chunk)).stage is Stage.SEALED


@pytest.mark.anyio
class TestSpool:
    async def test_the_spool_round_trips_with_its_checksum(self, harness: Harness) -> None:
        async with harness.opened() as store:
            shard = await store.acquire_shard("p")
            source = harness.spool_file("p-000001", lines=50)
            content = source.read_bytes()
            digest = await store.put_spool("p-000001", shard.epoch, source)
            assert digest.sha256 == hashlib.sha256(content).hexdigest()
            assert digest.raw_bytes == len(content)
            await store.append(sealed("p-000001"), lease=shard, spool=digest)
            if harness.kind == "postgres":  # fetched as on another machine
                store.spool_path("p-000001").unlink()
            fetched = await store.fetch_spool("p-000001")
            assert fetched.sha256 == digest.sha256
            assert store.spool_path("p-000001").read_bytes() == content
            if harness.kind == "postgres":  # the sealed bytes, checked: not read again to send
                assert spool_damage(store.spool_path("p-000001"), 10**6, 1) is None
            assert store.spool_held("p-000001")

    async def test_a_corrupted_spool_is_refused(self, harness: Harness) -> None:
        async with harness.opened() as store:
            await seal(harness, store, await store.acquire_shard("p"))
            await harness.corrupt_spool("p-000001")
            with pytest.raises(SpoolCorrupt, match="spool of chunk p-000001"):
                await store.fetch_spool("p-000001")

    async def test_a_chunk_without_a_spool_is_refused(self, harness: Harness) -> None:
        async with harness.opened() as store:
            with pytest.raises(SpoolCorrupt, match="spool of chunk p-000404"):
                await store.fetch_spool("p-000404")


@pytest.mark.anyio
class TestLedgerAndLimits:
    async def test_keys_claimed_twice_report_the_duplicate(self, harness: Harness) -> None:
        async with harness.opened() as store:
            shard = await store.acquire_shard("p")
            first = await store.claim_keys(shard, "p-000001",
                                           [("a", {"line": 1}), ("b", {"line": 2})])
            assert first.duplicates == {} and first.replays == set()
            await seal(harness, store, shard, "p-000001")
            later = await store.claim_keys(shard, "p-000002",
                                           [("a", {"line": 7}), ("b", {"line": 2}),
                                            ("c", {"line": 8})])
            assert later.duplicates == {"a": "p-000001"}  # in the source twice
            assert later.replays == {"b"}  # the same record read again
            assert await store.release_keys("p", ["a", "zzz"]) == 1
            assert (await store.claim_keys(shard, "p-000003", [("a", {"line": 9})])).duplicates \
                == {}

    async def test_a_reservation_beyond_the_limit_is_refused(self, harness: Harness) -> None:
        async with harness.opened() as store:
            shard = await store.acquire_shard("p")
            assert await store.reserve([BUDGET], 0.6, "p-000001")
            await seal(harness, store, shard, "p-000001")  # now in flight: 0.6 of 1.0
            assert await store.reserve([BUDGET], 0.6, "p-000001")  # its own, counted once
            assert not await store.reserve([BUDGET], 0.6, "p-000002")
            assert await store.reserve([BUDGET], 0.3, "p-000002")
            with pytest.raises(LimitUndefined, match="budget:elsewhere"):
                await store.reserve([BUDGET, "budget:elsewhere"], 0.1, "p-000003")


# -- LocalStore only: today's files ---------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("name", ["release-0.1-demo", "release-0.1-paused"])
async def test_a_release_state_dir_opens_unchanged(tmp_path: Path, name: str) -> None:
    """A state dir written by release 0.1 opens as it is, and reads as its replay."""
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    log = state_dir / "manifest.jsonl"
    shutil.copy(DATA / f"{name}.jsonl", log)
    bound = json.loads(log.read_bytes().split(b" ", 1)[1].split(b"\n", 1)[0])["ledger"]
    ledger = KeyLedger(state_dir / LEDGER_NAME)
    ledger.set_id(bound)
    ledger.close()
    before = log.read_bytes()
    replayed, _ = replay(log)
    async with LocalStore(state_dir) as store:
        assert comparable(await store.snapshot()) == comparable(replayed)
        for pipeline in replayed.pipelines:
            assert [c.chunk for c in await store.chunks(pipeline)] == [
                c.chunk for c in replayed.chunks.values() if c.pipeline == pipeline]
    assert log.read_bytes() == before


@pytest.mark.anyio
async def test_a_spool_kept_before_checksums_is_taken_as_it_is(tmp_path: Path) -> None:
    """No ``.sha256`` beside it (an older release's spool): nothing to check, nothing refused."""
    async with LocalStore(tmp_path / "state") as store:
        store.spool_path("p-000001").write_bytes(b"line\n")
        assert (await store.fetch_spool("p-000001")).raw_bytes == 5


def test_the_local_store_needs_no_postgres_driver(tmp_path: Path) -> None:
    """An install without the postgres extra can use LocalStore (asyncpg never imported)."""
    site = tmp_path / "without"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import sys\nsys.modules['asyncpg'] = None\n")
    code = "import batchd.daemon.store.local, batchd.daemon.store.contract; print('ok')"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(site), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.stdout.strip() == "ok", proc.stderr


def _whole_life_records() -> list[Any]:
    retry = ChunkSealed.retry(pipeline="p", parent="p-000001", parent_attempt=1,
                              chunk="p-000001-r1", requests=1, bytes=100)
    return [
        sealed(), SubmitIntent(chunk="p-000001", at=1000.5, requests=3),
        Submitted(chunk="p-000001", batch_id="msgbatch_1", created_at="t"),
        Ended(chunk="p-000001", batch_id="msgbatch_1", counts={"succeeded": 2, "errored": 1}),
        committed("p-000001", "msgbatch_1", retry), committed("p-000001-r1", None),
        SourceCommitted(pipeline="p", position={"line": 3}, source_seq=3),
        ChunkRetired(chunk="p-000001"), ChunkRetired(chunk="p-000001-r1"),
        PipelinePaused(pipeline="p", reason="sink down"), PipelineResumed(pipeline="p"),
        AlarmRaised(pipeline="p", chunk=None, alarm_kind="sink_failed", message="sink down"),
    ]



# -- PgStore only: several workers on one store ------------------------------------------


@pytest.fixture
def pg(pg_dsn: str, pg_schema: str, tmp_path: Path) -> Harness:
    return pg_harness(pg_dsn, pg_schema, tmp_path)


@pytest.mark.anyio
async def test_a_second_worker_is_fenced_then_takes_over_after_ttl_and_grace(pg: Harness) -> None:
    """
    B cannot record for A's chunk while A's lease holds, and takes it over only once A
    has been silent for its TTL plus B's grace; A's late records are then fenced.
    """
    ttl, grace = 2.0, 1.0
    silent_since = time.monotonic()  # A's last heartbeat is the one at its open, after this
    async with pg.opened(name="a", ttl=ttl) as a, pg.opened(name="b", grace=grace) as b:
        lease = await seal(pg, a, await a.acquire_shard("p"))
        forged = ChunkLease(lease.chunk, b.worker_id, lease.epoch)
        refused = await b.append(SubmitIntent(chunk=lease.chunk, at=5.5, requests=3),
                                 lease=forged, expected=Stage.SEALED)
        assert refused.noop and refused.fenced is not None and a.worker_id in refused.fenced
        assert await b.claim_chunks("p", 10) == []
        assert (await b.chunk(lease.chunk)).stage is Stage.SEALED
        claimed: list[Claimed] = []
        while not claimed:
            assert time.monotonic() - silent_since < 10, "no takeover within 10 s"
            await anyio.sleep(0.1)
            claimed = await b.claim_chunks("p", 10)
        assert time.monotonic() - silent_since >= ttl + grace - 0.05  # not before its time
        (taken,) = claimed
        assert taken.lease == ChunkLease(lease.chunk, b.worker_id, lease.epoch + 1)
        assert (taken.stage, taken.previous_owner) == ("sealed", a.worker_id)
        assert (await b.append(SubmitIntent(chunk=lease.chunk, at=6.5, requests=3),
                               lease=taken.lease, expected=Stage.SEALED)).written
        # A wakes up: its records are fenced, and its heartbeat says what it lost.
        late = await a.append(SubmitIntent(chunk=lease.chunk, at=7.5, requests=3),
                              lease=lease, expected=(Stage.SEALED, Stage.INTENT))
        assert late.noop and late.fenced is not None and b.worker_id in late.fenced
        beat = await a.heartbeat()
        assert beat.lost_chunks({lease.chunk: lease.epoch}) == {lease.chunk}
        chunk = await b.chunk(lease.chunk)
        assert chunk is not None and (chunk.intent_at, chunk.intent_count) == (6.5, 1)


@pytest.mark.anyio
async def test_a_spool_file_an_earlier_process_left_is_not_held(pg: Harness) -> None:
    """Only what this store kept or fetched is held; a file left in spool_dir is fetched."""
    async with pg.opened(name="a") as a:
        shard = await a.acquire_shard("p")
        assert shard is not None
        digest = await a.put_spool("p-000001", shard.epoch, pg.spool_file("p-000001"))
        await a.append(sealed("p-000001"), lease=shard, spool=digest)
        assert a.spool_held("p-000001")
    async with pg.opened(name="a") as again:  # a new incarnation on the same spool dir
        assert again.spool_path("p-000001").exists()
        assert not again.spool_held("p-000001")
        await again.fetch_spool("p-000001")
        assert again.spool_held("p-000001")


@pytest.mark.anyio
async def test_a_lost_shard_seals_nothing(pg: Harness) -> None:
    """A reader whose shard was forced away is fenced at the seal and claims no keys."""
    async with pg.opened(name="a") as a, pg.opened(name="b") as b:
        old = await a.acquire_shard("p")
        assert await b.acquire_shard("p") is None  # A reads it
        new = await b.acquire_shard("p", force=True)
        assert new is not None and new.epoch == old.epoch + 1
        digest = await a.put_spool("p-000001", old.epoch, pg.spool_file("p-000001"))
        late = await a.append(sealed("p-000001"), lease=old, spool=digest)
        assert late.noop and late.fenced is not None
        assert await b.chunk("p-000001") is None
        with pytest.raises(FencedOut):
            await a.claim_keys(old, "p-000002", [("k", None)])


@pytest.mark.anyio
async def test_records_the_cluster_log_cannot_keep_are_refused(pg: Harness) -> None:
    async with pg.opened() as store:
        with pytest.raises(ValueError, match="batch_disowned records have no place"):
            await store.append(BatchDisowned(batch_id="msgbatch_x", reason="not ours"))
        with pytest.raises(ValueError, match="id_scheme records have no place"):
            await store.append(IdScheme(pipeline="p", fingerprint="f", template="t-{id}"))
        with pytest.raises(ValueError, match="chunk_sealed of p-000001 needs its spool"):
            await store.append(sealed(), lease=await store.acquire_shard("p"))
