"""
``batchd run`` end to end with PostgreSQL as source and sink.

Real PostgreSQL, the real emulator over HTTP, the daemon as a real
subprocess. The label each ticket must get follows from the emulator's reply
rules, and the fate of every request follows from the emulator's seeded fault
oracle (a pure function of seed, custom_id and attempt), so each test compares
the final tables, the dead letters and the emulator's counters with what they
must hold, row by row — after clean runs, SIGKILLs at the crash points,
connections cut from under the daemon, and rows inserted while it runs.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

from batchd.daemon.emulator import EmulatorConfig, EmulatorThread
from tests.fixtures.emulator import SEED
from tests.fixtures.engine import RULES_PATH, describe, predict_fates
from tests.fixtures.pg_e2e import (
    BackendKiller,
    LateProxy,
    PgWorkspace,
    fetch_categories,
    fetch_results,
    fresh_schema,
    insert_tickets,
    wait_for_text,
)

TICKETS = 3000
MAX_REQUESTS = 500
MAX_ATTEMPTS = 3
INVALID_ONLY: dict[str, float] = {"invalid_request": 0.02}
WITH_RETRIES: dict[str, float] = {"invalid_request": 0.02, "api_error": 0.05}

EmulatorFactory = Callable[..., EmulatorThread]
WorkspaceFactory = Callable[..., PgWorkspace]


# -- the oracle ---------------------------------------------------------------------


@dataclass
class Oracle:
    """What the emulator will do to each key, computed with its own fault injector."""

    fates: dict[str, list[str | None]]  # key -> inner error per attempt (None: success)
    batches: int  # root chunks plus the retry chunks their retriable failures need

    @property
    def dead(self) -> set[str]:
        return {k for k, fate in self.fates.items() if fate[-1] is not None}

    def received(self) -> dict[str, int]:
        return {f"t-{k}": len(fate) for k, fate in self.fates.items()}


def predict(keys: list[str], faults: Mapping[str, float], chunk_size: int = MAX_REQUESTS) -> Oracle:
    """
    Each key's attempts, and the batches a run must create.

    Chunks are full slices of the keys in key order (the source reads in key
    order and ``linger`` is too long to close a chunk early); a chunk whose
    requests fail retriably gets one retry chunk per further attempt.
    """
    fates = predict_fates(keys, faults, seed=SEED, max_attempts=MAX_ATTEMPTS)
    ordered = sorted(keys, key=int)
    batches = 0
    for start in range(0, len(ordered), chunk_size):
        chunk = ordered[start:start + chunk_size]
        batches += max(len(fates[k]) for k in chunk)
    return Oracle(fates, batches)


def start_emulator(
    factory: EmulatorFactory, faults: Mapping[str, float], **overrides: Any
) -> EmulatorThread:
    """An emulator answering with the demo rules, its faults switched on at runtime."""
    emulator = factory(rules=RULES_PATH, **overrides)
    emulator.set_faults(**faults)
    return emulator


def assert_written_back(
    ws: PgWorkspace, table: str, expected: dict[str, str], oracle: Oracle
) -> None:
    """The table holds each surviving key's label; NULL rows are exactly the dead letters."""
    dead = ws.outputs().dead
    categories = fetch_categories(ws.dsn, table)
    assert set(categories) == set(expected)
    assert {k for k, v in categories.items() if v is None} == set(dead) == oracle.dead
    assert {k: v for k, v in categories.items() if v is not None} == {
        k: v for k, v in expected.items() if k not in oracle.dead
    }
    for key, line in dead.items():
        assert line["error_type"] == oracle.fates[key][-1], (key, line)
    assert max(ws.outputs().dead_counts.values(), default=1) == 1


def assert_sent_once(emulator: EmulatorThread, oracle: Oracle, *, chunked: bool = True) -> None:
    """
    No chunk was created twice and no request sent more often than its fate needed.

    ``chunked=False`` when chunks close on ``linger`` (daemon mode), so their
    number is not known in advance; the per-request counts still are.
    """
    stats = emulator.stats()
    if chunked:
        assert stats["batches_created"] == oracle.batches
    assert max(stats["received"].values()) <= MAX_ATTEMPTS
    assert stats["received"] == oracle.received()


def tickets(ws: PgWorkspace, schema: str, count: int = TICKETS) -> tuple[str, dict[str, str]]:
    """A fresh ``<schema>.tickets`` table of ``count`` rows; its name and key → label."""
    table = f"{schema}.tickets"
    return table, insert_tickets(ws.dsn, table, 1, count, create=True)


# -- tests --------------------------------------------------------------------------


@dataclass
class CleanRun:
    """One uninterrupted run writing back (update mode) and into batchd_results at once."""

    ws: PgWorkspace
    emulator: EmulatorThread
    table: str
    results: str
    expected: dict[str, str]
    oracle: Oracle


@pytest.fixture(scope="class")
def clean_run(tmp_path_factory: pytest.TempPathFactory, pg_dsn: str) -> Iterator[CleanRun]:
    """3,000 tickets, 2 % invalid requests, both sink modes in one pipeline, run to the end."""
    root = tmp_path_factory.mktemp("pg-clean")
    config = EmulatorConfig(rules=RULES_PATH, seed=SEED, state_dir=root / "emulator")
    with EmulatorThread(config) as emulator, fresh_schema(pg_dsn) as schema:
        emulator.set_faults(**INVALID_ONLY)
        ws = PgWorkspace(root / "ws", emulator.base_url, pg_dsn)
        table, expected = tickets(ws, schema)
        results = f"{schema}.batchd_results"
        ws.write_pg_config(table=table, mode="update", extra_sinks=[
            {"type": "postgres", "dsn": "env:DATABASE_URL", "mode": "results", "table": results}
        ])
        ws.run_ok()
        yield CleanRun(ws, emulator, table, results, expected,
                       predict(list(expected), INVALID_ONLY))


class TestCleanRun:
    def test_update_mode_writes_each_label_back(self, clean_run: CleanRun) -> None:
        """Every ticket gets its rule label in place; the NULL rows are exactly the dead letters."""
        run = clean_run
        assert run.oracle.dead, "the fault fraction should fail some tickets"
        assert_written_back(run.ws, run.table, run.expected, run.oracle)
        assert all(line["error_type"] == "invalid_request_error"
                   for line in run.ws.outputs().dead.values())

    def test_results_mode_holds_one_complete_row_per_key(self, clean_run: CleanRun) -> None:
        """batchd_results holds each surviving key once with status, output, model, tokens, cost."""
        run = clean_run
        rows = fetch_results(run.ws.dsn, run.results)
        assert len(rows) == TICKETS - len(run.oracle.dead)
        by_key = {row["key"]: row for row in rows}
        assert len(by_key) == len(rows)
        assert {k: r["output"] for k, r in by_key.items()} == {
            k: v for k, v in run.expected.items() if k not in run.oracle.dead
        }
        for key, row in by_key.items():
            assert row["status"] == "succeeded", row
            assert row["custom_id"] == f"t-{key}", row
            assert row["model"].startswith("claude-haiku-4-5"), row
            assert row["input_tokens"] > 0 and row["output_tokens"] > 0, row
            assert row["cost_usd"] > 0, row
            assert row["batch_id"].startswith("msgbatch_"), row
            assert row["attempt"] == 1, row
        assert len({r["batch_id"] for r in rows}) == run.oracle.batches

    def test_each_chunk_and_request_sent_once(self, clean_run: CleanRun) -> None:
        """The emulator saw one batch per chunk and each custom_id exactly once."""
        assert_sent_once(clean_run.emulator, clean_run.oracle)


CRASH_POINTS = ["after_create", "mid_results:7", "after_flush:3"]


class TestKillNine:
    @pytest.mark.parametrize("point", CRASH_POINTS)
    def test_restart_after_sigkill_gives_the_uninterrupted_result(
        self,
        point: str,
        emulator_factory: EmulatorFactory,
        pg_workspace: WorkspaceFactory,
        pg_schema: str,
    ) -> None:
        """Killed with -9 at a crash point, a restart ends with the exact table, nothing resent."""
        emulator = start_emulator(emulator_factory, WITH_RETRIES)
        ws = pg_workspace(emulator.base_url)
        table, expected = tickets(ws, pg_schema)
        oracle = predict(list(expected), WITH_RETRIES)
        assert oracle.batches > TICKETS // MAX_REQUESTS, "the faults should need retry chunks"
        ws.write_pg_config(table=table, mode="update", max_attempts=MAX_ATTEMPTS)

        ws.crash(point)
        before = emulator.stats()["batches_created"]
        assert before < oracle.batches, f"{point} should kill the run before it is done"
        ws.run_ok()
        assert_written_back(ws, table, expected, oracle)
        assert_sent_once(emulator, oracle)


@dataclass
class LossyRun:
    """A run whose connections were cut from outside, with secrets in its environment."""

    ws: PgWorkspace
    emulator: EmulatorThread
    table: str
    expected: dict[str, str]
    oracle: Oracle
    code: int | None
    output: str
    source_kills: int
    sink_kills: int


@pytest.fixture(scope="module")
def lossy_run(tmp_path_factory: pytest.TempPathFactory, pg_dsn: str) -> Iterator[LossyRun]:
    """
    1,200 tickets through a slow emulator (1 s per batch) while a thread kills the
    source's backend (any time) and the sink's (only mid-transaction, i.e. while a
    group is being staged); the DSNs carry a password, the API key is a real-looking
    one and logging is at debug level, so the same run also proves nothing leaks.
    """
    root = tmp_path_factory.mktemp("pg-lossy")
    config = EmulatorConfig(rules=RULES_PATH, seed=SEED, latency=1.0, state_dir=root / "emu")
    with EmulatorThread(config) as emulator, fresh_schema(pg_dsn) as schema:
        emulator.set_faults(**WITH_RETRIES)
        ws = PgWorkspace(root / "ws", emulator.base_url, pg_dsn)
        ws.extra_env.update(DATABASE_URL=with_password(pg_dsn), ANTHROPIC_API_KEY=SECRET_API_KEY)
        table, expected = tickets(ws, schema, 1200)
        ws.write_pg_config(table=table, mode="update", max_requests=200, page_size=200,
                           source={"dsn": with_password(pg_dsn)})
        proc, log_path = ws.spawn("--until-drained", "--log-level", "debug")
        source_killer = sink_killer = None
        try:
            # Cut connections only once both sides are open: a sink whose open() is cut
            # stops the daemon (the engine bug TestLateDatabase pins down).
            if wait_for_text(log_path, "pipelines started", proc, 60):
                source_killer = BackendKiller(pg_dsn, [ws.source_app], interval=0.4,
                                              limit=3).start()
                sink_killer = BackendKiller(pg_dsn, [ws.sink_app], interval=0.02, limit=3,
                                            busy_only=True).start()
            code = proc.wait(timeout=90)
        finally:
            for killer in (source_killer, sink_killer):
                if killer is not None:
                    killer.stop()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        yield LossyRun(
            ws, emulator, table, expected, predict(list(expected), WITH_RETRIES, 200), code,
            log_path.read_text(errors="replace"),
            source_killer.killed[ws.source_app] if source_killer else 0,
            sink_killer.killed[ws.sink_app] if sink_killer else 0,
        )


class TestConnectionLoss:
    def test_terminated_backends_do_not_change_the_result(self, lossy_run: LossyRun) -> None:
        """Source and sink backends killed mid-run: exit 0, exact table, nothing sent twice."""
        run = lossy_run
        assert run.code == 0, run.output[-4000:]
        assert run.source_kills >= 1, "the source's connection was never cut"
        assert run.sink_kills >= 1, "no sink group was cut mid-transaction"
        assert_written_back(run.ws, run.table, run.expected, run.oracle)
        assert_sent_once(run.emulator, run.oracle)


class TestLateDatabase:
    @pytest.mark.parametrize("side", ["source", "sink"])
    def test_database_that_comes_up_after_the_daemon(
        self,
        side: str,
        emulator_factory: EmulatorFactory,
        pg_workspace: WorkspaceFactory,
        pg_schema: str,
    ) -> None:
        """A server refusing connections at start-up is waited for, then the run completes."""
        emulator = start_emulator(emulator_factory, INVALID_ONLY)
        ws = pg_workspace(emulator.base_url)
        table, expected = tickets(ws, pg_schema, 300)
        parts = urlsplit(ws.dsn)
        proxy = LateProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
        late = urlunsplit(parts._replace(netloc=f"{parts.username or 'postgres'}@"
                                                f"127.0.0.1:{proxy.port}"))
        once = {"connect_attempts": 1, "connect_timeout": "1s"}
        if side == "source":
            source, sink = {**once, "dsn": late}, {}
        else:
            source, sink = {"dsn": ws.dsn}, once
            ws.extra_env["DATABASE_URL"] = late
        ws.write_pg_config(table=table, mode="update", max_requests=100, page_size=100,
                           source=source, sink=sink)
        proc, log_path = ws.spawn("--until-drained")
        try:
            assert wait_for_text(log_path, "postgres connect failed", proc, 60), (
                log_path.read_text()[-4000:])
            proxy.listen()
            code = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proxy.close()
        assert code == 0, log_path.read_text()[-4000:]
        assert proxy.connections >= 1
        assert_written_back(ws, table, expected, predict(list(expected), INVALID_ONLY, 100))


class TestDaemonMode:
    def test_new_rows_are_picked_up_and_sigterm_exits_cleanly(
        self, emulator_factory: EmulatorFactory, pg_workspace: WorkspaceFactory, pg_schema: str
    ) -> None:
        """Rows inserted while it runs get labelled; SIGTERM exits 0; a restart sends nothing."""
        emulator = start_emulator(emulator_factory, INVALID_ONLY)
        ws = pg_workspace(emulator.base_url)
        table, expected = tickets(ws, pg_schema, 600)
        ws.write_pg_config(table=table, mode="update", source={"where": "category IS NULL"},
                           max_requests=200, page_size=200, linger="0.3s")

        proc, log_path = ws.spawn()
        try:
            oracle = predict(list(expected), INVALID_ONLY)
            wait_labelled(ws, table, expected, oracle, proc)
            expected.update(insert_tickets(ws.dsn, table, 601, 400, seed=8))
            oracle = predict(list(expected), INVALID_ONLY)
            wait_labelled(ws, table, expected, oracle, proc)
            proc.send_signal(signal.SIGTERM)
            started = time.monotonic()
            code = proc.wait(timeout=15)
            stopped_in = time.monotonic() - started
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert code == 0, log_path.read_text()[-4000:]
        assert stopped_in < 5, stopped_in
        assert_written_back(ws, table, expected, oracle)
        assert_sent_once(emulator, oracle, chunked=False)

        before = emulator.stats()
        ws.run_ok()
        after = emulator.stats()
        assert after["batches_created"] == before["batches_created"]
        assert after["requests_received"] == before["requests_received"]
        assert_written_back(ws, table, expected, oracle)


def wait_labelled(
    ws: PgWorkspace,
    table: str,
    expected: dict[str, str],
    oracle: Oracle,
    proc: subprocess.Popen[bytes],
    timeout: float = 40.0,
) -> None:
    """Until every surviving key of ``expected`` has a category (the daemon must stay up)."""
    wanted = len(expected) - len(oracle.dead)
    deadline = time.monotonic() + timeout
    labelled = 0
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the daemon exited early with {proc.returncode}"
        categories = fetch_categories(ws.dsn, table)
        labelled = sum(1 for k in expected if categories.get(k) is not None)
        if labelled == wanted:
            return
        time.sleep(0.2)
    pytest.fail(f"only {labelled} of {wanted} rows labelled after {timeout}s")


SECRET_PASSWORD = "s3cretpw"
SECRET_API_KEY = "sk-ant-test-0123456789abcdef"


def with_password(dsn: str, password: str = SECRET_PASSWORD, port: int | None = None) -> str:
    """``dsn`` with a password (trust auth ignores it) and optionally another port."""
    parts = urlsplit(dsn)
    host = parts.hostname or "127.0.0.1"
    netloc = f"{parts.username or 'postgres'}:{password}@{host}:{port or parts.port or 5432}"
    return urlunsplit(parts._replace(netloc=netloc))


def assert_no_secret(output: str) -> None:
    for secret in (SECRET_PASSWORD, SECRET_API_KEY):
        assert secret not in output, f"{secret!r} leaked:\n" + "\n".join(
            line for line in output.splitlines() if secret in line
        )[:4000]


class TestSecrets:
    def test_password_and_api_key_never_printed(self, lossy_run: LossyRun) -> None:
        """The debug-level output of the run with cut connections holds neither secret."""
        assert "batch submitted" in lossy_run.output, lossy_run.output[-4000:]
        assert_no_secret(lossy_run.output)

    def test_connect_failures_hide_the_password(
        self, emulator: EmulatorThread, pg_workspace: WorkspaceFactory, pg_schema: str
    ) -> None:
        """An unreachable source and a missing database are named, the password never."""
        ws = pg_workspace(emulator.base_url)
        unreachable = with_password(ws.dsn, port=1)
        missing_db = urlunsplit(urlsplit(with_password(ws.dsn))._replace(path="/no_such_db_e2e"))
        ws.extra_env.update(DATABASE_URL=missing_db, ANTHROPIC_API_KEY=SECRET_API_KEY)
        fast_failure = {"connect_attempts": 1, "connect_timeout": "1s"}
        ws.write_pg_config(table=f"{pg_schema}.tickets", mode="update",
                           source={**fast_failure, "dsn": unreachable}, sink=fast_failure)
        # Sources start first: the unreachable one is retried in the background, then the
        # sink's missing database is fatal.
        proc = ws.run("run", str(ws.config_path), "--until-drained", "--log-level", "debug",
                      timeout=60)
        output = proc.stdout + proc.stderr
        assert proc.returncode == 1, describe(proc)
        assert "postgres@127.0.0.1:1/" in output, describe(proc)
        assert "no_such_db_e2e" in output, describe(proc)
        assert_no_secret(output)
