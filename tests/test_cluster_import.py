"""
``batchd cluster import``: a single daemon killed with batches in flight, its state dir
moved into the cluster, and two cluster workers carry on: every key gets exactly one
outcome (across the daemon's sinks and the workers'), the emulator made exactly the
batches the store records (nothing the daemon created is created again) and received
every custom_id once; the event log still replays to the rows.

Also: a running daemon's state dir is refused (its flock), a second import is a no-op,
the imported state dir is refused by ``batchd run`` naming the cluster, and a pipeline
the cluster already runs is not imported again from another state dir.

Real ``batchd`` subprocesses, the real PostgreSQL (a schema per test), the emulator.
"""

from __future__ import annotations

import hashlib
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import pytest

from batchd.daemon.cluster import event_log, limits, pipeline_import
from batchd.daemon.cluster.errors import SpoolCorrupt
from batchd.daemon.cluster.pipeline_import import ImportedPipeline
from batchd.daemon.cluster.schema import Sql
from batchd.daemon.emulator import EmulatorThread
from batchd.daemon.store.mirror import MirroredStore
from batchd.daemon.store.postgres import PgStore
from batchd.daemon.wal.manifest_state import ChunkState, PipelineState, Stage
from tests.fixtures.cluster import ClusterEnv
from tests.fixtures.cluster_workers import DSN_VAR, Cluster, _query, wait_for
from tests.fixtures.engine import Workspace, dump_toml

ROWS = 600  # 12 chunks of 50


def local_daemon(cluster: Cluster, root: Path, base_url: str) -> Workspace:
    """A single daemon's workspace reading the cluster's CSV with the workers' pipeline."""
    ws = Workspace(root, base_url)
    write_config(ws, cluster, shared=False)
    return ws


def write_config(ws: Workspace, cluster: Cluster, *, shared: bool) -> None:
    """The daemon's config; *shared*: with the ``[cluster]`` table the import reads."""
    data: dict[str, Any] = {
        "state_dir": "state",
        "api": {"poll_interval": "0.2s", "poll_jitter": 0.1},
        "pipeline": [ws.pipeline(source={"type": "csv", "path": str(cluster.input),
                                         "key": "ticket_id"},
                                 max_requests=50, max_in_flight=3, linger="0.2s",
                                 allowed=None)],
    }
    if shared:
        data["cluster"] = {"store": "postgres", "dsn": f"env:{DSN_VAR}",
                           "schema": cluster.schema, "lease_ttl": "3s",
                           "takeover_grace": "1s", "lease_margin": "0.5s"}
    ws.write_raw(dump_toml(data))


def batchd(cluster: Cluster, ws: Workspace, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(ws.command(*args), cwd=ws.root, env=cluster.env(ws),
                          capture_output=True, text=True, timeout=60)


def count(cluster: Cluster, sql: str) -> int:
    return int(_query(cluster.dsn, sql.replace("{s}", f'"{cluster.schema}"'))[0]["n"])


def drift(cluster: Cluster) -> list[str]:
    async def go() -> list[str]:
        conn = await asyncpg.connect(cluster.dsn)
        try:
            return await event_log.drift(conn, Sql(cluster.schema))
        finally:
            await conn.close()

    return anyio.run(go)


@pytest.fixture
def two_workers(cluster_factory: Callable[..., Cluster]) -> Cluster:
    return cluster_factory(rows=ROWS, workers=2)


class TestImport:
    @pytest.mark.parametrize("crash_at", ["after_create:4", "after_flush:2"])
    def test_a_killed_daemon_s_state_is_carried_on_by_the_cluster(
        self, two_workers: Cluster, emulator: EmulatorThread, tmp_path: Path, crash_at: str
    ) -> None:
        """
        ``after_create:4``: a batch exists that the daemon never recorded (its chunk at
        intent: the cluster adopts it, never creates it again); ``after_flush:2``: a
        batch half written to the daemon's sinks (its rows are written again, the same).
        """
        cluster = two_workers
        local = local_daemon(cluster, tmp_path / "local", emulator.base_url)
        killed = local.run(crash_at=crash_at)
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
        created = emulator.stats()["batches_created"]
        assert created >= 2

        write_config(local, cluster, shared=True)
        moved = batchd(cluster, local, "cluster", "import", str(local.config_path))
        assert moved.returncode == 0, moved.stderr[-3000:]
        assert "imported pipeline 'tickets'" in moved.stdout, moved.stdout
        # Every batch the daemon made is known to the store, before any worker runs.
        assert cluster.batches_submitted() + (crash_at.startswith("after_create")) == created
        stored = count(cluster, "SELECT count(*) AS n FROM {s}.key_ledger")
        assert stored > 0

        again = batchd(cluster, local, "cluster", "import", str(local.config_path),
                       "--state-dir", str(local.state_dir))
        assert again.returncode == 0, again.stderr
        assert "was already imported" in again.stdout
        assert count(cluster, "SELECT count(*) AS n FROM {s}.key_ledger") == stored

        write_config(local, cluster, shared=False)  # the daemon started again, by accident
        refused = local.run()
        assert refused.returncode == 2, refused.stderr[-3000:]
        assert "was moved into the cluster" in refused.stderr
        assert f"schema {cluster.schema!r}" in refused.stderr

        cluster.start(0)
        cluster.start(1)
        cluster.wait([0, 1])
        cluster.workers.append(local)  # the daemon's sinks hold its part of the outcomes
        # Rows the daemon flushed to its sinks before recording the collect (a chunk being
        # collected when it was killed, at either point) are written again by the chunk's
        # next owner, the same answers (checked): up to max_in_flight chunks. Paid once
        # holds strictly (the emulator's received counts and batches).
        cluster.check(emulator, rewritten=3 * 50)
        assert drift(cluster) == []

    def test_a_running_daemon_s_state_dir_is_refused(
        self, two_workers: Cluster, emulator: EmulatorThread, tmp_path: Path
    ) -> None:
        cluster = two_workers
        local = local_daemon(cluster, tmp_path / "local", emulator.base_url)
        log = (local.root / "run.log").open("ab")
        proc = subprocess.Popen(local.command("run", str(local.config_path)), cwd=local.root,
                                env=cluster.env(local), stdout=log, stderr=log)
        try:
            wait_for("the daemon running", lambda: emulator.stats()["batches_created"] >= 1)
            write_config(local, cluster, shared=True)
            refused = batchd(cluster, local, "cluster", "import", str(local.config_path))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
        assert refused.returncode != 0
        assert f"is in use by another batchd (pid {proc.pid})" in refused.stderr
        assert count(cluster, "SELECT count(*) AS n FROM {s}.event") == 0
        assert not (local.state_dir / "cluster-imported.json").exists()

    def test_a_pipeline_the_cluster_runs_is_not_imported(
        self, two_workers: Cluster, emulator: EmulatorThread, tmp_path: Path
    ) -> None:
        """Refused while a worker reads it, and after the cluster ran it; nothing written."""
        cluster = two_workers
        local = local_daemon(cluster, tmp_path / "local", emulator.base_url)
        killed = local.run(crash_at="after_seal")
        assert killed.returncode == -signal.SIGKILL
        write_config(local, cluster, shared=True)
        cluster.start(0)
        wait_for("a chunk sealed", lambda: count(
            cluster, "SELECT count(*) AS n FROM {s}.chunk") > 0)
        reading = batchd(cluster, local, "cluster", "import", str(local.config_path))
        assert reading.returncode == 2, reading.stderr
        assert "is reading pipeline 'tickets' in the cluster" in reading.stderr
        cluster.wait([0])
        events = count(cluster, "SELECT count(*) AS n FROM {s}.event")
        ran = batchd(cluster, local, "cluster", "import", str(local.config_path))
        assert ran.returncode == 2, ran.stderr
        assert "the cluster already runs pipeline 'tickets'" in ran.stderr
        assert len(ran.stderr.strip().splitlines()) == 1, ran.stderr
        assert count(cluster, "SELECT count(*) AS n FROM {s}.event") == events
        assert not (local.state_dir / "cluster-imported.json").exists()

    def test_a_source_read_by_partition_is_refused(
        self, two_workers: Cluster, emulator: EmulatorThread, tmp_path: Path
    ) -> None:
        """Kafka: the cluster reads it one shard per partition; the daemon's chunks have
        no partition to go to, so the import is refused before anything is written."""
        cluster = two_workers
        local = local_daemon(cluster, tmp_path / "local", emulator.base_url)
        killed = local.run(crash_at="after_seal")
        assert killed.returncode == -signal.SIGKILL
        write_config(local, cluster, shared=True)
        text = local.config_path.read_text()
        local.config_path.write_text(text.replace('"type" = "csv"', '"type" = "kafka"', 1))
        refused = batchd(cluster, local, "cluster", "import", str(local.config_path))
        assert refused.returncode == 2, refused.stderr
        assert "pipelines 'tickets' read a source the cluster reads apart by partition" in (
            refused.stderr)
        assert count(cluster, "SELECT count(*) AS n FROM {s}.event") == 0
        assert not (local.state_dir / "cluster-imported.json").exists()


def _imported(tmp_path: Path, *, tamper: bool = False) -> ImportedPipeline:
    """Pipeline ``p``: one sealed chunk with its spool (3 requests), one retired chunk."""
    spool = tmp_path / "p-000001.jsonl"
    spool.write_bytes(b"".join(b'{"custom_id":"p-%d","params":{}}\t{"key":"k%d"}\n' % (i, i)
                               for i in range(3)))
    digest = hashlib.sha256(spool.read_bytes()).hexdigest()
    chunk = ChunkState(chunk="p-000001", pipeline="p", attempt=1, requests=3,
                       bytes=spool.stat().st_size, rejects=0, first_seq=4, last_seq=6,
                       position={"offset": 60}, parent=None, covers_seq=6)
    state = PipelineState(name="p", last_sealed_seq=6, last_sealed_position={"offset": 60},
                          next_chunk_no=2, committed_seq=3, committed_position={"offset": 30},
                          cost_usd=1.5)

    async def keys() -> Any:
        yield [(f"k{i}", "p-000001", b"null") for i in range(3)]
        yield [(f"old{i}", "p-000000", b"null") for i in range(3)]

    return ImportedPipeline(
        state=state, chunks=[chunk], retired={"p-000000": "msgbatch_old"},
        spools={chunk.chunk: spool},
        sums={chunk.chunk: ("0" * 64 if tamper else digest, spool.stat().st_size)},
        origin={"state_dir": str(tmp_path), "ledger_id": "L", "born_at": 1.0},
        keys=keys, ledger_chunks={"p-000000", "p-000001"})


@pytest.mark.anyio
class TestImportRows:
    async def test_a_running_worker_s_view_takes_an_import_in(
        self, cluster: ClusterEnv, tmp_path: Path
    ) -> None:
        """A worker already running reads the snapshot event as it reads every event
        (no full re-read), and the log replays to the rows."""
        store = PgStore(cluster.dsn, spool_dir=tmp_path / "spool", schema=cluster.sql.schema,
                        name="w")
        await store.open()
        try:
            view = MirroredStore(store)
            await view.refresh()
            reads = view.full_reads
            # A worker of the pipeline opened before the import: its budget began at 0.
            await limits.define(cluster.conn, cluster.sql, "budget:p", 10.0)
            async with cluster.conn.transaction():
                done = await pipeline_import.write(cluster.conn, cluster.sql,
                                                   _imported(tmp_path), grace=1.0,
                                                   workspace="default")
            assert (done.chunks, done.retired, done.keys, done.spools) == ({"sealed": 1}, 1, 6, 1)
            await view.refresh()
            assert view.full_reads == reads
            assert view.state.chunks["p-000001"].stage is Stage.SEALED
            assert view.state.batch_owner("msgbatch_old") == "p-000000"
            assert view.state.pipelines["p"].next_chunk_no == 2
            budget = await limits.counter(cluster.conn, cluster.sql, "budget:p")
            assert budget is not None and float(budget.spent) == 1.5  # the daemon's spend
            assert await event_log.drift(cluster.conn, cluster.sql) == []
            # Any worker claims the chunk and fetches its spool, checked.
            (claimed,) = await store.claim_chunks("p", 5)
            assert (claimed.lease.chunk, claimed.lease.epoch) == ("p-000001", 1)
            fetched = await store.fetch_spool("p-000001")
            assert fetched.raw_bytes == (tmp_path / "p-000001.jsonl").stat().st_size
        finally:
            await store.aclose()

    async def test_a_spool_that_is_not_the_one_kept_is_not_imported(
        self, cluster: ClusterEnv, tmp_path: Path
    ) -> None:
        with pytest.raises(SpoolCorrupt, match="spool of chunk p-000001"):
            async with cluster.conn.transaction():
                await pipeline_import.write(cluster.conn, cluster.sql,
                                            _imported(tmp_path, tamper=True), grace=1.0,
                                            workspace="default")
        for table in ("event", "chunk", "key_ledger", "spool_block", "pipeline"):
            assert await cluster.conn.fetchval(
                cluster.sql(f"SELECT count(*) FROM {{s}}.{table}")) == 0, table
