"""
The runtime's state machine in-process: a ChunkDriver, the Poller and a Collector
built directly (as the runner wires them) against the in-process emulator, with a
real manifest, key ledger, spool files and sinks in a tmp dir.

These reach paths that otherwise only a ``batchd run`` subprocess reaches: a chunk
from seal to retirement, an expired batch cut into a retry chunk, a 429 at create,
the poller reading many batches with one list call, a batch the API forgot, a
typed billing pause, a chunk held because nothing is left to rebuild its spool from.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest

from batchd.daemon.batches.api import BatchesApi
from batchd.daemon.batches.chunk_driver import ChunkDriver
from batchd.daemon.batches.outcomes import Committed, Held, RateLimited, Retired
from batchd.daemon.config import load_config
from batchd.daemon.emulator import EmulatorThread
from batchd.daemon.factories import build_sink, build_source
from batchd.daemon.intake.ledger_binding import open_bound_ledger
from batchd.daemon.intake.packer import request_line
from batchd.daemon.intake.spool import SpoolWriter
from batchd.daemon.models.budget import Budget
from batchd.daemon.models.preflight import catalog_for
from batchd.daemon.models.pricing import PriceTable
from batchd.daemon.ops.telemetry import Telemetry
from batchd.daemon.pipeline import PipelineRunner
from batchd.daemon.wal.chunk_ids import fresh_id, root_of
from batchd.daemon.wal.manifest import Manifest
from batchd.daemon.wal.manifest_state import Stage
from batchd.daemon.wal.records import ChunkSealed
from tests.fixtures.emulator import sdk_client
from tests.fixtures.engine import Workspace


@dataclass
class Engine:
    """One pipeline's runtime pieces, wired as the supervisor wires them."""

    runner: PipelineRunner
    manifest: Manifest
    workspace: Workspace
    sealed: int = 0

    def seal(self, rows: int) -> str:
        """Write a sealed spool of *rows* requests (keys k<n>), not yet in the manifest."""
        number = self.sealed
        self.sealed += 1
        chunk = fresh_id(self.runner.pipeline.name, number)
        writer = SpoolWriter(self.runner.spool_path(chunk))
        for row in range(rows):
            key = f"k{number}-{row}"
            body = orjson.dumps({"model": "claude-haiku-4-5", "max_tokens": 8,
                                 "messages": [{"role": "user", "content": f"ticket {key}"}]})
            writer.add_request(request_line(f"c-{key}", body),
                               {"custom_id": f"c-{key}", "key": key, "attempt": 1})
        writer.seal()
        self._writer = writer
        return chunk

    async def record_seal(self, chunk: str, first_seq: int) -> None:
        writer = self._writer
        await self.manifest.append(ChunkSealed(
            pipeline=self.runner.pipeline.name, chunk=chunk, attempt=1,
            requests=writer.requests, bytes=writer.body_bytes, rejects=0,
            first_seq=first_seq, last_seq=first_seq + writer.requests - 1, position=None,
            parent=None,
        ))

    async def sealed_chunk(self, rows: int) -> str:
        chunk = self.seal(rows)
        await self.record_seal(chunk, 1 + sum(c.requests for c in self.runner.live_chunks()))
        return chunk

    def driver(self, chunk: str) -> ChunkDriver:
        return ChunkDriver(self.runner.deps, self.runner, chunk)


@asynccontextmanager
async def engine(
    ws: Workspace, base_url: str, api: dict[str, Any] | None = None, **config: Any
) -> AsyncIterator[Engine]:
    ws.write_tickets(3)
    api = {"base_url": base_url, "max_retries": 0, **(api or {})}
    path = ws.write_config(api=api, allowed=None, **config)
    conf = load_config(path)
    pipeline = conf.pipelines[0]
    (conf.state_dir / "spool").mkdir(parents=True)
    async with AsyncExitStack() as stack:
        manifest = await Manifest.open(conf.state_dir)
        stack.push_async_callback(manifest.aclose)
        ledger = await open_bound_ledger(conf.state_dir, manifest)
        stack.callback(ledger.close)
        api = BatchesApi(conf.api, "test-key")
        stack.push_async_callback(api.aclose)
        sinks = [build_sink(conf, pipeline.name, spec)
                 for spec in [*pipeline.sinks, pipeline.dead_letter]]
        for sink in sinks:
            await sink.open()
            stack.push_async_callback(sink.aclose)
        prices = PriceTable(conf.prices, catalog=catalog_for(conf), source=str(conf.path))
        runner = PipelineRunner(
            pipeline, manifest=manifest, api=api, api_config=conf.api, ledger=ledger,
            spool_dir=conf.state_dir / "spool", create_lock=anyio.Lock(),
            source=build_source(conf, pipeline.name, pipeline.source), sinks=sinks[:-1],
            dead_letter=sinks[-1], cost=prices.cost_function(lambda model: None),
            budget=Budget(pipeline, prices), telemetry=Telemetry(None, pipeline.name),
        )
        yield Engine(runner, manifest, ws)


async def _run_with_poller(eng: Engine, run: Callable[[], Any]) -> Any:
    """Run one driver step to its outcome while the pipeline's poller polls."""
    result: list[Any] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(eng.runner.poller.run)
        with anyio.fail_after(30):
            result.append(await run())
        tg.cancel_scope.cancel()
    return result[0]


@pytest.mark.anyio
async def test_a_chunk_goes_from_seal_to_retirement(
    tmp_path: Path, emulator: EmulatorThread, workspace: Callable[..., Workspace]
) -> None:
    """Create, poll, collect: run() says committed; the runner's advance then retires it."""
    async with engine(workspace(emulator.base_url), emulator.base_url) as eng:
        chunk = await eng.sealed_chunk(5)
        outcome = await _run_with_poller(eng, eng.driver(chunk).run)
        assert isinstance(outcome, Committed)
        assert outcome.retry_chunk is None and outcome.summary is not None
        assert (outcome.summary.succeeded, outcome.summary.dead) == (5, 0)
        state = eng.manifest.state.chunks[chunk]
        assert state.stage is Stage.COMMITTED and state.succeeded == 5
        assert state.batch_id is not None and state.counts is not None
        assert state.counts["succeeded"] == 5

        await eng.runner.advance()
        assert chunk not in eng.manifest.state.chunks
        assert chunk in eng.manifest.state.retired_chunks
        assert not eng.runner.spool_path(chunk).exists()
        assert eng.manifest.state.pipelines["tickets"].committed_seq == 5
        assert eng.workspace.outputs().result_keys == {f"k0-{n}" for n in range(5)}

        again = await eng.driver(chunk).run()  # a driver of a retired chunk has nothing to do
        assert again == Retired(chunk)


@pytest.mark.anyio
async def test_an_expired_batch_comes_back_as_a_retry_chunk(
    tmp_path: Path, emulator: EmulatorThread, workspace: Callable[..., Workspace]
) -> None:
    """Every request expired: run() hands the runner a retry chunk, sealed one attempt on."""
    emulator.set_faults(expired=1.0)
    async with engine(workspace(emulator.base_url), emulator.base_url) as eng:
        chunk = await eng.sealed_chunk(4)
        outcome = await _run_with_poller(eng, eng.driver(chunk).run)
        assert isinstance(outcome, Committed)
        assert outcome.retry_chunk == f"{chunk}-r1"
        assert outcome.summary is not None and outcome.summary.retried == 4
        retry = eng.manifest.state.chunks[f"{chunk}-r1"]
        assert (retry.stage, retry.attempt, retry.parent, retry.requests) == (
            Stage.SEALED, 2, chunk, 4)
        assert root_of("tickets", retry.chunk) == chunk
        assert eng.runner.spool_path(retry.chunk).exists()

        emulator.set_faults(expired=0.0)
        second = await _run_with_poller(eng, eng.driver(retry.chunk).run)
        assert isinstance(second, Committed) and second.retry_chunk is None
        assert second.summary is not None and second.summary.succeeded == 4
        await eng.runner.advance()  # the family is done: both retire, the source commits
        assert not eng.manifest.state.chunks


@pytest.mark.anyio
async def test_a_429_at_create_is_a_rate_limited_outcome(
    tmp_path: Path, emulator: EmulatorThread, workspace: Callable[..., Workspace]
) -> None:
    """The driver waits the retry-after and reports it; driven again it gets through."""
    emulator.set_faults(http429=1.0, retry_after=0.05, http_fault_on="create")
    async with engine(workspace(emulator.base_url), emulator.base_url) as eng:
        chunk = await eng.sealed_chunk(3)
        driver = eng.driver(chunk)
        outcome = await _run_with_poller(eng, driver.run)
        assert isinstance(outcome, RateLimited)
        assert (outcome.chunk, outcome.shrink) == (chunk, True)
        assert outcome.retry_after == pytest.approx(0.05)
        assert eng.manifest.state.chunks[chunk].stage is Stage.INTENT
        assert eng.runner.paused is None  # a 429 waits; it does not pause the pipeline

        emulator.set_faults(http429=0.0)
        outcome = await _run_with_poller(eng, driver.run)
        assert isinstance(outcome, Committed)
        assert eng.manifest.state.chunks[chunk].succeeded == 3


@pytest.mark.anyio
async def test_the_poller_records_every_ended_batch_with_one_list(
    tmp_path: Path, emulator: EmulatorThread, workspace: Callable[..., Workspace]
) -> None:
    """Three submitted chunks: one poll records ``ended`` with the API's counts for each."""
    async with engine(workspace(emulator.base_url), emulator.base_url) as eng:
        chunks = [await eng.sealed_chunk(n) for n in (2, 3, 4)]
        for chunk in chunks:
            await eng.driver(chunk).submit(eng.manifest.state.chunks[chunk])
        watched = [eng.manifest.state.chunks[c] for c in chunks]
        assert all(c.stage is Stage.SUBMITTED for c in watched)
        with anyio.fail_after(10):
            while any(c.stage is Stage.SUBMITTED for c in eng.manifest.state.chunks.values()):
                await eng.runner.poller.poll_once(
                    [c for c in eng.manifest.state.chunks.values() if c.stage is Stage.SUBMITTED]
                )
        for chunk, rows in zip(chunks, (2, 3, 4), strict=True):
            state = eng.manifest.state.chunks[chunk]
            assert state.stage is Stage.ENDED
            assert state.counts == {"succeeded": rows, "errored": 0, "canceled": 0,
                                    "expired": 0, "processing": 0}


@pytest.mark.anyio
async def test_the_collector_routes_an_ended_batch_and_a_lost_one(
    tmp_path: Path, emulator: EmulatorThread, workspace: Callable[..., Workspace]
) -> None:
    """Successes reach the sinks; a batch whose results are gone dead-letters every row."""
    async with engine(workspace(emulator.base_url), emulator.base_url) as eng:
        deps = eng.runner.deps
        chunk = eng.seal(3)
        spool = deps.spool_path(chunk)
        batch = await deps.api.create(spool, eng._writer.body_bytes)
        for _ in range(200):
            if (await deps.api.retrieve(batch.id)).processing_status == "ended":
                break
            await anyio.sleep(0.05)
        summary = await deps.collector().collect(
            chunk=chunk, root=chunk, batch_id=batch.id, spool=spool,
            blocks=lambda: deps.api.result_blocks(batch.id),
        )
        assert (summary.succeeded, summary.dead, summary.retried) == (3, 0, 0)
        assert summary.figures().succeeded == 3 and summary.retry_chunk is None

        lost = eng.seal(2)
        gone = await deps.collector().collect(
            chunk=lost, root=lost, batch_id="msgbatch_gone", spool=deps.spool_path(lost),
            blocks=None, lost=("batch_lost", "its results are gone"),
        )
        assert (gone.succeeded, gone.dead, gone.missing) == (0, 2, 0)
        outputs = eng.workspace.outputs()
        assert outputs.result_keys == {"k0-0", "k0-1", "k0-2"}
        assert outputs.dead_keys == {"k1-0", "k1-1"}


@pytest.mark.anyio
async def test_a_402_at_create_pauses_with_a_typed_kind(
    tmp_path: Path, emulator: EmulatorThread, workspace: Callable[..., Workspace]
) -> None:
    """Billing refuses the create: the pause record carries kind billing and creates wait."""
    emulator.set_faults(http402=1.0, http_fault_on="create")
    async with engine(workspace(emulator.base_url), emulator.base_url) as eng:
        chunk = await eng.sealed_chunk(2)
        returned: list[Any] = []

        async def drive() -> None:
            returned.append(await eng.driver(chunk).run())

        async with anyio.create_task_group() as tg:
            tg.start_soon(drive)
            with anyio.fail_after(30):
                await eng.runner.changed.wait()  # fired by the pause
            await anyio.sleep(0.2)  # the driver is back waiting for a resume, not returning
            tg.cancel_scope.cancel()
        assert returned == []
        pipeline = eng.manifest.state.pipelines["tickets"]
        assert pipeline.pause_kind == "billing"
        assert pipeline.paused is not None and pipeline.paused.startswith("billing_error")
        assert eng.runner.submissions_blocked
        assert [a.kind for a in eng.manifest.state.alarms][-1] == "billing_or_auth"
        assert eng.manifest.state.chunks[chunk].stage is Stage.INTENT


@pytest.mark.anyio
async def test_a_retry_chunk_lost_with_its_parent_spool_is_held(
    tmp_path: Path, emulator: EmulatorThread, workspace: Callable[..., Workspace]
) -> None:
    """Nothing left to rebuild a retry chunk from: run() says held, after a spool_lost alarm."""
    emulator.set_faults(expired=1.0)
    async with engine(workspace(emulator.base_url), emulator.base_url) as eng:
        chunk = await eng.sealed_chunk(2)
        outcome = await _run_with_poller(eng, eng.driver(chunk).run)
        assert isinstance(outcome, Committed) and outcome.retry_chunk is not None
        eng.runner.spool_path(outcome.retry_chunk).unlink()
        eng.runner.spool_path(chunk).unlink()
        held = await eng.driver(outcome.retry_chunk).run()
        assert isinstance(held, Held) and held.chunk == outcome.retry_chunk
        assert "cannot be read a second time" in held.reason
        kinds = [a.kind for a in eng.manifest.state.alarms]
        assert kinds.count("spool_lost") >= 2
        assert eng.manifest.state.chunks[outcome.retry_chunk].stage is Stage.SEALED


@pytest.mark.anyio
async def test_a_batch_the_api_forgot_ends_as_lost_and_dead_letters_its_rows(
    tmp_path: Path, emulator: EmulatorThread, workspace: Callable[..., Workspace]
) -> None:
    """404 past the not-found window: the poller ends the chunk as lost, once, with an alarm."""
    async with engine(workspace(emulator.base_url), emulator.base_url,
                      api={"not_found_window": "0.2s"}) as eng:
        chunk = await eng.sealed_chunk(3)
        await eng.driver(chunk).submit(eng.manifest.state.chunks[chunk])
        batch_id = eng.manifest.state.chunks[chunk].batch_id
        assert batch_id is not None
        sdk_client(emulator.base_url).messages.batches.delete(batch_id)

        poller = eng.runner.poller
        await poller.poll_once([eng.manifest.state.chunks[chunk]])
        assert eng.manifest.state.chunks[chunk].stage is Stage.SUBMITTED  # within the window
        await anyio.sleep(0.3)
        await poller.poll_once([eng.manifest.state.chunks[chunk]])
        state = eng.manifest.state.chunks[chunk]
        assert state.stage is Stage.ENDED and state.counts is not None
        assert state.counts["lost"] == 3
        assert [a.kind for a in eng.manifest.state.alarms] == ["batch_not_found"]

        outcome = await eng.driver(chunk).run()
        assert isinstance(outcome, Committed) and outcome.summary is not None
        assert (outcome.summary.dead, outcome.summary.retried) == (3, 0)
        dead = eng.workspace.outputs().dead
        assert {row["error_type"] for row in dead.values()} == {"batch_lost"}


@pytest.mark.anyio
async def test_a_cluster_worker_polls_only_the_batches_of_chunks_it_holds(
    tmp_path: Path, emulator: EmulatorThread, workspace: Callable[..., Workspace]
) -> None:
    """
    The view holds every worker's chunks; polling all of them multiplied the API's calls
    by the worker count. A worker holding one of three submitted chunks asks about one.
    """
    async with engine(workspace(emulator.base_url), emulator.base_url) as eng:
        chunks = [await eng.sealed_chunk(n) for n in (2, 3, 4)]
        for chunk in chunks:
            await eng.driver(chunk).submit(eng.manifest.state.chunks[chunk])
        runner = eng.runner
        runner.workspace = "default"  # a cluster worker ...
        runner.leases = {chunks[0]: runner.lease_of(chunks[0])}  # ... holding the first
        asked: list[str] = []
        retrieve = runner.api.retrieve

        async def counted(batch_id: str) -> Any:
            asked.append(batch_id)
            return await retrieve(batch_id)

        runner.api.retrieve = counted  # type: ignore[method-assign]
        states = eng.manifest.state.chunks
        async with anyio.create_task_group() as tg:
            tg.start_soon(runner.poller.run)
            with anyio.fail_after(10):
                await runner.poller.wait_ended(states[chunks[0]])
            await anyio.sleep(3 * runner.api_config.poll_interval)  # a few more polls
            tg.cancel_scope.cancel()
        assert states[chunks[0]].stage is Stage.ENDED
        assert [states[c].stage for c in chunks[1:]] == [Stage.SUBMITTED, Stage.SUBMITTED]
        assert set(asked) == {states[chunks[0]].batch_id}  # the others' never asked about
        for chunk in chunks[1:]:  # ended at the API: a poll would have seen them
            batch = await retrieve(states[chunk].batch_id or "")
            assert batch.processing_status == "ended"
