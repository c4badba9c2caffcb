"""
``--until-drained`` in cluster mode ends when the pipeline cannot move without an
operator, as one daemon does: billing refuses every create → every worker exits 3
naming the pause, nothing is lost (no row marked done that was not answered), and
nothing was created.
"""

from __future__ import annotations

import subprocess

from batchd.daemon.emulator import EmulatorThread
from tests.fixtures.cluster_workers import ClusterFactory

ROWS = 300


def test_a_billing_pause_ends_every_worker_with_exit_3(
    cluster_factory: ClusterFactory, emulator: EmulatorThread
) -> None:
    emulator.set_faults(http402=1.0, http_fault_on="create")
    cluster = cluster_factory(rows=ROWS)
    procs = [cluster.start(i) for i in range(3)]
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=60))
        except subprocess.TimeoutExpired:
            state = cluster.db_state()
            cluster.stop()
            raise AssertionError(f"a worker did not end\n{state}\n{cluster.logs()}") from None
    logs = cluster.logs()
    assert codes == [3, 3, 3], logs
    assert "billing" in logs and "Traceback" not in logs, logs
    assert emulator.stats()["batches_created"] == 0
    # Nothing is done that was not answered: no outcome in any sink, the source not
    # committed past what was sealed (the sealed chunks wait in the store for a resume).
    for ws in cluster.workers:
        out = ws.outputs()
        assert not out.result_keys and not out.dead_keys
    rows = cluster.query("SELECT count(*) AS n FROM {s}.chunk WHERE stage = 'retired'")
    assert rows[0]["n"] == 0
