"""
Create stays at most once per chunk (issue 15, item 3), against the real PostgreSQL and
the emulator over HTTP.

End to end, with real ``batchd run`` workers: a worker SIGKILLs itself right after its
create (``BATCHD_CRASH_AT=after_create``) or right after its intent (``after_intent``);
the survivor, which takes the create slot and the chunk after the TTL and grace,
adopts the batch that exists (never sending again), or sends again only after two
empty lists 15 s apart on the API's clock (the emulator's virtual clock is moved, so no
test sleeps 15 s), or refuses a batch of the right size whose custom_ids are not the
chunk's before anything reaches a sink. In process: the stray sweeper cancels and
alarms a late batch of a resent chunk, and leaves alone a batch a chunk records or may
still adopt; the collector refuses an unknown custom_id before the group holding it is
written.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from batchd.daemon.cluster import create_slot
from batchd.daemon.cluster.stray_sweeper import (
    LATE,
    LEASE_SHARD,
    IntentWindow,
    Listed,
    StraySweeper,
    Windows,
    find_strays,
    lease_pipeline,
)
from batchd.daemon.config import ApiConfig, PipelineConfig, load_config
from batchd.daemon.emulator import EmulatorThread
from batchd.daemon.results.collector import Collector, WrongAdoption
from batchd.daemon.store.postgres import PgStore
from tests.fixtures.cluster import ClusterEnv
from tests.fixtures.cluster_workers import Cluster, _query, wait_for
from tests.fixtures.emulator import message_requests, sdk_client
from tests.fixtures.engine import csv_keys

ROWS = 50  # one chunk (max_requests 50)


def start(cluster: Cluster, i: int, crash_at: str | None = None) -> subprocess.Popen[bytes]:
    """Worker *i*, optionally SIGKILLing itself at *crash_at* (``crash_point``)."""
    return cluster.start(i, env={"BATCHD_CRASH_AT": crash_at} if crash_at else None)


def crashed(cluster: Cluster, i: int) -> None:
    proc = cluster.procs[i]
    assert proc is not None
    code = proc.wait(timeout=30)
    assert code == -9, f"worker {i} exited {code}, not at its crash point\n{cluster.logs()}"


def log_of(cluster: Cluster, i: int) -> str:
    return (cluster.workers[i].root / "run.log").read_text()


def alarms(cluster: Cluster) -> list[dict[str, Any]]:
    rows = _query(cluster.dsn, f'SELECT record FROM "{cluster.schema}".event '
                               "WHERE kind = 'alarm' ORDER BY seq")
    return [json.loads(r["record"]) for r in rows]


def spool_requests(cluster: Cluster, i: int) -> list[dict[str, Any]]:
    """The requests of the one chunk worker *i* spooled (what its create sent)."""
    [spool] = [p for p in (cluster.workers[i].state_dir / "spool").glob("*.jsonl")]
    return [orjson.loads(line.split(b"\t", 1)[0]) for line in spool.read_bytes().splitlines()]


class TestADeadHoldersIntent:
    def test_its_batch_is_adopted_not_sent_again(
        self, cluster_factory: Any, emulator: EmulatorThread
    ) -> None:
        """Killed between the create and its record: the survivor finds the batch and adopts it."""
        cluster = cluster_factory(rows=ROWS, workers=2)
        start(cluster, 0, crash_at="after_create")
        crashed(cluster, 0)
        assert emulator.stats()["batches_created"] == 1
        assert cluster.batches_submitted() == 0  # the store never heard of it
        start(cluster, 1)
        cluster.wait([1])
        assert "adopted a batch created before a crash" in log_of(cluster, 1)
        assert emulator.stats()["batches_created"] == 1  # not sent again
        cluster.check(emulator)

    def test_a_batch_of_other_custom_ids_is_refused_before_any_sink_write(
        self, cluster_factory: Any, emulator: EmulatorThread
    ) -> None:
        """
        A batch of the chunk's size in its window, but another's requests: adopted (the
        list cannot tell), then refused at collect with nothing written, the chunk held.
        """
        cluster = cluster_factory(rows=ROWS, workers=2)
        start(cluster, 0, crash_at="after_intent")
        crashed(cluster, 0)
        foreign = sdk_client(emulator.base_url).messages.batches.create(
            requests=message_requests(ROWS, prefix="other-"))
        proc = start(cluster, 1)
        assert proc.wait(timeout=40) == 3, log_of(cluster, 1)[-3000:]  # held: reported
        assert cluster.submitted_batches() == {foreign.id}
        [alarm] = [a for a in alarms(cluster) if a["alarm_kind"] == "wrong_adoption"]
        assert foreign.id in alarm["message"] and "other-" in alarm["message"]
        out = cluster.workers[1].outputs()
        assert not out.result_keys and not out.jsonl_keys and not out.dead
        assert emulator.stats()["batches_created"] == 1  # nothing else sent either


class TestADeadHoldersIntentWithoutABatch:
    @pytest.fixture
    def emulator(self, emulator_factory: Any) -> EmulatorThread:
        """Batches take 8 s (API time): the survivor's sweeper passes while its batch runs."""
        return emulator_factory(latency=8.0)

    def test_it_is_sent_again_after_two_lists_15s_apart_and_a_late_batch_is_cancelled(
        self, cluster_factory: Any, emulator: EmulatorThread
    ) -> None:
        """
        Killed between the intent and the create: one empty list is not enough (the API's
        list may lag a create); the survivor lists again until 15 s of API time have passed,
        then sends. The dead worker's create, landing after that (its bytes were still in
        flight), is a stray: the survivor's sweeper cancels and alarms it, and the chunk's
        results come from the batch it records only.
        """
        cluster = cluster_factory(rows=ROWS, workers=2)
        start(cluster, 0, crash_at="after_intent")
        crashed(cluster, 0)
        requests = spool_requests(cluster, 0)
        start(cluster, 1)
        wait_for("the survivor's first empty list",
                 lambda: "no batch found for the earlier create yet" in log_of(cluster, 1),
                 timeout=30)
        time.sleep(2.0)  # about ten more lists (poll 0.2 s): still nothing sent
        assert emulator.stats()["batches_created"] == 0, log_of(cluster, 1)[-3000:]
        assert "submitting again" not in log_of(cluster, 1)
        emulator.advance_clock(16.0)  # the API's clock: past the 15 s between the lists
        wait_for("the resend recorded", lambda: cluster.batches_submitted() == 1, timeout=20)
        assert "in two lists 15s apart; submitting again" in log_of(cluster, 1)
        [recorded] = cluster.submitted_batches()
        sdk = sdk_client(emulator.base_url)
        late = sdk.messages.batches.create(requests=requests)  # the dead worker's bytes, late
        cluster.wait([1])
        stray = sdk.messages.batches.retrieve(late.id)
        assert stray.cancel_initiated_at is not None and stray.request_counts.canceled > 0
        [alarm] = [a for a in alarms(cluster) if a["alarm_kind"] == "stray_batch"]
        [chunk] = [c for c in (r["chunk"] for r in _query(
            cluster.dsn, f'SELECT chunk FROM "{cluster.schema}".chunk'))]
        assert late.id in alarm["message"] and alarm["chunk"] == chunk
        assert emulator.stats()["batches_created"] == 2
        rows = [json.loads(line) for part in sorted(cluster.workers[1].jsonl_dir.glob("*.jsonl"))
                for line in part.read_text().splitlines()]
        assert len(rows) == ROWS and {r["batch_id"] for r in rows} == {recorded}
        assert sorted(r["key"] for r in rows) == sorted(csv_keys(cluster.input))


# -- the stray sweeper, in process -----------------------------------------------------


async def _resent_chunk(cluster: ClusterEnv, worker: str, n: int, requests: int,
                        batch_id: str | None) -> str:
    """Chunk *n*, announced twice (its first create's outcome unknown), then *batch_id* recorded."""
    shard = await cluster.shard(worker)
    chunk = f"p-{n:06d}"
    (lease,) = (await cluster.seal(shard, chunk, requests=requests, first_seq=10 * n + 1,
                                   last_seq=10 * n + 9)).created
    for _ in range(2):
        slot = await create_slot.take(cluster.conn, cluster.sql, "ws", worker, grace=5.0)
        assert slot is not None
        assert await create_slot.record_intent(cluster.conn, cluster.sql, slot, lease, requests)
        await create_slot.release(cluster.conn, cluster.sql, slot)
    if batch_id is not None:
        await create_slot.record_submitted(cluster.conn, cluster.sql, slot, lease, batch_id,
                                           "2026-01-01T00:00:00Z")
    return chunk


class _Api:
    """The worker's API client on the emulator (list, Date header, cancel)."""

    def __new__(cls, base_url: str) -> Any:
        from batchd.daemon.batches.api import BatchesApi

        return BatchesApi(ApiConfig(base_url=base_url, max_retries=0), "test")


@pytest.mark.anyio
class TestStraySweeper:
    @pytest.fixture
    def slow_emulator(self, emulator_factory: Any) -> EmulatorThread:
        """Batches stay in progress for a minute, so a cancel has something to cancel."""
        return emulator_factory(latency=60.0)

    async def test_a_late_batch_of_a_resent_chunk_is_cancelled_and_alarmed(
        self, cluster: ClusterEnv, slow_emulator: EmulatorThread, tmp_path: Path
    ) -> None:
        sdk = sdk_client(slow_emulator.base_url)
        sweeper_store = PgStore(cluster.dsn, spool_dir=tmp_path / "s", schema=cluster.sql.schema,
                                lease_ttl=30.0)
        async with sweeper_store:
            me = await cluster.worker("holder")
            # Chunk c1 was sent twice: its second batch is recorded; its first create's
            # bytes landed late (the stray). Chunk c2, still at intent, may yet adopt a
            # batch of its size; chunk c3 records its batch and was never resent.
            recorded = sdk.messages.batches.create(requests=message_requests(3, prefix="a"))
            await _resent_chunk(cluster, me, 1, 3, recorded.id)
            stray = sdk.messages.batches.create(requests=message_requests(3, prefix="a"))
            await _resent_chunk(cluster, me, 2, 4, None)
            adoptable = sdk.messages.batches.create(requests=message_requests(4, prefix="b"))
            api = _Api(slow_emulator.base_url)
            try:
                told: list[tuple[str, str]] = []
                sweeper = StraySweeper(sweeper_store, api, "ws", interval=1.0,
                                       on_alarm=lambda pipeline, kind: told.append((pipeline,
                                                                                    kind)))
                sweeper.lease = await sweeper_store.acquire_shard(lease_pipeline("ws"),
                                                                  LEASE_SHARD)
                assert sweeper.lease is not None
                handled = await sweeper.sweep_once()
                assert [(s.batch_id, s.chunk) for s in handled] == [(stray.id, "p-000001")]
                assert sdk.messages.batches.retrieve(stray.id).processing_status == "canceling"
                for kept in (recorded, adoptable):
                    assert sdk.messages.batches.retrieve(kept.id).processing_status == (
                        "in_progress")
                [alarm] = await cluster.conn.fetch(cluster.sql(
                    "SELECT pipeline, chunk, record FROM {s}.event WHERE kind = 'alarm'"))
                record = json.loads(alarm["record"])
                assert (alarm["pipeline"], alarm["chunk"], record["alarm_kind"]) == (
                    "p", "p-000001", "stray_batch")
                assert stray.id in record["message"] and told == [("p", "stray_batch")]
                assert await sweeper.sweep_once() == []  # alarmed once, not again
                # Once c2's intent is settled by a resend of its own, the batch it did not
                # adopt is a stray too.
                await cluster.conn.execute(cluster.sql(
                    "UPDATE {s}.chunk SET stage = 'submitted', batch_id = 'msgbatch_x'"
                    " WHERE chunk = 'p-000002'"))
                assert [s.batch_id for s in await sweeper.sweep_once()] == [adoptable.id]
            finally:
                await api.aclose()

    async def test_one_worker_sweeps_a_workspace(
        self, cluster: ClusterEnv, tmp_path: Path
    ) -> None:
        """The sweeper lease is the shard machinery's: one live holder, taken from a dead one."""
        stores = [PgStore(cluster.dsn, spool_dir=tmp_path / f"s{i}", schema=cluster.sql.schema,
                          lease_ttl=30.0, takeover_grace=1.0) for i in range(2)]
        async with stores[0], stores[1]:
            first = await stores[0].acquire_shard(lease_pipeline("ws"), LEASE_SHARD)
            assert first is not None
            assert await stores[1].acquire_shard(lease_pipeline("ws"), LEASE_SHARD) is None
            await cluster.silence(stores[0].worker_id)
            second = await stores[1].acquire_shard(lease_pipeline("ws"), LEASE_SHARD)
            assert second is not None and second.epoch == first.epoch + 1
            sweeper = StraySweeper(stores[0], None, "ws", interval=1.0)
            sweeper.lease = first
            assert await sweeper.sweep_once() == [] and sweeper.lease is None  # it knows


class TestWhatIsAStray:
    """The pure rule, on the edges of a window (store times at 1000; the API 50 s ahead)."""

    WINDOW = IntentWindow("p-000001", "p", 3, opens=1000.0, closes=1100.0 + LATE, batch_id="b1")

    def strays(self, *listed: Listed, at_intent: tuple[tuple[str, int, float], ...] = (),
               known: frozenset[str] = frozenset({"b1"})) -> list[str]:
        windows = Windows((self.WINDOW,), at_intent, known)
        return [s.batch_id for s in find_strays(list(listed), windows, 50.0)]

    def test_only_an_unrecorded_batch_of_the_size_inside_the_window(self) -> None:
        assert self.strays(
            Listed("b1", 1120.0, 3, "in_progress"),  # the recorded batch
            Listed("early", 1050.0 - 11, 3, "in_progress"),  # before the first intent
            Listed("late", 1150.0 + LATE + 11, 3, "in_progress"),  # past LATE
            Listed("size", 1100.0, 4, "in_progress"),  # another size
            Listed("stray", 1100.0, 3, "ended"),
        ) == ["stray"]

    def test_a_batch_a_chunk_at_intent_may_adopt_is_left_alone(self) -> None:
        batch = Listed("stray", 1200.0, 3, "in_progress")  # 1150 on the store's clock
        assert self.strays(batch, at_intent=(("p-000009", 3, 1155.0),)) == []  # 5 s: margin
        assert self.strays(batch, at_intent=(("p-000009", 3, 1161.0),)) == ["stray"]
        assert self.strays(batch, at_intent=(("p-000009", 4, 1000.0),)) == ["stray"]


# -- the collector's refusal, in process -------------------------------------------------


class _Sink:
    """Records what reaches it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    async def put(self, group: str, rows: list[Any]) -> None:
        self.calls.append(("put", len(rows)))

    async def flush(self, group: str) -> None:
        self.calls.append(("flush", 0))


def _pipeline(tmp_path: Path) -> PipelineConfig:
    (tmp_path / "p.toml").write_text(
        '[[pipeline]]\nname = "tickets"\n[pipeline.source]\ntype = "csv"\npath = "t.csv"\n'
        'key = "id"\n[pipeline.request]\nmodel = "claude-haiku-4-5"\nmax_tokens = 8\n'
        'user = "{body}"\n[[pipeline.sink]]\ntype = "jsonl"\npath = "out"\n')
    return load_config(tmp_path / "p.toml").pipelines[0]


def _spool(path: Path, custom_ids: list[str]) -> Path:
    path.write_bytes(b"".join(
        orjson.dumps({"custom_id": c, "params": {}}) + b"\t"
        + orjson.dumps({"custom_id": c, "key": c}) + b"\n" for c in custom_ids))
    return path


def _succeeded(custom_id: str) -> bytes:
    message = {"model": "claude-haiku-4-5", "content": [{"type": "text", "text": "ok"}],
               "stop_reason": "end_turn", "usage": {"input_tokens": 1, "output_tokens": 1}}
    return orjson.dumps({"custom_id": custom_id,
                         "result": {"type": "succeeded", "message": message}})


@pytest.mark.anyio
class TestCollectRefusesAWrongAdoption:
    async def test_another_batchs_results_write_nothing(
        self, tmp_path: Path, emulator: EmulatorThread
    ) -> None:
        """The results of a real batch of other custom_ids, streamed over HTTP: refused."""
        sdk = sdk_client(emulator.base_url)
        batch = sdk.messages.batches.create(requests=message_requests(5, prefix="other"))
        assert sdk.messages.batches.retrieve(batch.id).processing_status == "ended"
        api = _Api(emulator.base_url)
        sink, dead = _Sink(), _Sink()
        collector = Collector(_pipeline(tmp_path), [sink], dead, lambda model, usage: 0.0)
        try:
            with pytest.raises(WrongAdoption, match=f"batch {batch.id}'s results hold"):
                await collector.collect(
                    chunk="c1", root="c1", batch_id=batch.id,
                    spool=_spool(tmp_path / "c1.jsonl", [f"r{i}" for i in range(5)]),
                    blocks=lambda: api.result_blocks(batch.id), refuse_unknown=True)
        finally:
            await api.aclose()
        assert sink.calls == [] and dead.calls == []

    async def test_no_group_from_the_first_unknown_custom_id_on_is_written(
        self, tmp_path: Path
    ) -> None:
        """2,000 known results go out as a group; the group holding an unknown one never does."""
        ids = [f"r{i}" for i in range(2500)]
        lines = [_succeeded(c) for c in ids[:2100]] + [_succeeded("stranger")]

        async def blocks() -> Any:
            for start in range(0, len(lines), 300):
                yield lines[start:start + 300]

        sink, dead = _Sink(), _Sink()
        collector = Collector(_pipeline(tmp_path), [sink], dead, lambda model, usage: 0.0)
        with pytest.raises(WrongAdoption, match="'stranger'"):
            await collector.collect(chunk="c1", root="c1", batch_id="b",
                                    spool=_spool(tmp_path / "c1.jsonl", ids), blocks=blocks,
                                    refuse_unknown=True)
        assert sum(n for kind, n in sink.calls if kind == "put") <= 2100, sink.calls
        assert ("flush", 0) not in sink.calls and dead.calls == []

