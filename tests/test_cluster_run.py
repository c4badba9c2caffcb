"""
Cluster mode end to end: three real ``batchd run`` processes share one pipeline
through one PostgreSQL store (a schema per test) and one emulator (faults off).

Each worker has its own config file (its own state dir and sinks' outputs), with the
same ``[cluster]`` table and the same CSV input. Whatever the workers do, every key
must have exactly one outcome across the three workers' sinks, every custom_id must
reach the emulator exactly once, and the emulator must have exactly the batches the
store records.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import pytest

from batchd.daemon.emulator import EmulatorThread
from tests.fixtures.engine import Workspace, csv_keys, dump_toml

DSN_VAR = "BATCHD_TEST_CLUSTER_DSN"
ROWS = 1500
_DEADLINE = 40.0


def _query(dsn: str, sql: str) -> list[Any]:
    async def go() -> list[Any]:
        conn = await asyncpg.connect(dsn, timeout=10)
        try:
            return list(await conn.fetch(sql))
        finally:
            await conn.close()

    return anyio.run(go)


class Cluster:
    """Three workspaces with one [cluster] table, reading one CSV file."""

    def __init__(self, root: Path, base_url: str, dsn: str, schema: str) -> None:
        self.dsn, self.schema = dsn, schema
        self.workers = [Workspace(root / f"w{i}", base_url) for i in range(3)]
        self.input = self.workers[0].write_tickets(ROWS)
        for ws in self.workers:
            data = {
                "state_dir": "state",
                "api": {"poll_interval": "0.2s", "poll_jitter": 0.1},
                "cluster": {"store": "postgres", "dsn": f"env:{DSN_VAR}", "schema": schema,
                            "lease_ttl": "3s", "takeover_grace": "1s", "lease_margin": "0.5s"},
                "pipeline": [ws.pipeline(
                    source={"type": "csv", "path": str(self.input), "key": "ticket_id"},
                    max_requests=50, max_in_flight=3, linger="0.2s", allowed=None,
                )],
            }
            ws.write_raw(dump_toml(data))
        self.procs: list[subprocess.Popen[bytes] | None] = [None, None, None]

    def env(self, ws: Workspace) -> dict[str, str]:
        return {**ws.env(), DSN_VAR: self.dsn}

    def init(self) -> None:
        ws = self.workers[0]
        proc = subprocess.run(ws.command("cluster", "init", str(ws.config_path)),
                              env=self.env(ws), capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr

    def start(self, i: int) -> subprocess.Popen[bytes]:
        ws = self.workers[i]
        log = (ws.root / "run.log").open("ab")
        proc = subprocess.Popen(ws.command("run", str(ws.config_path), "--until-drained"),
                                cwd=ws.root, env=self.env(ws), stdout=log, stderr=log)
        self.procs[i] = proc
        return proc

    def logs(self) -> str:
        return "\n".join(f"--- worker {i}\n" + (ws.root / "run.log").read_text()[-3000:]
                         for i, ws in enumerate(self.workers) if (ws.root / "run.log").exists())

    def wait(self, indexes: list[int], timeout: float = _DEADLINE) -> None:
        """Every worker in *indexes* ends by itself (--until-drained), exit 0."""
        end = time.monotonic() + timeout
        for i in indexes:
            proc = self.procs[i]
            assert proc is not None
            try:
                code = proc.wait(timeout=max(1.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                state = self.db_state()
                self.stop()
                pytest.fail(f"worker {i} did not finish\n{state}\n{self.logs()}")
            assert code == 0, f"worker {i} exited {code}\n{self.logs()}"

    def stop(self) -> None:
        for proc in self.procs:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
                proc.wait()

    def db_state(self) -> str:
        """The store's view of a stuck run, for the failure message."""
        s = self.schema
        out = []
        live = "stage <> 'retired'"
        for sql in (f'SELECT * FROM "{s}".create_slot',
                    f'SELECT chunk, stage, owner, epoch FROM "{s}".chunk WHERE {live}',
                    f'SELECT pipeline, shard, owner, epoch FROM "{s}".shard',
                    f'SELECT worker_id, now() - heartbeat_at AS age, fenced, stopped_at '
                    f'FROM "{s}".worker',
                    "SELECT application_name, state, wait_event, now() - state_change AS age, "
                    "left(query, 100) AS q FROM pg_stat_activity "
                    "WHERE application_name LIKE 'batchd:%' AND state <> 'idle'"):
            out.append("\n".join(str(dict(r)) for r in _query(self.dsn, sql)))
        return "\n--\n".join(out)

    def submitted_batches(self) -> set[str]:
        rows = _query(self.dsn, f'SELECT batch_id FROM "{self.schema}".chunk '
                                "WHERE batch_id IS NOT NULL")
        return {r["batch_id"] for r in rows}

    def batches_submitted(self) -> int:
        return len(self.submitted_batches())

    def worker_id(self, i: int) -> str:
        text = (self.workers[i].root / "run.log").read_text()
        return text.split('"event":"cluster store open","worker":"', 1)[1].split('"', 1)[0]

    def held(self, i: int) -> int:
        """How many live chunks worker *i* owns now."""
        try:
            worker = self.worker_id(i)
        except (FileNotFoundError, IndexError):
            return 0
        rows = _query(self.dsn, f'SELECT count(*) AS n FROM "{self.schema}".chunk '
                                f"WHERE owner = '{worker}' AND stage <> 'retired'")
        return int(rows[0]["n"])

    def last_event(self) -> int:
        rows = _query(self.dsn, f'SELECT coalesce(max(seq), 0) AS n FROM "{self.schema}".event')
        return int(rows[0]["n"])

    def events_by(self, i: int, after: int) -> list[str]:
        """The kinds of the records worker *i* wrote after event *after*."""
        rows = _query(self.dsn, f'SELECT kind FROM "{self.schema}".event WHERE seq > {after} '
                                f"AND worker = '{self.worker_id(i)}' ORDER BY seq")
        return [r["kind"] for r in rows]

    def fenced(self) -> int:
        rows = _query(self.dsn, f'SELECT coalesce(sum(fenced), 0) AS n FROM "{self.schema}".worker')
        return int(rows[0]["n"])

    def check(self, emulator: EmulatorThread, *, rewritten: int = 0) -> None:
        """
        Every key one outcome across the workers; each custom_id paid once; batches agree.

        *rewritten*: how many keys may have been written by two workers. A worker killed
        or paused after its sink write and before its results_committed record leaves
        rows the chunk's next owner writes again (the same batch, the same answers): on
        one sink an upsert of the same row, here a row in each worker's own output.
        """
        keys = csv_keys(self.input)
        outcomes: Counter[str] = Counter()
        succeeded: set[str] = set()
        answers: dict[str, set[str | None]] = {}
        for ws in self.workers:
            out = ws.outputs()
            outcomes.update(out.result_keys)
            outcomes.update(out.dead_keys)
            succeeded |= out.result_keys  # answered (max_tokens 8: "truncated" answers)
            for key, output in out.results.items():
                answers.setdefault(key, set()).add(output)
        missing = sorted(set(keys) - set(outcomes))
        assert not missing, f"{len(missing)} keys have no outcome: {missing[:10]}\n{self.logs()}"
        twice = sorted(k for k, n in outcomes.items() if n > 1)
        assert len(twice) <= rewritten, f"{len(twice)} keys have two outcomes: {twice[:10]}"
        differing = [k for k in twice if len(answers.get(k, ())) != 1]
        assert not differing, f"keys written twice with different answers: {differing[:10]}"
        assert len(succeeded) == len(keys), f"{len(keys) - len(succeeded)} keys got no answer"
        stats = emulator.stats()
        received = Counter(stats["received"])
        assert set(received.values()) == {1}, [c for c, n in received.items() if n > 1][:10]
        assert len(received) == len(keys)
        assert stats["batches_created"] == self.batches_submitted()


@pytest.fixture
def cluster(tmp_path: Path, emulator: EmulatorThread, pg_dsn: str,
            pg_schema: str) -> Any:
    c = Cluster(tmp_path, emulator.base_url, pg_dsn, pg_schema)
    c.init()
    yield c
    c.stop()


def _wait_for(what: str, condition: Any, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


class TestThreeWorkers:
    def test_three_workers_finish_one_pipeline_together(
        self, cluster: Cluster, emulator: EmulatorThread
    ) -> None:
        for i in range(3):
            cluster.start(i)
        cluster.wait([0, 1, 2])
        cluster.check(emulator)
        # More than one worker drove chunks (the claim loop shares them out).
        logs = [(ws.root / "run.log").read_text() for ws in cluster.workers]
        submitting = [i for i, text in enumerate(logs) if "batch submitted" in text]
        assert len(submitting) >= 2, submitting

    def test_a_killed_worker_s_chunks_are_taken_over_and_paid_once(
        self, cluster: Cluster, emulator: EmulatorThread
    ) -> None:
        for i in range(3):
            cluster.start(i)
        _wait_for("some batches submitted", lambda: cluster.batches_submitted() >= 4)
        victim = cluster.procs[1]
        assert victim is not None
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        cluster.wait([0, 2])
        cluster.check(emulator, rewritten=3 * 50)  # its chunks in flight, at most

    def test_a_stopped_worker_is_fenced_and_acts_no_more(
        self, cluster: Cluster, emulator: EmulatorThread
    ) -> None:
        for i in range(3):
            cluster.start(i)
        _wait_for("some batches submitted", lambda: cluster.batches_submitted() >= 4)
        _wait_for("worker 1 holding chunks", lambda: cluster.held(1) > 0)
        zombie = cluster.procs[1]
        assert zombie is not None
        zombie.send_signal(signal.SIGSTOP)
        held = cluster.held(1)
        before = cluster.submitted_batches()
        time.sleep(3 + 1 + 2)  # past its lease TTL and the takeover grace
        cluster.wait([0, 2])
        zombie_log = cluster.workers[1].root / "run.log"
        mark = zombie_log.stat().st_size
        last = cluster.last_event()
        zombie.send_signal(signal.SIGCONT)
        time.sleep(3)  # it wakes, tries what it was doing, and is fenced
        zombie.send_signal(signal.SIGTERM)
        code = zombie.wait(timeout=30)
        after_wake = zombie_log.read_bytes()[mark:].decode(errors="replace")
        assert "Traceback" not in after_wake, after_wake[-3000:]
        assert code == 0, after_wake[-3000:]
        # Nothing recorded after waking (a log line may still tell of a record it made
        # before the stop), and no batch the store does not know (check() below).
        written = [k for k in cluster.events_by(1, last) if k != "alarm"]
        assert not written, (written, after_wake[-3000:])
        assert cluster.submitted_batches() >= before
        cluster.check(emulator, rewritten=3 * 50)  # its chunks in flight, at most
        if held:  # what it held was taken over: it learnt so, or was fenced trying
            assert cluster.fenced() > 0 or "leases lost" in after_wake, after_wake[-3000:]
