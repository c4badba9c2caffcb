"""
Crash drills for cluster mode: three real ``batchd run`` workers share one pipeline
through PostgreSQL and the emulator, and one of them is SIGKILLed (``BATCHD_CRASH_AT``)
at each point of a chunk's life: right after the seal, the create intent, the create,
the ``ended`` record, in the middle of collecting, after the sink flush, after the
``results_committed`` record and after the source commit.

Each point runs twice: the survivors finish without the victim, and the victim's config
is started again at once (a new incarnation on the same state dir) and all three finish.
Whatever the point, the run ends the way an uninterrupted run does: every key has one
outcome across the workers' sinks (keys a victim wrote before recording their commit
are written again by the next owner, with the same answers), the emulator received
every custom_id exactly once and made exactly the batches the store records, and the
store's event log replays to its rows.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

import anyio
import asyncpg
import pytest

from batchd.daemon.cluster import event_log
from batchd.daemon.cluster.schema import Sql
from batchd.daemon.emulator import EmulatorThread
from tests.fixtures.cluster_workers import Cluster, uninterrupted_receipts, wait_for
from tests.fixtures.engine import csv_keys
from tests.fixtures.hostile import custom_ids

ROWS = 600
MAX_REQUESTS = 100  # mid_results fires at a chunk's 100th result line
MAX_IN_FLIGHT = 2
# A victim killed between its sink writes and its results_committed record leaves rows
# the chunk's next owner writes again (same batch, same answers): its chunks in flight.
REWRITTEN = MAX_IN_FLIGHT * MAX_REQUESTS
# Workers start and stop in ~1 s each; a takeover waits lease_ttl + grace (3 s + 1 s).
_WORKER_DEADLINE = 40.0


@pytest.fixture
def emulator(emulator_factory: Callable[..., EmulatorThread]) -> EmulatorThread:
    """Batches end 1 s after their create, so every worker has chunks in flight."""
    return emulator_factory(latency=1.0)


@dataclass(frozen=True)
class Point:
    """A crash point and whose it is: only the source's reader seals and commits it."""

    name: str
    reader: bool = False

    def __str__(self) -> str:
        return self.name


POINTS = [
    Point("after_seal", reader=True),
    Point("after_intent"),
    Point("after_create"),
    Point("after_ended"),
    Point("mid_results"),
    Point("after_flush"),
    Point("after_commit"),
    Point("after_source_commit", reader=True),
]


def _log(cluster: Cluster, i: int) -> str:
    path = cluster.workers[i].root / "run.log"
    return path.read_text(errors="replace") if path.exists() else ""


def _drift(cluster: Cluster) -> list[str]:
    async def go() -> list[str]:
        conn = await asyncpg.connect(cluster.dsn, timeout=10)
        try:
            return await event_log.drift(conn, Sql(cluster.schema))
        finally:
            await conn.close()

    return anyio.run(go)


def _start_with_victim(cluster: Cluster, point: Point) -> int:
    """
    Start the three workers, one of them with the crash point; return the victim.

    A reader's point (seal, source commit) gets a victim that starts first and so reads
    the source. For every other point the three start together, so every worker drives
    chunks (the reader its own, the others those it releases) and the victim, worker 1,
    is usually not the reader.
    """
    victim = 0 if point.reader else 1
    cluster.start(0, crash_at=point.name if victim == 0 else None)
    if point.reader:
        wait_for("worker 0 reading the source",
                 lambda: "reading the source" in _log(cluster, 0), timeout=20)
    for i in (1, 2):
        cluster.start(i, crash_at=point.name if victim == i else None)
    return victim


def _killed(cluster: Cluster, victim: int, point: Point) -> None:
    proc = cluster.procs[victim]
    assert proc is not None
    try:
        code = proc.wait(timeout=_WORKER_DEADLINE)
    except subprocess.TimeoutExpired:
        cluster.stop()
        pytest.fail(f"worker {victim} never reached {point}\n{cluster.logs()}")
    assert code == -signal.SIGKILL, (
        f"worker {victim} exited {code} without reaching {point}\n{cluster.logs()}")


@pytest.mark.parametrize("point", POINTS, ids=str)
@pytest.mark.parametrize("restart", [False, True], ids=["survivors", "restarted"])
def test_a_worker_killed_at_each_point_is_taken_over_and_paid_once(
    cluster_factory: Callable[..., Cluster], emulator: EmulatorThread, point: Point,
    restart: bool,
) -> None:
    cluster = cluster_factory(rows=ROWS, pipeline={"max_requests": MAX_REQUESTS,
                                                   "max_in_flight": MAX_IN_FLIGHT})
    victim = _start_with_victim(cluster, point)
    _killed(cluster, victim, point)
    survivors = [i for i in range(3) if i != victim]
    if restart:
        cluster.start(victim)  # the same config and state dir, without the crash point
        cluster.wait([*survivors, victim])
    else:
        cluster.wait(survivors)
    cluster.check(emulator, rewritten=REWRITTEN)
    assert _drift(cluster) == []


def test_retry_chunks_are_driven_by_the_worker_that_cut_them(
    cluster_factory: Callable[..., Cluster], emulator: EmulatorThread
) -> None:
    """
    Transient per-request errors make collects cut retry chunks; each retry chunk is born
    owned by the worker that cut it (epoch 1), which must drive it under that lease: no
    other worker may claim it while that worker lives.
    """
    emulator.set_faults(api_error=0.1)
    cluster = cluster_factory(rows=ROWS, pipeline={"max_requests": MAX_REQUESTS,
                                                   "max_in_flight": MAX_IN_FLIGHT,
                                                   "max_attempts": 5})
    for i in range(3):
        cluster.start(i)
    cluster.wait([0, 1, 2])
    keys = csv_keys(cluster.input)
    cluster.check(emulator, receipts=uninterrupted_receipts(emulator, custom_ids(keys), 5))
    assert _drift(cluster) == []
    assert cluster.fenced() == 0  # nobody wrote under a lease it did not hold
    for i in range(3):  # nobody died: no lease was lost (a retirement is not a loss)
        assert "leases lost" not in _log(cluster, i), _log(cluster, i)[-3000:]
