"""
The cluster as an operator sees it: ``batchd status`` (text and ``--json``), each
worker's ``/metrics`` and its dashboard show every worker, its heartbeat and what
it owns, and the pipeline's progress across all workers, read from the shared store.

Real PostgreSQL, real ``batchd run`` workers (tests/fixtures/cluster_workers.py) and
an emulator whose batches take ten minutes, so the workers sit with their chunks
submitted while they are looked at. A SIGKILLed worker turns ``dead`` on every view.
A worker whose database link is cut (a loopback proxy) keeps serving its metrics and
dashboard, saying the cluster view is stale; ``batchd status`` against a database
that does not answer is one line naming ``user@host:port/db`` and exit 1.
"""

from __future__ import annotations

import asyncio
import json
import os
import pty
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from urllib.parse import urlsplit

import anyio
import pytest
from prometheus_client.parser import text_string_to_metric_families

from batchd.daemon.cluster import workers
from batchd.daemon.emulator import EmulatorThread
from tests.fixtures.cluster import ClusterEnv
from tests.fixtures.cluster_workers import Cluster, wait_for
from tests.fixtures.engine import BATCHD, REPO, Workspace
from tests.fixtures.service import free_port
from tests.fixtures.tcp_proxy import TcpProxy, proxied_dsn

CHROMIUM = shutil.which("chromium")
TMUX = shutil.which("tmux")
LATENCY = 600.0  # the emulator's batches end long after the test


@pytest.fixture
def emulator(emulator_factory: Callable[..., EmulatorThread]) -> EmulatorThread:
    """Batches that stay in flight while the workers are looked at."""
    return emulator_factory(latency=LATENCY)


def with_metrics(cluster: Cluster) -> list[int]:
    """Give each worker its own metrics port (the dashboard is served there too)."""
    ports = []
    for ws in cluster.workers:
        port = free_port()
        ws.config_path.write_text(ws.config_path.read_text() + f"\n[metrics]\nport = {port}\n")
        ports.append(port)
    return ports


def batchd_status(config: Path, env: dict[str, str],
                  *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*BATCHD, "status", str(config), *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def observer(cluster: Cluster, root: Path) -> Path:
    """Worker 0's config in a directory of its own: a state dir nobody ever wrote."""
    root.mkdir()
    path = root / "pipeline.toml"
    path.write_text(cluster.workers[0].config_path.read_text())
    return path


class PtyWorker:
    """A worker whose stdout is a terminal, so it logs its progress; its JSON log events."""

    def __init__(self, cluster: Cluster, i: int) -> None:
        ws = cluster.workers[i]
        master, slave = pty.openpty()
        self.proc = subprocess.Popen(
            ws.command("run", str(ws.config_path), "--until-drained", "--log-format", "json"),
            cwd=ws.root, env=cluster.env(ws), stdin=subprocess.DEVNULL, stdout=slave,
            stderr=slave)
        os.close(slave)
        cluster.procs[i] = self.proc  # stopped with the others
        self.master = master
        self.chunks: list[bytes] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.master, 65536)
            except OSError:
                return
            if not data:
                return
            self.chunks.append(data)

    def events(self, name: str) -> list[dict[str, object]]:
        found = []
        for line in b"".join(self.chunks).decode(errors="replace").splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and event.get("event") == name:
                found.append(event)
        return found

    def worker_id(self) -> str:
        (opened,) = self.events("cluster store open")
        return str(opened["worker"])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.thread.join(10)
        os.close(self.master)


class WatchScreen:
    """``batchd status --watch`` in a real terminal (tmux on a server of its own)."""

    def __init__(self, config: Path, env: dict[str, str]) -> None:
        self.socket = f"batchd-view-{time.monotonic_ns()}"
        command = " ".join([*BATCHD, "status", str(config), "--watch", "--interval", "0.5"])
        subprocess.run(["tmux", "-L", self.socket, "new-session", "-d", "-x", "160", "-y", "50",
                        command], env=env, cwd=REPO, check=True, timeout=30)

    def screen(self) -> str:
        return subprocess.run(["tmux", "-L", self.socket, "capture-pane", "-p"],
                              capture_output=True, text=True, timeout=30).stdout

    def wait_for(self, text: str, timeout: float = 20) -> None:
        end = time.monotonic() + timeout
        while text not in self.screen():
            if time.monotonic() > end:
                pytest.fail(f"{text!r} not on screen:\n{self.screen()}")
            time.sleep(0.2)

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], timeout=30, check=False)


@pytest.fixture
def terminals() -> Iterator[list[WatchScreen | PtyWorker]]:
    """Terminals a test opens, closed after it whatever happens."""
    opened: list[WatchScreen | PtyWorker] = []
    yield opened
    for terminal in opened:
        terminal.close()


def get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return reply.status, reply.read().decode()


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a worker's /metrics, by (name, sorted labels)."""
    code, text = get(f"http://127.0.0.1:{port}/metrics")
    assert code == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def sample(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
           **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def chromium_dom(url: str, profile: Path) -> str:
    assert CHROMIUM is not None
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", "--dump-dom", url],
        capture_output=True, text=True, timeout=90, check=True).stdout


def worker_rows(dom: str) -> dict[str, str]:
    """worker id -> state, from the dashboard's cluster table."""
    import html.parser

    found: dict[str, str] = {}

    class Rows(html.parser.HTMLParser):
        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            a = dict(attrs)
            if tag == "tr" and a.get("data-worker") and a.get("data-state"):
                found[a["data-worker"] or ""] = a["data-state"] or ""

    Rows().feed(dom)
    return found


class TestRunningWorkers:
    def test_status_metrics_and_dashboard_show_every_worker(
        self, cluster_factory: Callable[..., Cluster], tmp_path: Path,
        terminals: list[WatchScreen | PtyWorker],
    ) -> None:
        cluster = cluster_factory()
        ports = with_metrics(cluster)
        for i in range(2):
            cluster.start(i)
        terminal = PtyWorker(cluster, 2)  # the third logs its progress to a terminal
        terminals.append(terminal)
        wait_for("six batches submitted", lambda: cluster.batches_submitted() >= 6)
        wait_for("the third worker open", lambda: terminal.events("cluster store open"))
        ids = [cluster.worker_id(0), cluster.worker_id(1), terminal.worker_id()]
        env = cluster.env(cluster.workers[0])
        config = observer(cluster, tmp_path / "observer")

        proc = batchd_status(config, env, "--json")
        assert proc.returncode == 0, proc.stderr
        status = json.loads(proc.stdout)
        assert status["store"] == "postgres"
        view = status["cluster"]
        by_id = {w["worker_id"]: w for w in view["workers"]}
        assert set(by_id) == set(ids)
        assert {w["state"] for w in by_id.values()} == {"alive"}
        assert all(0 <= w["heartbeat_age"] < w["lease_ttl"] == 3.0 for w in by_id.values())
        # The progress is the cluster's, read from the store: this state dir is empty.
        (p,) = status["pipelines"]
        assert not (tmp_path / "observer" / "state").exists()
        assert p["batches_submitted"] >= 6 and p["rows_read"] >= 300
        assert p["ledger_keys"] >= p["rows_read"]
        owned = {c["chunk"]: wid for wid, w in by_id.items() for c in w["chunks"]}
        assert {b["chunk"]: b["owner"] for b in p["batches"] if b["owner"]} == owned
        assert len({b["owner"] for b in p["batches"] if b["stage"] == "submitted"}) >= 2
        reader = [wid for wid, w in by_id.items()
                  if any(h["pipeline"] == "tickets" for h in w["shards"])]
        assert len(reader) == 1  # (the stray sweeper's lease is a shard row too)
        (queue,) = [c for c in view["limits"] if c["scope"] == "queue:default"]
        in_queue = sum(b["requests"] for b in p["batches"] if b["stage"] in ("intent", "submitted"))
        assert queue["reserved"] == in_queue > 0  # one snapshot: the limits and the chunks

        proc = batchd_status(config, {**env, "COLUMNS": "160"})  # a person's terminal
        assert proc.returncode == 0, proc.stderr
        text = proc.stdout
        (tmp_path / "status.txt").write_text(text)
        assert "cluster: 3 workers (3 alive)" in text, text
        for wid in ids:
            assert wid in text, text

        # Each worker's endpoint exports the whole cluster, and names itself. A worker reads
        # the cluster's overview every ttl/3 (1 s here): a worker started a second ago may
        # still export the cluster as it was before the batches, so each port is read again
        # until it shows them (batches stay in flight for the whole test).
        def caught_up(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
            samples = scrape(port)
            reserved = sample(samples, "batchd_cluster_limit_reserved", scope="queue:default")
            held = sample(samples, "batchd_cluster_worker_shards", worker=reader[0])
            alive = sample(samples, "batchd_cluster_workers", state="alive")
            return samples if (reserved or 0.0) > 0 and (held or 0.0) >= 1 and alive == 3 else {}

        for i, port in enumerate(ports):
            wait_for(f"worker {i}'s metrics to show the cluster", partial(caught_up, port), 15)
            samples = scrape(port)
            assert sample(samples, "batchd_cluster_store_up") == 1.0
            assert sample(samples, "batchd_cluster_self", worker=ids[i]) == 1.0
            assert sample(samples, "batchd_cluster_workers", state="alive") == 3.0
            for wid in ids:
                assert sample(samples, "batchd_cluster_worker_state", worker=wid,
                              state="alive") == 1.0
                age = sample(samples, "batchd_cluster_worker_heartbeat_age_seconds", worker=wid)
                assert age is not None and 0 <= age < 3.0
                assert sample(samples, "batchd_cluster_worker_chunks", worker=wid) is not None
                assert sample(samples, "batchd_cluster_worker_fenced_total", worker=wid) == 0.0
            held = sample(samples, "batchd_cluster_worker_shards", worker=reader[0])
            assert held is not None and held >= 1.0  # the source's (and maybe the sweeper's)
            assert sample(samples, "batchd_cluster_limit_reserved", scope="queue:default")

        # The dashboard of a worker that does not read the source shows the cluster's
        # progress and every worker.
        if CHROMIUM is not None:
            other = next(i for i, wid in enumerate(ids) if wid != reader[0])
            dom = chromium_dom(f"http://127.0.0.1:{ports[other]}/", tmp_path / "profile")
            assert worker_rows(dom) == dict.fromkeys(ids, "alive")
            assert 'data-field="rows_read"' in dom
            read = int(dom.split('data-field="rows_read" data-value="', 1)[1].split('"', 1)[0])
            assert read >= 300
            assert "(this one)" in dom and "<th>owner</th>" in dom

        # --watch in a terminal: the workers first (what does not fit is cropped).
        watch = WatchScreen(config, env) if TMUX is not None else None
        if watch is not None:
            terminals.append(watch)
            watch.wait_for("cluster: 3 workers (3 alive)")
            for wid in ids:
                watch.wait_for(wid)

        # The terminal's progress line is the cluster's too: one worker holds at most
        # three chunks of 50 requests, the cluster about twelve.
        wait_for("the cluster's rows in flight on the terminal", lambda: any(
            int(str(e["rows_in_flight"])) >= 300 for e in terminal.events("progress")),
            timeout=20)

        # A SIGKILLed worker is silent, then dead, on every view.
        victim = cluster.procs[2]
        assert victim is not None
        victim.send_signal(signal.SIGKILL)
        victim.wait()

        def dead() -> bool:
            status = json.loads(batchd_status(config, env, "--json").stdout)
            return {w["worker_id"]: w["state"] for w in status["cluster"]["workers"]
                    }[ids[2]] == "dead"

        wait_for("the killed worker shown dead", dead, timeout=20)
        text = batchd_status(config, {**env, "COLUMNS": "160"}).stdout
        assert "cluster: 3 workers (2 alive)" in text
        assert f"{ids[2]} │ dead" in text, text
        wait_for("a survivor's metrics showing it dead", lambda: sample(
            scrape(ports[0]), "batchd_cluster_worker_state", worker=ids[2], state="dead") == 1.0,
            timeout=10)
        samples = scrape(ports[0])
        assert sample(samples, "batchd_cluster_workers", state="dead") == 1.0
        if watch is not None:
            watch.wait_for("cluster: 3 workers (2 alive)")
        assert sample(samples, "batchd_cluster_worker_state", worker=ids[0], state="alive") == 1.0


class _ProxyThread:
    """A :class:`TcpProxy` on its own event loop, for a worker in another process."""

    def __init__(self, host: str, port: int) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.proxy = TcpProxy(host, port)
        asyncio.run_coroutine_threadsafe(self.proxy.start(), self.loop).result(10)

    def call(self, fn: Callable[[], None]) -> None:
        self.loop.call_soon_threadsafe(fn)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.proxy.aclose(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def proxy_thread(pg_dsn: str) -> Iterator[_ProxyThread]:
    target = urlsplit(pg_dsn)
    proxy = _ProxyThread(target.hostname or "127.0.0.1", target.port or 5432)
    try:
        yield proxy
    finally:
        proxy.close()


class TestDatabaseAway:
    def test_a_worker_cut_from_the_database_keeps_serving_its_metrics(
        self, cluster_factory: Callable[..., Cluster], proxy_thread: _ProxyThread,
        tmp_path: Path,
    ) -> None:
        cluster = cluster_factory(workers=1)
        (port,) = with_metrics(cluster)
        cluster.dsn = proxied_dsn(cluster.dsn, proxy_thread.proxy)  # the worker's link
        cluster.start(0)
        wait_for("the worker's view read", lambda: _up(port) == 1.0, timeout=30)
        me = cluster.worker_id(0)
        assert sample(scrape(port), "batchd_cluster_worker_state", worker=me, state="alive") == 1.0
        log = cluster.workers[0].root / "run.log"
        wait_for("the worker started", lambda: "pipelines started" in log.read_text(), timeout=30)

        proxy_thread.call(proxy_thread.proxy.cut)
        wait_for("the view's read failing", lambda: _up(port) == 0.0, timeout=30)
        samples = scrape(port)  # still served, the last view kept and said to be stale
        assert sample(samples, "batchd_cluster_store_read_failures_total")
        assert sample(samples, "batchd_cluster_worker_state", worker=me, state="alive") == 1.0
        stale = sample(samples, "batchd_cluster_view_age_seconds")
        assert stale is not None and stale > 0
        code, page = get(f"http://127.0.0.1:{port}/")
        assert code == 200
        assert "cannot read the cluster's database since" in page
        assert "pw" not in page.split("cannot read", 1)[1].split("</p>", 1)[0]

        proxy_thread.call(proxy_thread.proxy.restore)
        wait_for("the view read again", lambda: _up(port) == 1.0, timeout=30)
        proc = cluster.procs[0]
        assert proc is not None and proc.poll() is None  # it outlived the cut


def _up(port: int) -> float | None:
    try:
        return sample(scrape(port), "batchd_cluster_store_up")
    except OSError:
        return None  # not listening yet


class TestStatusWithoutTheDatabase:
    @pytest.mark.parametrize("json_flag", [(), ("--json",)])
    def test_one_line_naming_the_dsn_and_exit_1(self, tmp_path: Path,
                                                json_flag: tuple[str, ...]) -> None:
        ws = Workspace(tmp_path)
        config = _status_config(tmp_path, "batchd")
        port = free_port()  # nothing listens there
        dsn = f"postgresql://batchd:pw-not-shown@127.0.0.1:{port}/cluster"
        started = time.monotonic()
        proc = batchd_status(config, {**ws.env(), "VIEW_DSN": dsn}, *json_flag)
        assert time.monotonic() - started < 15
        assert proc.returncode == 1, (proc.stdout, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, proc.stderr
        assert f"[cluster]: dsn: cannot connect to batchd@127.0.0.1:{port}/cluster" in lines[0]
        assert "pw-not-shown" not in proc.stderr + proc.stdout
        assert proc.stdout == ""
        assert not (tmp_path / "state").exists()


def _status_config(root: Path, schema: str) -> Path:
    ws = Workspace(root)
    ws.write_tickets(3)
    return ws.write_raw(
        'state_dir = "state"\n'
        f'[cluster]\nstore = "postgres"\ndsn = "env:VIEW_DSN"\nschema = "{schema}"\n'
        '[[pipeline]]\nname = "tickets"\n[pipeline.source]\ntype = "csv"\n'
        'path = "tickets.csv"\nkey = "ticket_id"\n[pipeline.request]\n'
        'model = "claude-haiku-4-5"\nmax_tokens = 8\nuser = "{body}"\n'
        '[[pipeline.sink]]\ntype = "jsonl"\npath = "out/labels"\n')


@pytest.mark.anyio
class TestStoppedWorkers:
    async def test_long_stopped_workers_are_counted_not_listed_in_the_text(
        self, cluster: ClusterEnv, tmp_path: Path,
    ) -> None:
        """Every restart is a new worker row: the text views list the recent ones only."""
        live = await cluster.worker("live")
        recent = await cluster.worker("recent")
        old = await cluster.worker("old")
        for gone in (recent, old):
            await workers.deregister(cluster.conn, cluster.sql, gone)
        await cluster.silence(old, 7200.0)
        config = _status_config(tmp_path, cluster.sql.schema)
        env = {**Workspace(tmp_path).env(), "VIEW_DSN": cluster.dsn, "COLUMNS": "160"}

        def run(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([*BATCHD, *args, str(config)], env=env, cwd=REPO,
                                  capture_output=True, text=True, timeout=60)

        proc = await anyio.to_thread.run_sync(lambda: run("status", "--json"))
        assert proc.returncode == 0, proc.stderr
        states = {w["worker_id"]: w["state"]
                  for w in json.loads(proc.stdout)["cluster"]["workers"]}
        assert states == {live: "alive", recent: "stopped", old: "stopped"}
        for args in (("status",), ("cluster", "status")):
            proc = await anyio.to_thread.run_sync(lambda args=args: run(*args))
            assert proc.returncode == 0, proc.stderr
            assert live in proc.stdout and recent in proc.stdout, proc.stdout
            assert old not in proc.stdout
            assert "and 1 workers stopped over an hour ago" in proc.stdout

    def test_an_uninitialised_schema_is_exit_2_naming_it(
        self, tmp_path: Path, pg_dsn: str, pg_schema: str,
    ) -> None:
        config = _status_config(tmp_path, pg_schema)
        proc = batchd_status(config, {**Workspace(tmp_path).env(), "VIEW_DSN": pg_dsn})
        assert proc.returncode == 2, proc.stderr
        (line,) = proc.stderr.strip().splitlines()
        assert "[cluster]: schema:" in line and "batchd cluster init" in line
