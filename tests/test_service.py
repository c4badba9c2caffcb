"""
``batchd run`` as systemd and an operator see it: a real child process, real signals,
a real AF_UNIX notify socket, a real metrics port and real HTTP to the emulator.

Each scenario runs once per class (a class-scoped fixture) and the tests read what it
recorded, because every ``batchd`` start costs seconds of interpreter and SDK import.
"""

from __future__ import annotations

import itertools
import json
import signal
import socket
import statistics
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from batchd.daemon.emulator import EmulatorConfig, EmulatorThread
from tests.fixtures.service import (
    RULES_PATH,
    RunningDaemon,
    ServiceWorkspace,
    describe,
    free_port,
    wait_until,
    workspaces,
)

WATCHDOG_USEC = 400_000
SECRET = "sk-ant-api03-secretvalue-0123456789"


# -- a stand-in for systemd's notify socket -----------------------------------------------


@dataclass
class Datagram:
    at: float  # wall clock, comparable with the daemon's log timestamps
    fields: dict[str, str]


class NotifyListener:
    """Binds ``path`` as an AF_UNIX datagram socket and records every datagram sent to it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.datagrams: list[Datagram] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.settimeout(0.1)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            fields = dict(
                line.split("=", 1) for line in data.decode().splitlines() if "=" in line
            )
            with self._lock:
                self.datagrams.append(Datagram(time.time(), fields))

    def having(self, key: str, value: str | None = None) -> list[Datagram]:
        with self._lock:
            return [
                d for d in self.datagrams
                if key in d.fields and (value is None or d.fields[key] == value)
            ]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()


def _ts(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00")).timestamp()


@pytest.fixture(scope="class")
def make_workspace() -> Iterator[Callable[..., ServiceWorkspace]]:
    with workspaces() as make:
        yield make


@pytest.fixture(scope="class")
def emulators(make_workspace: Callable[..., ServiceWorkspace]) -> Iterator[
    Callable[..., EmulatorThread]
]:
    """Start emulators (demo rules, fixed seed) for one class; all stopped afterwards."""
    started: list[EmulatorThread] = []

    def start(**overrides: Any) -> EmulatorThread:
        values: dict[str, Any] = {"seed": 1234, "rules": RULES_PATH, **overrides}
        emulator = EmulatorThread(EmulatorConfig(**values)).start()
        started.append(emulator)
        return emulator

    yield start
    for emulator in reversed(started):
        emulator.stop()


# -- 1. sd_notify around a recovery ------------------------------------------------------


@dataclass
class NotifyRun:
    workspace: ServiceWorkspace
    daemon: RunningDaemon
    datagrams: list[Datagram]
    exit_code: int
    sigterm_at: float
    sigterm_wall: float
    exited_at: float
    stats: dict[str, Any] = field(default_factory=dict)


@pytest.fixture(scope="class")
def notify_run(
    make_workspace: Callable[..., ServiceWorkspace],
    emulators: Callable[..., EmulatorThread],
) -> Iterator[NotifyRun]:
    """
    A run killed right after its first create (the batch exists, the manifest does not
    know its id), then a daemon-mode restart under a notify socket with a watchdog,
    stopped by SIGTERM once every row is in the sink and a STATUS= line was sent.
    """
    emulator = emulators(latency=0.5)
    ws = make_workspace(emulator.base_url, "notify")
    ws.write_tickets("tickets", 40)
    ws.write_config(ws.pipeline(max_requests=20))
    crashed = ws.run("run", "@config", "--until-drained", "--log-format", "json",
                     env={"BATCHD_CRASH_AT": "after_create"})
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    listener = NotifyListener(ws.root / "notify")
    try:
        daemon = ws.start(env={"NOTIFY_SOCKET": str(listener.path),
                               "WATCHDOG_USEC": str(WATCHDOG_USEC), "WATCHDOG_PID": None})
        wait_until(lambda: len(ws.sink_keys()) == 40, 60, "all 40 rows in the sink")
        wait_until(lambda: listener.having("STATUS") and any(
            "tickets" in d.fields["STATUS"] for d in listener.having("STATUS")
        ), 20, "a STATUS= line naming the pipeline")
        sigterm_at, sigterm_wall = time.monotonic(), time.time()
        daemon.signal(signal.SIGTERM)
        code = daemon.wait(15)
        exited_at = time.monotonic()
        time.sleep(0.2)  # a datagram sent just before exit is already queued; let it land
    finally:
        listener.close()
    yield NotifyRun(ws, daemon, listener.datagrams, code, sigterm_at, sigterm_wall, exited_at,
                    emulator.stats())


class TestSystemdNotify:
    def test_ready_sent_once(self, notify_run: NotifyRun) -> None:
        """READY=1 is sent exactly once, after the manifest was replayed, before STOPPING=1."""
        ready = [d for d in notify_run.datagrams if d.fields.get("READY") == "1"]
        assert len(ready) == 1, notify_run.datagrams
        started = notify_run.daemon.find("pipelines started")
        assert len(started) == 1 and started[0]["live_chunks"] == 2
        assert ready[0].at >= _ts(started[0])
        stopping = [d for d in notify_run.datagrams if d.fields.get("STOPPING") == "1"]
        assert stopping and stopping[0].at >= ready[0].at

    def test_ready_waits_for_recovery(self, notify_run: NotifyRun) -> None:
        """READY=1 comes only after the batch created before the crash was adopted."""
        ready = [d for d in notify_run.datagrams if d.fields.get("READY") == "1"]
        adopted = notify_run.daemon.find(
            "adopted a batch created before a crash or lost response"
        )
        assert len(adopted) == 1, notify_run.daemon.tail()
        assert ready[0].at >= _ts(adopted[0]), (
            f"READY=1 at {ready[0].at:.3f} came before the in-flight batch was adopted "
            f"at {_ts(adopted[0]):.3f}"
        )

    def test_watchdog_pings_at_half_the_interval(self, notify_run: NotifyRun) -> None:
        """WATCHDOG=1 arrives repeatedly, about every WATCHDOG_USEC / 2."""
        pings = [d.at for d in notify_run.datagrams if d.fields.get("WATCHDOG") == "1"]
        assert len(pings) >= 10, f"only {len(pings)} watchdog pings"
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        half = WATCHDOG_USEC / 1e6 / 2
        assert half * 0.75 <= statistics.median(gaps) <= half * 1.75, gaps
        # Lenient bounds: a busy test machine may delay a tick; a stopped loop is the bug.
        assert max(gaps) < 2.0, f"a gap of {max(gaps):.2f}s"
        assert pings[-1] > notify_run.sigterm_wall - 2.0, "the pings stopped before SIGTERM"

    def test_status_line_names_the_pipeline(self, notify_run: NotifyRun) -> None:
        """A STATUS= line reports the pipeline's progress."""
        lines = [d.fields["STATUS"] for d in notify_run.datagrams if "STATUS" in d.fields]
        assert any("tickets:" in line and "rows done" in line for line in lines), lines

    def test_sigterm_sends_stopping_and_exits_0(self, notify_run: NotifyRun) -> None:
        """SIGTERM brings STOPPING=1 and a clean exit 0 within a few seconds."""
        assert notify_run.exit_code == 0, notify_run.daemon.tail()
        stopping = [d for d in notify_run.datagrams if d.fields.get("STOPPING") == "1"]
        assert len(stopping) == 1
        assert notify_run.exited_at - notify_run.sigterm_at < 5.0
        assert notify_run.daemon.find("batchd stopped", reason="signal")

    def test_recovery_sends_nothing_twice(self, notify_run: NotifyRun) -> None:
        """Every row lands once and the emulator saw each request once, in two batches."""
        assert set(notify_run.workspace.sink_keys().values()) == {1}
        received = notify_run.stats["received"]
        assert len(received) == 40 and set(received.values()) == {1}
        assert notify_run.stats["batches_created"] == 2


# -- 2. SIGTERM with batches in flight ---------------------------------------------------


@dataclass
class StopRun:
    workspace: ServiceWorkspace
    daemon: RunningDaemon
    exit_code: int
    stop_seconds: float
    restart_events: list[dict[str, Any]]
    stats: dict[str, Any]


@pytest.fixture(scope="class")
def stop_run(
    make_workspace: Callable[..., ServiceWorkspace],
    emulators: Callable[..., EmulatorThread],
) -> Iterator[StopRun]:
    """
    A daemon stopped by SIGTERM while its three batches are still processing (they take
    ten virtual minutes), then, the emulator's clock moved on, ``--until-drained`` to
    finish the job.
    """
    emulator = emulators(latency=600.0)
    ws = make_workspace(emulator.base_url, "sigterm")
    ws.write_tickets("tickets", 60)
    ws.write_config(ws.pipeline(max_requests=20))
    daemon = ws.start()
    submitted = daemon.wait_for("batch submitted", count=3, timeout=60)
    sent_at = time.monotonic()
    daemon.signal(signal.SIGTERM)
    code = daemon.wait(15)
    stop_seconds = time.monotonic() - sent_at
    assert len(submitted) == 3
    emulator.advance_clock(601)
    restart = ws.run_drained()
    events = [json.loads(line) for line in restart.stdout.splitlines() if line.startswith("{")]
    yield StopRun(ws, daemon, code, stop_seconds, events, emulator.stats())


class TestGracefulStop:
    def test_exits_0_promptly(self, stop_run: StopRun) -> None:
        """SIGTERM with batches in flight exits 0 in seconds, without waiting for them."""
        assert stop_run.exit_code == 0, stop_run.daemon.tail()
        assert stop_run.stop_seconds < 5.0
        assert not stop_run.daemon.find("batch ended")
        assert stop_run.daemon.find("batchd stopped", reason="signal")

    def test_restart_reattaches_instead_of_resubmitting(self, stop_run: StopRun) -> None:
        """The restart polls the three batches it had; it creates none of its own."""
        events = [e["event"] for e in stop_run.restart_events]
        assert "batch submitted" not in events
        assert events.count("results committed") == 3
        assert stop_run.stats["batches_created"] == 3

    def test_every_key_exactly_once(self, stop_run: StopRun) -> None:
        """All 60 rows are in the sink once, and the API received each request once."""
        keys = stop_run.workspace.sink_keys()
        assert len(keys) == 60 and set(keys.values()) == {1}
        received = stop_run.stats["received"]
        assert len(received) == 60 and set(received.values()) == {1}


# -- 3. SIGHUP reload --------------------------------------------------------------------


@dataclass
class ReloadRun:
    workspace: ServiceWorkspace
    daemon: RunningDaemon
    datagrams: list[Datagram]
    exit_code: int
    alive_after_bad_reload: bool


@pytest.fixture(scope="class")
def reload_run(
    make_workspace: Callable[..., ServiceWorkspace],
    emulators: Callable[..., EmulatorThread],
) -> Iterator[ReloadRun]:
    """
    A daemon with one pipeline; SIGHUP after adding a second; SIGHUP after breaking the
    config with a typo; SIGHUP after restoring it with ``state_dir`` spelt out; SIGTERM.

    The first configs leave ``state_dir`` to its default and the last spells it out, so
    both forms are reloaded (the daemon passes its state_dir as an override).
    """
    emulator = emulators()
    ws = make_workspace(emulator.base_url, "reload")
    ws.write_tickets("tickets", 30)
    ws.write_tickets("orders", 25, seed=11)
    ws.write_config(ws.pipeline("tickets"), name_state_dir=False)
    listener = NotifyListener(ws.root / "notify")
    try:
        daemon = ws.start(env={"NOTIFY_SOCKET": str(listener.path)})
        wait_until(lambda: len(ws.sink_keys("tickets")) == 30, 60, "tickets in the sink")
        ws.write_config(ws.pipeline("tickets"), ws.pipeline("orders"), name_state_dir=False)
        daemon.signal(signal.SIGHUP)
        daemon.wait_for("config reloaded")
        wait_until(lambda: len(ws.sink_keys("orders")) == 25, 60, "orders in the sink")
        good = ws.config_path.read_text()
        ws.config_path.write_text(good.replace("max_requests", "max_requestz", 1))
        daemon.signal(signal.SIGHUP)
        daemon.wait_for("reload failed; keeping the running config")
        daemon.wait_for("pipelines started", count=3)
        time.sleep(0.3)
        alive = daemon.proc.poll() is None
        ws.write_config(ws.pipeline("tickets"), ws.pipeline("orders"))
        daemon.signal(signal.SIGHUP)
        daemon.wait_for("pipelines started", count=4)
        daemon.signal(signal.SIGTERM)
        code = daemon.wait(15)
        time.sleep(0.2)
    finally:
        listener.close()
    yield ReloadRun(ws, daemon, listener.datagrams, code, alive)


class TestReload:
    def test_sighup_starts_the_added_pipeline(self, reload_run: ReloadRun) -> None:
        """After SIGHUP the new pipeline's rows reach its sink, and nothing is redone."""
        orders = reload_run.workspace.sink_keys("orders")
        tickets = reload_run.workspace.sink_keys("tickets")
        assert len(orders) == 25 and set(orders.values()) == {1}
        assert len(tickets) == 30 and set(tickets.values()) == {1}
        reloaded = reload_run.daemon.find("config reloaded")
        assert reloaded[0]["pipelines"] == ["tickets", "orders"]

    def test_broken_config_is_logged_and_ignored(self, reload_run: ReloadRun) -> None:
        """A typo sent with SIGHUP is logged as "reload failed" naming the key; both
        pipelines keep running."""
        failed = [
            e for e in reload_run.daemon.find("reload failed; keeping the running config")
            if "max_requestz" in e["error"]
        ]
        assert len(failed) == 1, reload_run.daemon.tail()
        assert failed[0]["level"] == "error"
        assert reload_run.alive_after_bad_reload
        after = reload_run.daemon.find("pipelines started")[2]
        assert after["pipelines"] == ["tickets", "orders"]

    def test_sigterm_after_reloads_exits_0(self, reload_run: ReloadRun) -> None:
        """The reloaded daemon still stops cleanly on SIGTERM."""
        assert reload_run.exit_code == 0, reload_run.daemon.tail()

    def test_reload_is_announced_to_systemd(self, reload_run: ReloadRun) -> None:
        """Each SIGHUP sends RELOADING=1 with MONOTONIC_USEC, then READY=1 again."""
        sequence = [
            key for d in reload_run.datagrams for key in ("READY", "RELOADING", "STOPPING")
            if d.fields.get(key) == "1"
        ]
        assert sequence == ["READY", *(["RELOADING", "READY"] * 3), "STOPPING"]
        reloading = [d for d in reload_run.datagrams if d.fields.get("RELOADING") == "1"]
        assert all(int(d.fields["MONOTONIC_USEC"]) > 0 for d in reloading)

    def test_reload_of_config_naming_state_dir(self, reload_run: ReloadRun) -> None:
        """A config that spells out its (unchanged) state_dir reloads like any other."""
        assert len(reload_run.daemon.find("config reloaded")) == 2, reload_run.daemon.tail()


# -- 4. Prometheus metrics ------------------------------------------------------------------


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """One scrape of ``/metrics`` parsed into {(sample name, sorted labels): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _sample(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
            **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


@dataclass
class OperatorRun:
    workspace: ServiceWorkspace
    daemon: RunningDaemon
    early: dict[tuple[str, tuple[tuple[str, str], ...]], float]
    late: dict[tuple[str, tuple[tuple[str, str], ...]], float]
    exit_code: int
    stats: dict[str, Any]


# Module scope: TestMetrics and TestSecrets read the same run.
@pytest.fixture(scope="module")
def operator_run() -> Iterator[OperatorRun]:
    """
    A daemon as an operator would debug it: ``[metrics] port``, a real-looking API key,
    JSON logs at debug level with the SDK's own debug logging on, HTTP 500s and
    invalid-request rejections from the API, two malformed CSV rows. Scraped before its
    first result (batches take ten virtual minutes) and after its last (the emulator's
    clock moved on), then stopped with SIGTERM.
    """
    faults = {"http500": 0.2, "invalid_request": 0.1}
    config = EmulatorConfig(seed=1234, rules=RULES_PATH, latency=600.0, faults=faults)
    emulator = EmulatorThread(config).start()
    try:
        with workspaces() as make:
            ws: ServiceWorkspace = make(emulator.base_url, "operator")
            ws.write_tickets("tickets", 50, bad_rows=True)
            port = free_port()
            ws.write_config(ws.pipeline(max_requests=20), metrics_port=port)
            daemon = ws.start("--log-level", "debug",
                              env={"ANTHROPIC_API_KEY": SECRET, "ANTHROPIC_LOG": "debug"})
            daemon.wait_for("batch submitted", count=3, timeout=60)
            early = _scrape(port)
            emulator.advance_clock(601)

            def terminal() -> int:
                return sum(ws.sink_keys().values()) + sum(ws.dead_keys().values()) == 52

            wait_until(terminal, 60, "all 52 rows in the result or dead-letter sink")

            def settled() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
                samples = _scrape(port)
                done = _sample(samples, "batchd_requests_total", outcome="succeeded",
                               pipeline="tickets")
                return samples if done == len(ws.sink_rows()) else {}

            late = wait_until(settled, 10, "batchd_requests_total to match the sink", 0.2)
            daemon.signal(signal.SIGTERM)
            code = daemon.wait(15)
            yield OperatorRun(ws, daemon, early, late, code, emulator.stats())
    finally:
        emulator.stop()


class TestMetrics:
    def test_series_exist_at_zero_before_any_result(self, operator_run: OperatorRun) -> None:
        """The pipeline's counters are exported at 0 from the start (so increase() sees the
        first result)."""
        early = operator_run.early
        for outcome in ("succeeded", "dead_letter", "retried", "truncated"):
            assert _sample(early, "batchd_requests_total", outcome=outcome,
                           pipeline="tickets") == 0.0
        assert _sample(early, "batchd_cost_usd_total", pipeline="tickets") == 0.0
        assert _sample(early, "batchd_tokens_total", direction="input", pipeline="tickets") == 0

    def test_request_counts_match_the_sinks(self, operator_run: OperatorRun) -> None:
        """succeeded, results_rows and dead_letter counters equal what the sinks hold."""
        late, ws = operator_run.late, operator_run.workspace
        rows = len(ws.sink_rows())
        assert 30 <= rows < 50  # the invalid_request fault took some
        assert _sample(late, "batchd_requests_total", outcome="succeeded",
                       pipeline="tickets") == rows
        assert _sample(late, "batchd_results_rows_total", pipeline="tickets") == rows
        dead = sum(ws.dead_keys().values())
        assert dead == 52 - rows
        assert _sample(late, "batchd_requests_total", outcome="dead_letter",
                       pipeline="tickets") == dead
        assert _sample(late, "batchd_dead_letters_total", pipeline="tickets") == dead

    def test_tokens_and_cost_match_the_sinks(self, operator_run: OperatorRun) -> None:
        """Token and cost counters are the sums of the sink rows' usage and cost."""
        late, rows = operator_run.late, operator_run.workspace.sink_rows()
        input_tokens = sum(r["input_tokens"] for r in rows)
        output_tokens = sum(r["output_tokens"] for r in rows)
        assert input_tokens > 0 and output_tokens > 0
        assert _sample(late, "batchd_tokens_total", direction="input",
                       pipeline="tickets") == input_tokens
        assert _sample(late, "batchd_tokens_total", direction="output",
                       pipeline="tickets") == output_tokens
        cost = _sample(late, "batchd_cost_usd_total", pipeline="tickets")
        assert cost is not None and cost > 0
        assert cost == pytest.approx(sum(r["cost_usd"] for r in rows), rel=1e-6)

    def test_process_memory_is_exported(self, operator_run: OperatorRun) -> None:
        """The daemon's own resident memory is scraped alongside the batch series."""
        rss = _sample(operator_run.late, "process_resident_memory_bytes")
        assert rss is not None and rss > 10_000_000

    def test_daemon_stops_cleanly(self, operator_run: OperatorRun) -> None:
        """After the scrapes, SIGTERM still ends the daemon with exit 0."""
        assert operator_run.exit_code == 0, operator_run.daemon.tail()


class TestSecrets:
    def test_every_line_goes_through_batchd_logging(self, operator_run: OperatorRun) -> None:
        """With --log-format json every output line is a JSON event (so it was redacted)."""
        daemon = operator_run.daemon
        lines = [
            line for path in (daemon.stdout_path, daemon.stderr_path)
            for line in path.read_text().splitlines() if line.strip()
        ]
        assert lines
        not_json = [line for line in lines if not line.startswith("{")]
        assert not_json == [], not_json[:3]

    def test_errors_were_logged(self, operator_run: OperatorRun) -> None:
        """The faults fired and were logged (otherwise the next tests prove nothing)."""
        injected = operator_run.stats["faults_injected"]
        assert injected.get("http500", 0) > 0 and injected.get("invalid_request", 0) > 0
        output = operator_run.daemon.output()
        assert "500 Internal Server Error" in output
        assert '"event":"api call retried"' in output

    def test_api_key_never_in_output(self, operator_run: OperatorRun) -> None:
        """stdout and stderr never contain the API key, nor a recognisable part of it."""
        output = operator_run.daemon.output()
        assert SECRET not in output
        assert "secretvalue-0123456789" not in output

    def test_api_key_never_written_to_disk(self, operator_run: OperatorRun) -> None:
        """No file batchd wrote (manifest, spool, sinks, dead letters) holds the key."""
        written = [p for p in operator_run.workspace.root.rglob("*") if p.is_file()]
        assert any("dead" in str(p) for p in written)
        leaks = [p for p in written if SECRET.encode() in p.read_bytes()]
        assert leaks == []

    def test_key_pasted_into_the_config_is_refused_unechoed(
        self, service: Callable[..., ServiceWorkspace]
    ) -> None:
        """``api_key`` in the config is a config error (exit 2) that names the key, not
        its value."""
        ws = service()
        ws.write_config(ws.pipeline(), api={"api_key": SECRET})
        run = ws.run("status", "@config")
        assert run.returncode == 2, describe(run)
        assert "api_key" in run.stderr and "ANTHROPIC_API_KEY" in run.stderr
        assert SECRET not in run.stdout + run.stderr
