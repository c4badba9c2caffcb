"""
A sealed chunk's spool corrupted in the shared store: the worker that claims it holds
the chunk and raises ``spool_corrupt``; its requests are never sent, nothing else of
the run is lost, and ``--until-drained`` ends with exit 3 naming the held chunk.

The corruption is the nasty kind: the stored blocks still decompress, to other bytes,
so only the SHA-256 the seal recorded tells them apart.
"""

from __future__ import annotations

import subprocess
import zlib
from collections import Counter

from batchd.daemon.emulator import EmulatorThread
from tests.fixtures.cluster_workers import Cluster, ClusterFactory
from tests.fixtures.engine import csv_keys

ROWS = 200  # four chunks of 50


def _corrupt_sealed_chunk(cluster: Cluster) -> str:
    """Replace the one sealed chunk's stored blocks with other valid (zlib) data."""
    sealed = cluster.query("SELECT chunk, spool_epoch FROM {s}.chunk WHERE stage = 'sealed'")
    assert len(sealed) == 1, sealed
    chunk, epoch = sealed[0]["chunk"], sealed[0]["spool_epoch"]
    other = zlib.compress(b'{"custom_id":"t-forged","params":{}}\n', 1)
    changed = cluster.query(
        f"UPDATE {{s}}.spool_block SET data = '\\x{other.hex()}'::bytea, codec = 'zlib' "
        f"WHERE chunk = '{chunk}' AND epoch = {epoch} RETURNING n")
    assert changed, f"chunk {chunk} has no spool blocks at epoch {epoch}"
    return str(chunk)


def test_a_corrupt_spool_is_held_and_alarmed_never_sent(
    cluster_factory: ClusterFactory, emulator: EmulatorThread
) -> None:
    cluster = cluster_factory(rows=ROWS, workers=2)
    first = cluster.start(0, env={"BATCHD_CRASH_AT": "after_seal"})
    assert first.wait(timeout=60) == -9, cluster.logs()
    chunk = _corrupt_sealed_chunk(cluster)
    held_keys = {r["key"] for r in cluster.query(
        f"SELECT key FROM {{s}}.key_ledger WHERE chunk = '{chunk}'")}
    assert len(held_keys) == 50

    survivor = cluster.start(1)  # another machine: no local copy of the spool
    try:
        code = survivor.wait(timeout=60)
    except subprocess.TimeoutExpired:
        cluster.stop()
        raise AssertionError(
            f"the survivor did not end\n{cluster.db_state()}\n{cluster.logs()}") from None
    log = (cluster.workers[1].root / "run.log").read_text()
    assert code == 3, log[-3000:]
    assert "spool_corrupt" in log and chunk in log, log[-3000:]
    assert "Traceback" not in log, log[-3000:]

    # Never sent: not the forged request, not the chunk's own rows.
    received = Counter(emulator.stats()["received"])
    assert "t-forged" not in received
    assert not {f"t-{k}" for k in held_keys} & set(received), "a held chunk's rows were sent"
    assert set(received.values()) == {1}
    assert len(received) == ROWS - len(held_keys)
    assert emulator.stats()["batches_created"] == cluster.batches_submitted()

    # Nothing else lost: every other key has its one outcome; the held chunk stays live
    # in the store (sealed, not retired) for an operator to restore or re-read.
    out = cluster.workers[1].outputs()
    done = Counter([*out.result_keys, *out.dead_keys])
    assert set(done) == set(csv_keys(cluster.input)) - held_keys
    assert set(done.values()) == {1}
    stage = cluster.query(f"SELECT stage FROM {{s}}.chunk WHERE chunk = '{chunk}'")
    assert stage[0]["stage"] == "sealed"
