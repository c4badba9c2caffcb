"""
The budget and the queue as shared counters, wired into PgStore's transitions (one
worker in process, the real PostgreSQL): a seal holds its chunk's upper bound in the
seal's own transaction or is not recorded, ``ended`` gives the queue back, the commit
turns the hold into the chunk's cost, a retry chunk is held regardless of the cap, and
the API's processing count becomes the queue's ``external``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from batchd.daemon.batches.api import BatchesApi
from batchd.daemon.batches.queue_limit import processing_requests
from batchd.daemon.cluster import limits
from batchd.daemon.cluster.errors import LimitRefused
from batchd.daemon.config import ApiConfig
from batchd.daemon.emulator import EmulatorThread
from batchd.daemon.wal.manifest_state import Stage
from batchd.daemon.wal.records import (
    ChunkRetired,
    ChunkSealed,
    Ended,
    Figures,
    ResultsCommitted,
    SourceCommitted,
)
from tests.fixtures.store import BUDGET, QUEUE, Harness, pg_harness
from tests.test_cluster_deadline import write_spool

BOUND = 0.4  # every test chunk's upper bound; the harness's budget cap is 1.0


@pytest.fixture
def pg(pg_dsn: str, pg_schema: str, tmp_path: Path) -> Harness:
    return pg_harness(pg_dsn, pg_schema, tmp_path)


def sealed(chunk: str, first: int, shard: str | None = None) -> ChunkSealed:
    return ChunkSealed(pipeline="p", chunk=chunk, attempt=1, requests=3, bytes=300, rejects=0,
                       first_seq=first, last_seq=first + 2, position={"line": first + 2},
                       parent=None, shard=shard)


def committed(chunk: str, batch_id: str | None, cost: float,
              retry: ChunkSealed | None = None) -> ResultsCommitted:
    return ResultsCommitted(chunk=chunk, batch_id=batch_id,
                            figures=Figures(succeeded=2, retried=1 if retry else 0,
                                            cost_usd=cost), retry_chunk=retry)


async def counter(store: Any, scope: str) -> limits.Counter:
    found = await store.counter(scope)
    assert found is not None
    return found


async def holds(store: Any) -> dict[tuple[str, str], Decimal]:
    async with store._conn() as conn:
        rows = await conn.fetch(store.sql("SELECT scope, holder, amount FROM {s}.limit_hold"))
    return {(r["scope"], r["holder"]): r["amount"] for r in rows}


async def seal(pg: Harness, store: Any, shard: Any, chunk: str, first: int = 1) -> Any:
    digest = await store.put_spool(chunk, shard.epoch, pg.spool_file(chunk))
    applied = await store.append(sealed(chunk, first), lease=shard, spool=digest)
    (lease,) = applied.created
    return lease


@pytest.mark.anyio
class TestBudgetHolds:
    async def test_a_chunk_holds_its_bound_from_seal_to_commit_then_counts_its_cost(
        self, pg: Harness
    ) -> None:
        async with pg.opened() as store:
            store.budgets.register("p", lambda requests, size: BOUND)
            shard = await store.acquire_shard("p")
            lease = await seal(pg, store, shard, "p-000001")
            assert await holds(store) == {(BUDGET, "p-000001"): Decimal("0.4")}
            slot = await store.acquire_create_slot("default")
            await store.record_intent(slot, lease, 3, queue_scope=QUEUE)
            assert (await counter(store, QUEUE)).reserved == 3
            await store.record_submitted(slot, lease, "msgbatch_1", "t")
            await store.append(Ended(chunk=lease.chunk, batch_id="msgbatch_1",
                                     counts={"succeeded": 2, "errored": 1}),
                               lease=lease, expected=Stage.SUBMITTED)
            # The queue is given back with the ended, in its transaction; the budget is not.
            assert (await counter(store, QUEUE)).reserved == 0
            assert await holds(store) == {(BUDGET, "p-000001"): Decimal("0.4")}
            retry = ChunkSealed.retry(pipeline="p", parent=lease.chunk, parent_attempt=1,
                                      chunk="p-000001-r1", requests=1, bytes=100)
            spool = await store.put_spool(retry.chunk, lease.epoch, pg.spool_file(retry.chunk))
            applied = await store.append(committed(lease.chunk, "msgbatch_1", 0.25, retry),
                                         lease=lease, expected=Stage.ENDED, spool=spool)
            (retry_lease,) = applied.created
            budget = await counter(store, BUDGET)
            assert (budget.spent, budget.reserved) == (Decimal("0.25"), Decimal("0.4"))
            assert await holds(store) == {(BUDGET, "p-000001-r1"): Decimal("0.4")}
            # A duplicate commit changes nothing (the transition applies once).
            again = await store.append(committed(lease.chunk, "msgbatch_1", 0.25, retry),
                                       lease=lease, spool=spool)
            assert again.noop
            assert (await counter(store, BUDGET)).spent == Decimal("0.25")
            await store.append(committed(retry_lease.chunk, None, 0.0), lease=retry_lease,
                               expected=Stage.SEALED)
            await store.append(SourceCommitted(pipeline="p", position={"line": 3},
                                               source_seq=3), lease=shard)
            for chunk in (lease.chunk, retry_lease.chunk):
                await store.append(ChunkRetired(chunk=chunk), lease=shard)
            budget = await counter(store, BUDGET)
            assert (budget.spent, budget.reserved) == (Decimal("0.25"), 0)
            assert await holds(store) == {}
            async with store._conn() as conn:
                assert await limits.recompute(conn, store.sql) == []

    async def test_a_seal_past_the_budget_is_refused_and_not_recorded(
        self, pg: Harness
    ) -> None:
        async with pg.opened() as store:
            store.budgets.register("p", lambda requests, size: BOUND)
            shard = await store.acquire_shard("p")
            await seal(pg, store, shard, "p-000001", 1)
            await seal(pg, store, shard, "p-000002", 4)
            digest = await store.put_spool("p-000003", shard.epoch, pg.spool_file("p-000003"))
            with pytest.raises(LimitRefused) as refused:
                await store.append(sealed("p-000003", 7), lease=shard, spool=digest)
            assert refused.value.scope == BUDGET and refused.value.cap == 1.0
            assert refused.value.reserved == pytest.approx(0.8)
            # Nothing of the third chunk: no row, no event, no spool blocks, no hold.
            assert await store.chunk("p-000003") is None
            async with store._conn() as conn:
                kinds = [r["kind"] for r in await conn.fetch(
                    store.sql("SELECT kind FROM {s}.event ORDER BY seq"))]
                blocks = await conn.fetchval(store.sql(
                    "SELECT count(*) FROM {s}.spool_block WHERE chunk = 'p-000003'"))
            assert kinds == ["chunk_sealed", "chunk_sealed"] and blocks == 0
            assert (await counter(store, BUDGET)).reserved == Decimal("0.8")
            assert set(await holds(store)) == {(BUDGET, "p-000001"), (BUDGET, "p-000002")}

    async def test_two_workers_sealing_at_once_never_pass_the_budget(self, pg: Harness) -> None:
        """
        Two workers, each reading its own shard of the pipeline, seal four chunks at once
        against a cap that admits two: exactly two are recorded, whoever wins. The
        reservation in each seal's own transaction, under the counter's row lock, is what
        orders them (a check on a worker's view before sealing would race).
        """
        async with pg.opened(name="a") as a, pg.opened(name="b") as b:
            for store in (a, b):
                store.budgets.register("p", lambda requests, size: BOUND)
            shards = {a: await a.acquire_shard("p", "s1"), b: await b.acquire_shard("p", "s2")}
            assert all(shards.values())
            jobs = []
            for n, store in enumerate((a, b, a, b), start=1):
                chunk = f"p-00000{n}"
                lease = shards[store]
                digest = await store.put_spool(chunk, lease.epoch, pg.spool_file(chunk))
                jobs.append((store, lease, chunk, digest, n))

            async def one(store: Any, lease: Any, chunk: str, digest: Any, n: int) -> bool:
                fields = sealed(chunk, 3 * n - 2, lease.shard)
                try:
                    await store.append(fields, lease=lease, spool=digest)
                except LimitRefused:
                    return False
                return True

            results = await asyncio.gather(*(one(*job) for job in jobs))
            assert sorted(results) == [False, False, True, True], results
            budget = await counter(a, BUDGET)
            assert budget.reserved == Decimal("0.8") and budget.reserved <= budget.cap
            rows = [c for c in (await a.snapshot()).chunks]
            assert len(rows) == 2

    async def test_a_chunk_sealed_before_its_bound_still_counts_its_cost(
        self, pg: Harness
    ) -> None:
        """A chunk with no hold (sealed before the runtime wired the budget) is spent anyway."""
        async with pg.opened() as store:
            shard = await store.acquire_shard("p")
            lease = await seal(pg, store, shard, "p-000001")
            assert await holds(store) == {}
            store.budgets.register("p", lambda requests, size: BOUND)
            await store.append(committed(lease.chunk, None, 0.3), lease=lease,
                               expected=Stage.SEALED)
            budget = await counter(store, BUDGET)
            assert (budget.spent, budget.reserved) == (Decimal("0.3"), 0)

    async def test_live_chunks_sealed_before_the_budget_are_held_when_it_is_wired(
        self, pg: Harness
    ) -> None:
        """An imported chunk (or one an older batchd sealed) counts before it is committed."""
        async with pg.opened() as store:
            shard = await store.acquire_shard("p")
            first = await seal(pg, store, shard, "p-000001", 1)
            await seal(pg, store, shard, "p-000002", 4)
            await store.append(committed(first.chunk, None, 0.1), lease=first,
                               expected=Stage.SEALED)
            assert await store.hold_unheld("p") == 0  # no bound registered: nothing
            store.budgets.register("p", lambda requests, size: BOUND)
            assert await store.hold_unheld("p") == 1  # the committed one holds nothing
            assert await holds(store) == {(BUDGET, "p-000002"): Decimal("0.4")}
            assert await store.hold_unheld("p") == 0

    async def test_without_a_bound_a_seal_holds_nothing(self, pg: Harness) -> None:
        """A pipeline the runtime registered no bound for (no budget wiring) seals as before."""
        async with pg.opened() as store:
            shard = await store.acquire_shard("p")
            for n in range(1, 4):  # three chunks: past the 1.0 cap had they held 0.4 each
                await seal(pg, store, shard, f"p-00000{n}", 3 * n - 2)
            assert await holds(store) == {}


@pytest.mark.anyio
class TestDefinitions:
    async def test_the_config_wins_and_says_what_it_replaced(self, pg: Harness) -> None:
        async with pg.opened() as store:
            same = await store.define_limit(BUDGET, 1.0)
            assert not same.changed and not same.created
            lower = await store.define_limit(BUDGET, 0.5)
            assert lower.changed and not lower.raised and lower.previous == 1
            higher = await store.define_limit(BUDGET, 2.0)
            assert higher.raised and higher.cap == 2
            lifted = await store.define_limit(BUDGET, None)
            assert lifted.raised and lifted.cap is None
            assert (await store.define_limit("budget:q", 3.0)).created

    async def test_open_reports_a_cap_another_worker_set(self, pg: Harness) -> None:
        async with pg.opened(name="a") as a:
            await a.define_limit(BUDGET, 9.0)
            async with pg.opened(name="b") as b:  # its config says 1.0 (the harness)
                (defined,) = [d for d in b.limits_defined if d.scope == BUDGET]
                assert defined.changed and (defined.previous, defined.cap) == (9, 1)
                assert (await counter(b, BUDGET)).cap == 1

    async def test_a_new_budget_counter_starts_at_the_pipeline_s_spend(
        self, pg: Harness
    ) -> None:
        """A budget added after a pipeline ran counts what it already spent."""
        async with pg.opened() as store:
            shard = await store.acquire_shard("p")
            lease = await seal(pg, store, shard, "p-000001")
            await store.append(committed(lease.chunk, None, 0.3), lease=lease,
                               expected=Stage.SEALED)
            defined = await store.define_limit("budget:p", 5.0)  # exists: spent counted
            assert not defined.created
            async with store._conn() as conn:
                await conn.execute(store.sql("DELETE FROM {s}.limit_counter "
                                             "WHERE scope = 'budget:p'"))
            assert (await store.define_limit("budget:p", 5.0)).created
            assert (await counter(store, "budget:p")).spent == Decimal("0.3")


@pytest.mark.anyio
class TestQueue:
    async def test_a_chunk_larger_than_the_queue_goes_alone(self, pg: Harness) -> None:
        """As one daemon does: rather than never, once nothing else is in the queue."""
        async with pg.opened() as store:
            assert await store.reserve([QUEUE], 8, "p-000001")
            assert not await store.reserve([QUEUE], 8, "p-000002")
            assert not await store.reserve([QUEUE], 1, "p-000003")
            assert not await store.reserve([BUDGET], 1.5, "p-000004")  # a budget never does

    async def test_the_api_s_processing_count_sets_what_others_hold(
        self, pg: Harness, emulator_factory: Callable[..., EmulatorThread], tmp_path: Path
    ) -> None:
        """Batches another tool created count against the queue; ours are not counted twice."""
        emulator = emulator_factory(latency=60.0)
        api = BatchesApi(ApiConfig(base_url=emulator.base_url), "test")
        try:
            for n, count in ((1, 3), (2, 4)):
                spool = tmp_path / f"other-{n}.jsonl"
                _, size = write_spool(spool, count)
                await api.create(spool, size)
            assert await processing_requests(api) == 7
        finally:
            await api.aclose()
        async with pg.opened() as store:
            assert await store.reserve([QUEUE], 3, "p-000001")  # ours, 3 of the 7
            assert await store.reconcile_queue(QUEUE, 7) == 4
            assert (await counter(store, QUEUE)).available == 5 - 3 - 4
            assert not await store.reserve([QUEUE], 1, "p-000002")
