"""
Org-wide limits across three real ``batchd run`` workers (real PostgreSQL, the emulator):
the budget is one counter row that every seal reserves in its own transaction and every
commit settles, so three workers together never spend past ``budget_usd``; the processing
queue is one counter every create reserves, so the emulator's queue never refuses one.
"""

from __future__ import annotations

import csv
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import pytest

from batchd.daemon.config import load_config
from batchd.daemon.emulator import EmulatorThread
from batchd.daemon.models.preflight import catalog_for
from batchd.daemon.models.pricing import PriceTable
from tests.fixtures.cluster_workers import DSN_VAR, Cluster, _query, wait_for
from tests.fixtures.engine import csv_keys

ROWS = 600  # 12 chunks of 50
# A 50-request chunk of this pipeline is bounded at about $0.002 (max_tokens 8): the
# budget admits a part of the 12 chunks, never all of them.
BUDGET = 0.009
# Kafka: 48 chunks of 25 (about $0.0011 each at most); the budget admits about half.
KAFKA_ROWS, KAFKA_BUDGET = 1200, 0.03
QUEUE = 100  # two 50-request chunks; three workers with 3 in flight each would send 450


class CounterWatch:
    """Samples a limit counter while the workers run: the highest spent + reserved seen."""

    def __init__(self, cluster: Cluster, scope: str) -> None:
        self.cluster, self.scope = cluster, scope
        self.samples: list[tuple[Decimal, Decimal, Decimal | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        sql = (f'SELECT spent, reserved, cap FROM "{self.cluster.schema}".limit_counter '
               f"WHERE scope = '{self.scope}'")
        while not self._stop.is_set():
            for row in _query(self.cluster.dsn, sql):
                self.samples.append((row["spent"], row["reserved"], row["cap"]))
            self._stop.wait(0.05)

    def __enter__(self) -> CounterWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def exits(cluster: Cluster, indexes: list[int], timeout: float = 60.0) -> list[int]:
    """Each worker's exit code, once all have ended by themselves."""
    end = time.monotonic() + timeout
    codes = []
    for i in indexes:
        proc = cluster.procs[i]
        assert proc is not None
        try:
            codes.append(proc.wait(timeout=max(1.0, end - time.monotonic())))
        except Exception:
            state = cluster.db_state()
            cluster.stop()
            pytest.fail(f"worker {i} did not finish\n{state}\n{cluster.logs()}")
    return codes


def emulator_cost(cluster: Cluster, emulator: EmulatorThread) -> float:
    """What the emulator's answers cost at batch prices, from its own usage totals."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv(DSN_VAR, cluster.dsn)
        config = load_config(cluster.workers[0].config_path)
    prices = PriceTable(config.prices, catalog=catalog_for(config), source=str(config.path))
    total = 0.0
    for model, usage in emulator.stats()["usage_totals"].items():
        cost = prices.batch_cost(model, {
            "input_tokens": usage["input_tokens"], "output_tokens": usage["output_tokens"],
            "cache_read_input_tokens": usage["cache_read_input_tokens"],
            "cache_creation_input_tokens": usage["cache_creation_5m_input_tokens"]
            + usage["cache_creation_1h_input_tokens"],
        })
        assert cost is not None, model
        total += cost
    return total


def store_rows(cluster: Cluster, sql: str) -> list[Any]:
    return _query(cluster.dsn, sql.replace("{s}", f'"{cluster.schema}"'))


def raise_budget(cluster: Cluster, budget: float) -> None:
    for ws in cluster.workers:
        text = ws.config_path.read_text()
        raised = re.sub(r'("?budget_usd"? = )[0-9.]+', rf"\g<1>{budget}", text)
        assert raised != text
        ws.write_raw(raised)


class TestOrgBudget:
    def test_three_workers_stop_at_one_budget_and_finish_once_it_is_raised(
        self, cluster_factory: Callable[..., Cluster], emulator: EmulatorThread
    ) -> None:
        cluster = cluster_factory(rows=ROWS, pipeline={"budget_usd": BUDGET})
        with CounterWatch(cluster, "budget:tickets") as watch:
            for i in range(3):
                cluster.start(i)
            codes = exits(cluster, [0, 1, 2])
        logs = cluster.logs()
        # Every worker stops intake with the budget pause (--until-drained: exit 3).
        assert codes == [3, 3, 3], logs
        (pipeline,) = store_rows(cluster, "SELECT * FROM {s}.pipeline")
        assert pipeline["pause_kind"] == "budget", dict(pipeline)
        assert pipeline["paused"].startswith("budget exhausted"), pipeline["paused"]
        assert "across the cluster" in pipeline["paused"]
        # The bound: at every moment spent + held <= budget_usd (each seal reserved its
        # chunk's upper bound in its own transaction; no retry chunk was cut here), so
        # what was spent, by the store and by the emulator's own usage, is within it.
        assert watch.samples, "the counter was never read"
        peak = max(spent + reserved for spent, reserved, _ in watch.samples)
        assert peak <= Decimal(str(BUDGET)), (peak, watch.samples[-5:])
        (budget,) = store_rows(cluster, "SELECT * FROM {s}.limit_counter "
                                        "WHERE scope = 'budget:tickets'")
        assert budget["reserved"] == 0 and budget["cap"] == Decimal(str(BUDGET))
        assert budget["spent"] == pytest.approx(Decimal(str(pipeline["cost_usd"])))
        assert 0 < emulator_cost(cluster, emulator) <= BUDGET
        assert emulator_cost(cluster, emulator) == pytest.approx(pipeline["cost_usd"], rel=1e-6)
        # A part of the rows went out, each once; rows not sent are not marked done.
        stats = emulator.stats()
        received = Counter(stats["received"])
        assert 0 < len(received) < ROWS and set(received.values()) == {1}
        sent_keys = {cid.removeprefix("t-") for cid in received}
        done: set[str] = set()
        for ws in cluster.workers:
            out = ws.outputs()
            done |= out.result_keys | out.dead_keys
        assert done == sent_keys
        keys = csv_keys(cluster.input)
        assert pipeline["committed_seq"] == len(sent_keys) < len(keys)
        holds = store_rows(cluster, "SELECT * FROM {s}.limit_hold")
        assert holds == []

        # The budget raised in every config: the first worker back lifts the pause (the cap
        # went up), the others join, and the rest is done, every row paid once in all.
        raise_budget(cluster, 100.0)
        cluster.start(0)
        deadline = time.monotonic() + 30
        while store_rows(cluster, "SELECT paused FROM {s}.pipeline")[0]["paused"]:
            assert time.monotonic() < deadline, cluster.logs()
            time.sleep(0.1)
        cluster.start(1)
        cluster.start(2)
        cluster.wait([0, 1, 2])
        cluster.check(emulator)
        first = (cluster.workers[0].root / "run.log").read_text()
        assert "budget raised: resuming the pipeline paused by it" in first
        assert '"event":"limit cap changed' in first  # naming both caps


    def test_a_waiting_reader_reads_on_once_a_reload_raises_the_budget(
        self, cluster_factory: Callable[..., Cluster], emulator: EmulatorThread
    ) -> None:
        """
        Service mode (no --until-drained): the reader stopped by the budget keeps its
        shard and waits; another worker reloaded (SIGHUP) with a higher budget_usd lifts
        the pause, and the waiting reader reads the rest.
        """
        cluster = cluster_factory(rows=ROWS, workers=2, pipeline={"budget_usd": BUDGET})

        def paused() -> Any:
            return store_rows(cluster, "SELECT paused FROM {s}.pipeline")[0]["paused"]

        def reader() -> str | None:
            rows = store_rows(cluster, "SELECT owner FROM {s}.shard")
            return rows[0]["owner"] if rows else None

        cluster.serve(0), cluster.serve(1)
        wait_for("the budget pause", lambda: bool(
            store_rows(cluster, "SELECT * FROM {s}.pipeline") and paused()))
        wait_for("the chunks admitted to be retired", lambda: not store_rows(
            cluster, "SELECT chunk FROM {s}.chunk WHERE stage <> 'retired'"))
        sent = len(emulator.stats()["received"])
        assert 0 < sent < ROWS
        waiting = 0 if reader() == cluster.worker_id(0) else 1
        other = 1 - waiting
        raise_budget(cluster, 100.0)
        proc = cluster.procs[other]
        assert proc is not None
        proc.send_signal(signal.SIGHUP)  # the other worker reloads: its prepare raises the cap
        wait_for("every row sent", lambda: len(emulator.stats()["received"]) == ROWS, 40)
        wait_for("every chunk retired", lambda: not store_rows(
            cluster, "SELECT chunk FROM {s}.chunk WHERE stage <> 'retired'") and store_rows(
            cluster, "SELECT committed_seq FROM {s}.pipeline")[0]["committed_seq"] == ROWS)
        assert paused() is None
        holder = reader()  # before the stop hands every shard back
        for proc in cluster.procs:
            assert proc is not None
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0, cluster.logs()
        cluster.check(emulator)
        logs = [(ws.root / "run.log").read_text() for ws in cluster.workers]
        assert "budget raised: resuming the pipeline paused by it" in logs[other]
        # The waiting reader kept its shard through the pause. Once it lifted, the reader
        # read on with it (waiting in its packer, the shard still its own, or taking it
        # again after its read loop stopped), or the other worker took it from the reader
        # (if it asked first): never a shard left without its holder.
        me = cluster.worker_id(waiting)
        assert holder == me or any(f'"previous_owner":"{me}"' in text for text in logs), (
            holder, logs[waiting][-3000:])


class TestOrgBudgetAcrossShardReaders:
    def test_three_workers_reading_kafka_partitions_seal_within_one_budget(
        self, cluster_factory: Callable[..., Cluster], emulator: EmulatorThread,
        kafka_bootstrap: str,
    ) -> None:
        """
        Six partitions read by three workers at once, each sealing its own chunks: the
        seals of every worker go through one counter row, so together they stay within
        the budget (the local view could not: each reader sees its own seals first).
        """
        import anyio

        from tests.fixtures.kafka import create_topic, produce_json, unique_name

        topic, group = unique_name("budget-tickets"), unique_name("budget-group")
        source: dict[str, Any] = {
            "type": "kafka", "bootstrap_servers": kafka_bootstrap, "topics": [topic],
            "group_id": group, "key_field": "ticket_id", "drain_idle": 0.5,
            "poll_timeout_ms": 200, "batch": 100,
        }
        cluster = cluster_factory(rows=KAFKA_ROWS, pipeline={
            "source": source, "max_requests": 25, "budget_usd": KAFKA_BUDGET})
        rows = [row for row in csv.DictReader(cluster.input.open(newline=""))
                if row.get("ticket_id")]

        async def fill() -> None:
            await create_topic(kafka_bootstrap, topic, 6)
            await produce_json(kafka_bootstrap, topic,
                               [(row["ticket_id"].encode(), row) for row in rows])

        anyio.run(fill)
        with CounterWatch(cluster, "budget:tickets") as watch:
            for i in range(3):
                cluster.start(i)
            codes = exits(cluster, [0, 1, 2])
        assert codes == [3, 3, 3], cluster.logs()
        peak = max(spent + reserved for spent, reserved, _ in watch.samples)
        assert peak <= Decimal(str(KAFKA_BUDGET)), peak
        assert 0 < emulator_cost(cluster, emulator) <= KAFKA_BUDGET
        received = Counter(emulator.stats()["received"])
        assert 0 < len(received) < KAFKA_ROWS and set(received.values()) == {1}
        sealers = store_rows(cluster, "SELECT DISTINCT worker FROM {s}.event "
                                      "WHERE kind = 'chunk_sealed'")
        assert len(sealers) >= 2, sealers  # several workers sealed against the one budget
        assert store_rows(cluster, "SELECT * FROM {s}.limit_hold") == []


@pytest.fixture
def queue_emulator(emulator_factory: Callable[..., EmulatorThread]) -> EmulatorThread:
    """Batches take 0.6 s; the emulator refuses (429) a create past QUEUE requests."""
    return emulator_factory(latency=0.6, queue_limit=QUEUE)


class TestOrgQueue:
    @pytest.fixture
    def emulator(self, queue_emulator: EmulatorThread) -> Iterator[EmulatorThread]:
        yield queue_emulator

    def test_the_queue_limit_holds_across_three_workers(
        self, cluster_factory: Callable[..., Cluster], emulator: EmulatorThread,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        monkeypatch.setenv("BATCHD_QUEUE_RECONCILE_SECONDS", "0.5")
        api = {"poll_interval": "0.2s", "poll_jitter": 0.1, "queue_limit": QUEUE}
        cluster = cluster_factory(rows=ROWS, top={"api": api})
        with CounterWatch(cluster, "queue:default") as watch:
            for i in range(3):
                cluster.start(i)
            cluster.wait([0, 1, 2], timeout=60)
        cluster.check(emulator)
        stats = emulator.stats()
        # The emulator never had more than the limit processing, and refused no create.
        assert stats["peak_in_progress_requests"] <= QUEUE, stats
        assert "queue_limit" not in stats["faults_injected"], stats["faults_injected"]
        assert not any(k.startswith("429") for k in stats.get("http_errors", {})), stats
        # The limit was what held them back: two chunks in the queue at once at most.
        assert max(reserved for _, reserved, _ in watch.samples) <= QUEUE
        assert max(reserved for _, reserved, _ in watch.samples) > QUEUE // 2
        submitting = [i for i, ws in enumerate(cluster.workers)
                      if "batch submitted" in (ws.root / "run.log").read_text()]
        assert len(submitting) >= 2, submitting
        # Reconciled with the API's own count as the workers ran.
        assert "queue reconciled with the API" in cluster.logs()
