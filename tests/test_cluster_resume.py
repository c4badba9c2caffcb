"""
``batchd resume`` in cluster mode: the pause is the cluster's, in its store, so the
command records the resume there, from any machine with the config, and every running
worker goes on within a poll. Workers never lift a pause at start in cluster mode (each
would undo the others'), so without this a billing pause would hold the cluster for good.
"""

from __future__ import annotations

import signal
import subprocess

import anyio

from batchd.daemon.cluster.fencing import record_pipeline_event
from batchd.daemon.emulator import EmulatorThread
from tests.fixtures.cluster_workers import Cluster, ClusterFactory, wait_for

ROWS = 150


def _resume(cluster: Cluster, i: int = 1) -> subprocess.CompletedProcess[str]:
    ws = cluster.workers[i]
    return subprocess.run(ws.command("resume", str(ws.config_path), "tickets"),
                          env=cluster.env(ws), capture_output=True, text=True, timeout=60)


def _paused(cluster: Cluster) -> tuple[str | None, str | None]:
    rows = cluster.query("SELECT paused, pause_kind FROM {s}.pipeline WHERE name = 'tickets'")
    return (rows[0]["paused"], rows[0]["pause_kind"]) if rows else (None, None)


def _answered(cluster: Cluster) -> int:
    return len(set().union(*(ws.outputs().result_keys for ws in cluster.workers)))


def test_a_billing_pause_is_lifted_from_any_machine_and_running_workers_go_on(
    cluster_factory: ClusterFactory, emulator: EmulatorThread
) -> None:
    emulator.set_faults(http402=1.0, http_fault_on="create")
    cluster = cluster_factory(rows=ROWS, workers=2)
    procs = [cluster.serve(i) for i in range(2)]
    wait_for("the billing pause", lambda: _paused(cluster)[0] is not None)
    assert _paused(cluster)[1] == "billing", cluster.logs()
    assert emulator.stats()["batches_created"] == 0

    emulator.set_faults(http402=0.0)  # the operator sorted billing out
    done = _resume(cluster)
    assert done.returncode == 0, done.stderr
    assert "resumed 'tickets' in the cluster (paused: billing" in done.stdout, done.stdout
    assert _paused(cluster) == (None, None)
    wait_for("every row answered", lambda: _answered(cluster) == ROWS, timeout=90)
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, cluster.logs()
    cluster.check(emulator)  # one outcome per key, each custom_id sent once

    again = _resume(cluster, 0)
    assert again.returncode == 0
    assert "is not paused in the cluster; nothing to resume" in again.stderr, again.stderr


def test_a_budget_pause_is_left_to_a_higher_budget(
    cluster_factory: ClusterFactory, pg_dsn: str
) -> None:
    cluster = cluster_factory(rows=10, workers=1)

    async def pause() -> None:
        import asyncpg

        from batchd.daemon.cluster.schema import Sql

        conn = await asyncpg.connect(pg_dsn)
        try:
            await record_pipeline_event(conn, Sql(cluster.schema), "pipeline_paused", {
                "pipeline": "tickets", "reason": "budget: $1.00 spent", "pause_kind": "budget"})
        finally:
            await conn.close()

    anyio.run(pause)
    done = _resume(cluster, 0)
    assert done.returncode == 1
    assert "paused by its budget (budget: $1.00 spent)" in done.stderr
    assert "budget_usd" in done.stderr
    assert _paused(cluster) == ("budget: $1.00 spent", "budget")


def test_a_cluster_without_its_schema_is_named(
    cluster_factory: ClusterFactory, pg_schema: str
) -> None:
    gone = f"{pg_schema}_gone"
    cluster = cluster_factory(rows=10, workers=1, cluster={"schema": gone})
    cluster.query(f'DROP SCHEMA "{gone}" CASCADE')  # the factory initialised it
    done = _resume(cluster, 0)
    assert done.returncode == 2, done.stderr
    assert "[cluster]" in done.stderr and "schema" in done.stderr, done.stderr
    assert "cluster init" in done.stderr, done.stderr
