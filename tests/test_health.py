"""
/healthz, /readyz and the rest of the metrics port, over real HTTP.

The liveness check is proven against a really wedged event loop (a blocking call on
it), with the real web app serving from its own thread; the daemon-level checks run
``batchd run`` as a process with ``[metrics] port`` set.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from batchd.daemon.emulator import EmulatorConfig, EmulatorThread
from batchd.daemon.ops.health import Health
from batchd.daemon.ops.metrics import Metrics
from batchd.daemon.ops.web import DaemonView, LoopBridge, WebApp, start_web_server
from tests.fixtures.service import RULES_PATH, ServiceWorkspace, free_port, wait_until, workspaces


def _get(url: str, method: str = "GET") -> tuple[int, bytes, dict[str, str]]:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, answer.read(), dict(answer.headers)
    except urllib.error.HTTPError as error:
        return error.code, error.read(), dict(error.headers)


class _Daemonish:
    """The two things DaemonView reads from a daemon: its config and its live status."""

    def __init__(self) -> None:
        self.config: Any = None
        self.live: Any = None


class _Manifest:
    def __init__(self) -> None:
        from batchd.daemon.wal.manifest_state import ManifestState

        self.state = ManifestState()


@pytest.fixture
def loop_thread() -> Iterator[tuple[asyncio.AbstractEventLoop, Health]]:
    """A real asyncio loop in a thread, running the health heartbeat."""
    health = Health(stall_after=1.5)
    loop = asyncio.new_event_loop()
    ready = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.call_soon(ready.set)
        task = loop.create_task(health.heartbeat())
        try:
            loop.run_forever()
        finally:
            task.cancel()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    ready.wait(5)
    yield loop, health
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


class TestProbes:
    def test_liveness_fails_while_the_loop_is_wedged(
        self, loop_thread: tuple[asyncio.AbstractEventLoop, Health]
    ) -> None:
        """A blocking call on the loop: /healthz turns 503 and /readyz says the loop is mute;
        once the loop turns again both recover."""
        loop, health = loop_thread
        health.recovered = True
        view = DaemonView(_Daemonish(), _Manifest(), LoopBridge(loop, timeout=0.5))
        with start_web_server(WebApp(Metrics(process_metrics=False), health, view),
                              "127.0.0.1", 0) as server:
            base = server.url.removesuffix("/metrics")
            code, body, _ = _get(f"{base}/healthz")
            assert code == 200 and json.loads(body)["status"] == "ok"
            assert _get(f"{base}/readyz")[0] == 200

            release = threading.Event()
            loop.call_soon_threadsafe(release.wait, 30)  # wedges the loop until set
            try:
                code, body, _ = wait_until(
                    lambda: (r := _get(f"{base}/healthz"))[0] == 503 and r, 10, "a 503")
                assert "event loop has not turned" in json.loads(body)["detail"]
                code, body, _ = _get(f"{base}/readyz")
                assert code == 503
                assert "the event loop did not answer" in json.loads(body)["reasons"]
            finally:
                release.set()
            wait_until(lambda: _get(f"{base}/healthz")[0] == 200, 10, "liveness back")

    def test_readiness_waits_for_recovery(
        self, loop_thread: tuple[asyncio.AbstractEventLoop, Health]
    ) -> None:
        loop, health = loop_thread
        view = DaemonView(_Daemonish(), _Manifest(), LoopBridge(loop))
        with start_web_server(WebApp(Metrics(process_metrics=False), health, view),
                              "127.0.0.1", 0) as server:
            base = server.url.removesuffix("/metrics")
            code, body, _ = _get(f"{base}/readyz")
            assert code == 503 and "recovery in progress" in body.decode()
            health.recovered = True
            assert _get(f"{base}/readyz")[0] == 200

    def test_read_only_and_unknown_paths(self) -> None:
        with start_web_server(WebApp(Metrics(process_metrics=False), Health()),
                              "127.0.0.1", 0) as server:
            base = server.url.removesuffix("/metrics")
            assert _get(f"{base}/healthz", "POST")[0] == 405
            assert _get(f"{base}/-/ready")[0] == 404
            code, body, _ = _get(f"{base}/metrics")
            assert code == 200 and b"# HELP" in body

    def test_binds_only_the_configured_address(self) -> None:
        """Bound to 127.0.0.1, nothing answers on 127.0.0.2 (another loopback address)."""
        with start_web_server(WebApp(Metrics(process_metrics=False), Health()),
                              "127.0.0.1", 0) as server:
            assert _get(f"http://127.0.0.1:{server.port}/healthz")[0] == 200
            with pytest.raises(urllib.error.URLError):
                urllib.request.urlopen(f"http://127.0.0.2:{server.port}/healthz", timeout=5)


@pytest.fixture
def slow_emulator() -> Iterator[EmulatorThread]:
    emulator = EmulatorThread(EmulatorConfig(seed=5, rules=RULES_PATH, latency=600.0)).start()
    try:
        yield emulator
    finally:
        emulator.stop()


class TestDaemon:
    def test_probes_of_a_running_daemon(self, slow_emulator: EmulatorThread) -> None:
        """Ready once recovered; /healthz names batchd (validate recognises it by that)."""
        port = free_port()
        with workspaces() as make:
            ws: ServiceWorkspace = make(slow_emulator.base_url, "health")
            ws.write_tickets("tickets", 40)
            ws.write_config(ws.pipeline(max_requests=20), metrics_port=port)
            daemon = ws.start()
            daemon.wait_for("ready", timeout=60)
            base = f"http://127.0.0.1:{port}"
            code, body, _ = _get(f"{base}/healthz")
            assert code == 200 and json.loads(body)["service"] == "batchd"
            code, body, _ = _get(f"{base}/readyz")
            assert code == 200, body
            proc = ws.run("validate", "@config")  # the port is taken, by batchd itself
            assert proc.returncode == 0, proc.stdout + proc.stderr
            assert "served by a running batchd" in proc.stdout
            daemon.signal(signal.SIGTERM)
            assert daemon.wait(30) == 0
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:  # the port is released at exit
                try:
                    _get(f"{base}/healthz")
                except urllib.error.URLError:
                    break
                time.sleep(0.1)
            else:
                pytest.fail("the metrics port still answers after the daemon exited")
