"""
The cluster worker's local view (``daemon/store/mirror.py``): kept by replaying the
event log after the last seq it saw, not by reading every row again, and still equal
to the rows, including a seq that commits after a later one (another pipeline's
transaction still open) and one that never commits (rolled back).
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from batchd.daemon.cluster import fencing
from batchd.daemon.cluster.schema import Sql
from batchd.daemon.store.mirror import MirroredStore
from batchd.daemon.wal.manifest_state import ManifestState, Stage
from batchd.daemon.wal.records import (
    AlarmRaised,
    ChunkRetired,
    ChunkSealed,
    Ended,
    Figures,
    ResultsCommitted,
    SourceCommitted,
    SubmitIntent,
    Submitted,
)
from tests.fixtures.store import Harness, pg_harness

pytestmark = pytest.mark.anyio


@pytest.fixture
def pg(pg_dsn: str, pg_schema: str, tmp_path: Path) -> Harness:
    return pg_harness(pg_dsn, pg_schema, tmp_path)


def comparable(state: ManifestState) -> dict[str, Any]:
    return {
        "chunks": {c: asdict(s) for c, s in state.chunks.items()},
        "pipelines": {p: asdict(s) for p, s in state.pipelines.items()},
        "live_batches": state.live_batches,
        "retired_batches": state.retired_batches,
        "retired_chunks": state.retired_chunks,
        "alarms": sorted((a.seq, a.kind, a.message) for a in state.alarms),
        "seq": state.seq,
    }


def sealed(chunk: str, pipeline: str = "p", line: int = 3) -> ChunkSealed:
    return ChunkSealed(pipeline=pipeline, chunk=chunk, attempt=1, requests=3, bytes=300,
                       rejects=0, first_seq=line - 2, last_seq=line, position={"line": line},
                       parent=None)


async def alarm_in_open_transaction(conn: Any, schema: str, message: str) -> None:
    """An alarm whose seq is taken now, in a transaction the caller commits or rolls back."""
    await fencing.record_pipeline_event(
        conn, Sql(schema), "alarm",
        {"pipeline": "q", "chunk": None, "alarm_kind": "test", "message": message})


async def test_the_view_follows_another_workers_chunk_life_without_reading_it_all(
    pg: Harness,
) -> None:
    """After the first full read, every refresh reads only the events it has not seen."""
    async with pg.opened(name="writer") as writer, pg.opened(name="reader") as inner:
        view = MirroredStore(inner)
        await view.refresh()
        assert view.full_reads == 1
        shard = await writer.acquire_shard("p")
        chunks = []
        for n in (1, 2):
            chunk = f"p-00000{n}"
            digest = await writer.put_spool(chunk, shard.epoch, pg.spool_file(chunk))
            applied = await writer.append(sealed(chunk, line=3 * n), lease=shard, spool=digest)
            chunks.append(applied.created[0])
        steps: list[tuple[Any, Stage]] = []
        for lease in chunks:
            batch = f"msgbatch_{lease.chunk}"
            steps += [
                (SubmitIntent(chunk=lease.chunk, at=1000.5, requests=3), Stage.SEALED),
                (Submitted(chunk=lease.chunk, batch_id=batch, created_at="t"), Stage.INTENT),
                (Ended(chunk=lease.chunk, batch_id=batch, counts={"succeeded": 3}),
                 Stage.SUBMITTED),
                (ResultsCommitted(chunk=lease.chunk, batch_id=batch, figures=Figures(
                    succeeded=3, dead=0, retried=0, cost_usd=0.01, input_tokens=30,
                    output_tokens=3), retry_chunk=None), Stage.ENDED),
            ]
        leases = {lease.chunk: lease for lease in chunks}
        for record, expected in steps:
            await writer.append(record, lease=leases[record.chunk], expected=expected)
            await view.refresh()
            assert comparable(view.state) == comparable(await writer.snapshot())
        await writer.append(SourceCommitted(pipeline="p", position={"line": 6}, source_seq=6),
                            lease=shard)
        for lease in chunks:
            await writer.append(ChunkRetired(chunk=lease.chunk), lease=shard)
        await view.refresh()
        assert comparable(view.state) == comparable(await writer.snapshot())
        assert view.state.pipelines["p"].succeeded == 6
        assert view.full_reads == 1


async def test_a_full_read_keeps_no_more_retired_chunks_than_replay(
    pg: Harness, pg_dsn: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """
    Retired rows stay for ever; the view keeps the last RETIRED_KEPT, as replay does (here
    2 of 3), so a full read does not grow with the history and the log replays to the rows.
    """
    from batchd.daemon.cluster import event_log
    from batchd.daemon.wal import manifest_state

    monkeypatch.setattr(manifest_state, "RETIRED_KEPT", 2)
    monkeypatch.setattr(event_log, "RETIRED_KEPT", 2)
    async with pg.opened(name="writer") as writer:
        shard = await writer.acquire_shard("p")
        for n in (1, 2, 3):
            chunk = f"p-00000{n}"
            digest = await writer.put_spool(chunk, shard.epoch, pg.spool_file(chunk))
            (lease,) = (await writer.append(sealed(chunk, line=3 * n), lease=shard,
                                            spool=digest)).created
            batch = f"msgbatch_{n}"
            for record, expected in (
                (SubmitIntent(chunk=chunk, at=1000.5, requests=3), Stage.SEALED),
                (Submitted(chunk=chunk, batch_id=batch, created_at="t"), Stage.INTENT),
                (Ended(chunk=chunk, batch_id=batch, counts={"succeeded": 3}), Stage.SUBMITTED),
                (ResultsCommitted(chunk=chunk, batch_id=batch, figures=Figures(
                    succeeded=3, dead=0, retried=0, cost_usd=0.01, input_tokens=30,
                    output_tokens=3), retry_chunk=None), Stage.ENDED),
            ):
                await writer.append(record, lease=lease, expected=expected)
            await writer.append(SourceCommitted(pipeline="p", position={"line": 3 * n},
                                                source_seq=3 * n), lease=shard)
            await writer.append(ChunkRetired(chunk=chunk), lease=shard)
        state = await writer.snapshot()
        assert list(state.retired_chunks) == ["p-000002", "p-000003"]
        assert list(state.retired_batches) == ["msgbatch_2", "msgbatch_3"]
        conn = await asyncpg.connect(pg_dsn)
        try:
            assert await event_log.drift(conn, writer.sql) == []
        finally:
            await conn.close()


async def test_own_writes_are_applied_from_what_the_store_returned(pg: Harness) -> None:
    """A worker's own record is in its view as soon as append returns, no full read."""
    async with pg.opened(name="a") as inner:
        view = MirroredStore(inner)
        await view.refresh()
        shard = await view.acquire_shard("p")
        digest = await view.put_spool("p-000001", shard.epoch, pg.spool_file("p-000001"))
        applied = await view.append(sealed("p-000001"), lease=shard, spool=digest)
        (lease,) = applied.created
        assert view.state.chunks["p-000001"].stage is Stage.SEALED
        await view.append(SubmitIntent(chunk=lease.chunk, at=1000.5, requests=3), lease=lease,
                          expected=Stage.SEALED)
        assert view.state.chunks["p-000001"].stage is Stage.INTENT
        assert comparable(view.state) == comparable(await inner.snapshot())
        assert view.full_reads == 1


async def test_a_seq_committed_after_a_later_one_is_not_lost(pg: Harness, pg_dsn: str,
                                                      pg_schema: str) -> None:
    """
    Seq n+1 visible while n's transaction is still open: the view asks for n again
    and applies it once it commits. (Reading only ``seq > last`` would lose it.)
    """
    async with pg.opened(name="a") as inner:
        view = MirroredStore(inner)
        await view.refresh()
        other = await asyncpg.connect(pg_dsn)
        try:
            tx = other.transaction()
            await tx.start()
            await alarm_in_open_transaction(other, pg_schema, "early seq, late commit")
            await view.append(AlarmRaised(pipeline="p", chunk=None, alarm_kind="test",
                                          message="late seq, early commit"))
            await view.refresh()
            assert [a.message for a in view.state.alarms] == ["late seq, early commit"]
            assert len(view.missing) == 1
            await tx.commit()
        finally:
            await other.close()
        await view.refresh()
        assert sorted(a.message for a in view.state.alarms) == [
            "early seq, late commit", "late seq, early commit"]
        assert view.missing == []
        assert comparable(view.state) == comparable(await inner.snapshot())
        assert view.full_reads == 1


async def test_a_seq_rolled_back_is_given_up_after_the_horizon(pg: Harness, pg_dsn: str,
                                                      pg_schema: str) -> None:
    """A burnt seq is asked for until the horizon, then the view is read in full once."""
    async with pg.opened(name="a") as inner:
        view = MirroredStore(inner, gap_horizon=0.3)
        await view.refresh()
        other = await asyncpg.connect(pg_dsn)
        try:
            tx = other.transaction()
            await tx.start()
            await alarm_in_open_transaction(other, pg_schema, "rolled back")
            await view.append(AlarmRaised(pipeline="p", chunk=None, alarm_kind="test",
                                          message="kept"))
            await tx.rollback()
        finally:
            await other.close()
        await view.refresh()
        assert len(view.missing) == 1
        await asyncio.sleep(0.4)
        await view.refresh()
        assert view.missing == [] and view.full_reads == 2
        await asyncio.sleep(0.4)
        await view.refresh()  # the burnt seq is not asked for again
        assert view.full_reads == 2
        assert [a.message for a in view.state.alarms] == ["kept"]
