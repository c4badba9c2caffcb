"""
Crash drills for cluster mode: three real ``batchd run`` workers share one pipeline
through PostgreSQL and the emulator, and one of them is SIGKILLed (``BATCHD_CRASH_AT``)
at each point of a chunk's life: before its seal (keys claimed, spool stored), right
after the seal, the create intent, the create, the ``ended`` record, in the middle of
collecting, after the sink flush, after the ``results_committed`` record and after the
source commit.

Each point runs twice: the survivors finish without the victim, and the victim's config
is started again at once (a new incarnation on the same state dir) and all three finish.
Whatever the point, the run ends the way an uninterrupted run does: every key has one
outcome across the workers' sinks (keys a victim wrote before recording their commit
are written again by the next owner, with the same answers), the emulator received
every custom_id as often as a same-seed uninterrupted run sends it (once, plus once per
transient error it injects) and made exactly the batches the store records, and the
store's event log replays to its rows.

Also here: retry chunks driven by the worker that cut them, and a worker's database
link cut mid-run (a loopback proxy) with a create in flight.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import anyio
import asyncpg
import orjson
import pytest

from batchd.daemon.cluster import event_log
from batchd.daemon.cluster.schema import Sql
from batchd.daemon.emulator import EmulatorThread
from tests.fixtures.cluster_workers import Cluster, uninterrupted_receipts, wait_for
from tests.fixtures.engine import csv_keys
from tests.fixtures.hostile import custom_ids
from tests.fixtures.tcp_proxy import ProxyThread

ROWS = 400
MAX_REQUESTS = 100  # mid_results fires at a chunk's 100th result line
MAX_IN_FLIGHT = 2
MAX_ATTEMPTS = 5
PIPELINE = {"max_requests": MAX_REQUESTS, "max_in_flight": MAX_IN_FLIGHT,
            "max_attempts": MAX_ATTEMPTS}
# Transient per-request errors, so collects cut retry chunks (born owned by their cutter)
# that a kill leaves behind too; every custom_id must still be sent exactly as often as
# in an uninterrupted run with the same seed.
API_ERROR = 0.05
# A victim killed between its sink writes and its results_committed record leaves rows
# the chunk's next owner writes again (same batch, same answers): its chunks in flight.
REWRITTEN = MAX_IN_FLIGHT * MAX_REQUESTS
# Workers start and stop in ~1 s each; a takeover waits lease_ttl + grace (3 s + 1 s).
_WORKER_DEADLINE = 40.0


@pytest.fixture
def emulator(emulator_factory: Callable[..., EmulatorThread]) -> EmulatorThread:
    """Batches end 0.5 s after their create, so every worker has chunks in flight."""
    return emulator_factory(latency=0.5, faults={"api_error": API_ERROR})


def _receipts(cluster: Cluster, emulator: EmulatorThread) -> Counter[str]:
    """Per custom_id, how often a same-seed uninterrupted run sends it."""
    keys = csv_keys(cluster.input)
    return uninterrupted_receipts(emulator, custom_ids(keys), MAX_ATTEMPTS)


# Where a chunk's life can be cut short, in order. The victim is the worker that reads
# the source (it starts first): the only one sure to reach every point, since it seals
# and commits the source and drives the chunks it seals while it has room. Its death
# also hands the source's shard over. (A non-reader killed mid-run: test_cluster_run.py.)
POINTS = ["before_seal", "after_seal", "after_intent", "after_create", "after_ended", "mid_results",
          "after_flush", "after_commit", "after_source_commit"]


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


def _start_with_victim(cluster: Cluster, point: str) -> int:
    """Start worker 0 with the crash point, then the others once it reads the source."""
    cluster.start(0, crash_at=point)
    wait_for("worker 0 reading the source", lambda: "reading the source" in _log(cluster, 0),
             timeout=20)
    cluster.start(1)
    cluster.start(2)
    return 0


def _killed(cluster: Cluster, victim: int, point: str) -> None:
    proc = cluster.procs[victim]
    assert proc is not None
    try:
        code = proc.wait(timeout=_WORKER_DEADLINE)
    except subprocess.TimeoutExpired:
        cluster.stop()
        pytest.fail(f"worker {victim} never reached {point}\n{cluster.logs()}")
    assert code == -signal.SIGKILL, (
        f"worker {victim} exited {code} without reaching {point}\n{cluster.logs()}")


def _drills() -> list[Any]:
    """
    Each point with and without a restart when ``BATCHD_TEST_ALL_DRILLS=1`` (18 runs,
    about 2 min); by default each point once, the two ways alternating (9 runs), which
    keeps the whole suite under 15 minutes on 2 cores and still kills at every point.
    """
    every = os.environ.get("BATCHD_TEST_ALL_DRILLS") == "1"
    cases = []
    for n, point in enumerate(POINTS):
        for restart in (False, True):
            if every or restart == bool(n % 2):
                cases.append(pytest.param(restart, point,
                                          id=f"{'restarted' if restart else 'survivors'}-{point}"))
    return cases


@pytest.mark.parametrize(("restart", "point"), _drills())
def test_a_worker_killed_at_each_point_is_taken_over_and_paid_once(
    cluster_factory: Callable[..., Cluster], emulator: EmulatorThread, point: str,
    restart: bool,
) -> None:
    cluster = cluster_factory(rows=ROWS, pipeline=PIPELINE)
    victim = _start_with_victim(cluster, point)
    _killed(cluster, victim, point)
    survivors = [i for i in range(3) if i != victim]
    if restart:
        cluster.start(victim)  # the same config and state dir, without the crash point
    if point == "after_intent":
        # Its chunk's next owner sends again only after two empty lists 15 s apart on the
        # API's clock: move the emulator's clock once the first list came back empty.
        wait_for("the first empty list", lambda: any(
            "no batch found for the earlier create yet" in _log(cluster, i) for i in range(3)),
            timeout=30)
        emulator.advance_clock(16.0)
    cluster.wait([*survivors, victim] if restart else survivors)
    cluster.check(emulator, rewritten=REWRITTEN, receipts=_receipts(cluster, emulator))
    assert _drift(cluster) == []


def test_retry_chunks_are_driven_by_the_worker_that_cut_them(
    cluster_factory: Callable[..., Cluster], emulator: EmulatorThread
) -> None:
    """
    Transient per-request errors make collects cut retry chunks; each retry chunk is born
    owned by the worker that cut it (epoch 1), which must drive it under that lease: no
    other worker may claim it while that worker lives.
    """
    cluster = cluster_factory(rows=ROWS, pipeline=PIPELINE)
    for i in range(3):
        cluster.start(i)
    cluster.wait([0, 1, 2])
    cluster.check(emulator, receipts=_receipts(cluster, emulator))
    assert _drift(cluster) == []
    assert cluster.fenced() == 0  # nobody wrote under a lease it did not hold
    for i in range(3):  # nobody died: no lease was lost (a retirement is not a loss)
        assert "leases lost" not in _log(cluster, i), _log(cluster, i)[-3000:]
    # Every chunk is retired: no worker keeps a spool, whoever retired the chunk.
    kept = {i: [p.name for p in ws.spool_files()] for i, ws in enumerate(cluster.workers)}
    assert not any(kept.values()), kept


def _rows(cluster: Cluster, query: str, *args: object) -> list[asyncpg.Record]:
    async def go() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(cluster.dsn, timeout=10)
        try:
            return list(await conn.fetch(query.replace("{s}", f'"{cluster.schema}"'), *args))
        finally:
            await conn.close()

    return anyio.run(go)


def _batch_of(cluster: Cluster, chunk: str) -> set[str]:
    return {r["batch_id"] for r in _rows(
        cluster, "SELECT batch_id FROM {s}.chunk WHERE chunk = $1 AND batch_id IS NOT NULL",
        chunk)}


def _creators(cluster: Cluster) -> list[tuple[str, str, str, int, datetime]]:
    """
    Every recorded batch as (batch id, its creator, who recorded it, the seq of the intent
    it was created under, when the API created it): the creator is the writer of the
    chunk's last intent before its ``submitted`` (adopting a batch writes no intent).
    """
    events = _rows(cluster, "SELECT seq, kind, chunk, worker, record FROM {s}.event "
                            "WHERE kind IN ('submit_intent', 'submitted') ORDER BY seq")
    intent: dict[str, tuple[str, int]] = {}
    made = []
    for e in events:
        if e["kind"] == "submit_intent":
            intent[e["chunk"]] = (e["worker"], e["seq"])
            continue
        record = orjson.loads(e["record"])
        creator, seq = intent[e["chunk"]]
        made.append((record["batch_id"], creator, e["worker"], seq,
                     datetime.fromisoformat(str(record["created_at"]))))
    return made


def _adoption_delay(cluster: Cluster, chunk: str) -> float | None:
    """Seconds from a chunk's claim at ``intent`` to its batch's adoption (None: not adopted)."""
    for i in range(len(cluster.workers)):
        claimed = None
        for line in _log(cluster, i).splitlines():
            if f'"chunk":"{chunk}"' not in line:
                continue
            entry = orjson.loads(line)
            when = datetime.fromisoformat(entry["timestamp"].replace("Z", "+00:00"))
            if entry["event"] == "chunk claimed" and entry.get("stage") == "intent":
                claimed = when
            elif entry["event"].startswith("adopted a batch") and claimed is not None:
                return (when - claimed).total_seconds()
    return None


def _proxy(proxy_thread: Callable[[str, int], ProxyThread], dsn: str) -> ProxyThread:
    target = urlsplit(dsn)
    return proxy_thread(target.hostname or "127.0.0.1", target.port or 5432)


def test_a_worker_whose_database_link_is_cut_creates_nothing_past_its_lease(
    cluster_factory: Callable[..., Cluster], emulator: EmulatorThread, pg_dsn: str,
    proxy_thread: Callable[[str, int], ProxyThread],
) -> None:
    """
    Worker 0 reaches PostgreSQL through a loopback proxy that drops the link mid-run
    while a create of its is in flight. It creates nothing after its lease deadline (its
    last heartbeat + TTL on the database's clock), the survivors take its chunks over,
    and once the link is back it learns what it lost and records nothing under those
    leases; the run ends as an uninterrupted one does.
    """
    link = _proxy(proxy_thread, pg_dsn)
    cluster = cluster_factory(rows=ROWS, pipeline=PIPELINE)
    # The victim reads the source (it starts first), so it surely drives chunks.
    cluster.start(0, dsn=link.dsn(cluster.dsn))
    wait_for("worker 0 reading the source", lambda: "reading the source" in _log(cluster, 0),
             timeout=20)
    victim = cluster.worker_id(0)
    # Cut it with a create in flight: creates answer 0.5 s late meanwhile, and the link goes
    # once one of its chunks is at intent. The batch is made before its deadline; the
    # chunk's next owner finds it by the pending intent and adopts it.
    emulator.set_faults(slow=0.5)
    slow_since = time.time()  # an intent from now on has a slow create behind it
    cluster.start(1)
    cluster.start(2)
    creating: list[asyncpg.Record] = []
    wait_for("worker 0 creating a batch", lambda: creating.extend(_rows(
        cluster, "SELECT chunk FROM {s}.chunk WHERE owner = $1 AND stage = 'intent' "
                 "AND last_intent_at > $2", victim, slow_since)) or creating, timeout=30)
    link.cut()
    emulator.set_faults(slow=0.0)
    time.sleep(0.5)  # whatever it sent before the cut has committed or rolled back
    cut_seq = cluster.last_event()
    held = {r["chunk"]: r["epoch"] for r in _rows(
        cluster, "SELECT chunk, epoch FROM {s}.chunk WHERE owner = $1 AND stage <> 'retired'",
        victim)}
    (worker,) = _rows(cluster, "SELECT heartbeat_at, lease_ttl FROM {s}.worker "
                               "WHERE worker_id = $1", victim)
    deadline = worker["heartbeat_at"] + worker["lease_ttl"]  # an interval
    if held:
        wait_for("the survivors taking worker 0's chunks over", lambda: cluster.held(0) == 0,
                 timeout=20)
    else:  # it was between chunks: it still loses its link past its lease
        time.sleep(3 + 1 + 1)
    mark = (cluster.workers[0].root / "run.log").stat().st_size
    restore_seq = cluster.last_event()
    link.restore()
    cluster.wait([0, 1, 2])
    cluster.check(emulator, rewritten=REWRITTEN, receipts=_receipts(cluster, emulator))
    assert _drift(cluster) == []

    after = _rows(cluster, "SELECT seq, kind, chunk, fence, epoch FROM {s}.event "
                           "WHERE worker = $1 AND seq > $2 ORDER BY seq", victim, cut_seq)
    assert not [e for e in after if e["seq"] <= restore_seq], "recorded with its link cut"
    stale = [dict(e) for e in after
             if e["fence"] == "chunk" and held.get(e["chunk"]) == e["epoch"]]
    assert not stale, stale
    made = _creators(cluster)
    late = [(batch, when, deadline) for batch, creator, _, seq, when in made
            if creator == victim and seq <= cut_seq and when > deadline]
    assert not late, late
    # The chunk it was creating has one batch (check() above), recorded by a survivor: its
    # create adopted (made before the deadline, found by the pending intent) or sent again.
    batches = _batch_of(cluster, creating[0]["chunk"])
    recorded = [recorder for batch, _, recorder, _, _ in made if batch in batches]
    assert recorded and victim not in recorded, (creating, recorded)
    # Its new owner settles it at once: the create slot pends on it, and the workers
    # waiting for the slot must not hold it through their waits (they did: 9 s once).
    delay = _adoption_delay(cluster, creating[0]["chunk"])
    assert delay is None or delay < 3.0, delay
    woke = (cluster.workers[0].root / "run.log").read_bytes()[mark:].decode(errors="replace")
    assert "Traceback" not in woke, woke[-3000:]
    if held:  # what it held was taken over: it learnt so, or was fenced trying
        assert "leases lost" in woke or cluster.fenced() > 0, woke[-3000:]


def test_the_reader_s_database_link_cut_hands_the_source_over(
    cluster_factory: Callable[..., Cluster], emulator: EmulatorThread, pg_dsn: str,
    proxy_thread: Callable[[str, int], ProxyThread],
) -> None:
    """
    The source's reader loses its database link once it has sealed: a survivor reads
    the source after the reader's TTL and grace, resuming after what was sealed; back
    online, the old reader seals, commits and retires nothing under its old shard lease,
    and the run ends as an uninterrupted one does.
    """
    link = _proxy(proxy_thread, pg_dsn)
    cluster = cluster_factory(rows=ROWS, pipeline=PIPELINE)
    cluster.start(0, dsn=link.dsn(cluster.dsn))
    wait_for("worker 0 reading the source", lambda: "reading the source" in _log(cluster, 0),
             timeout=20)
    cluster.start(1)
    cluster.start(2)
    wait_for("worker 0 sealing", lambda: "chunk sealed" in _log(cluster, 0), timeout=20)
    victim = cluster.worker_id(0)
    link.cut()
    time.sleep(0.5)  # whatever it sent before the cut has committed or rolled back
    cut_seq = cluster.last_event()
    ((owner, epoch),) = [(r["owner"], r["epoch"]) for r in _rows(
        cluster, "SELECT owner, epoch FROM {s}.shard WHERE pipeline = 'tickets'")]
    wait_for("a survivor reading the source", lambda: _rows(
        cluster, "SELECT 1 FROM {s}.shard WHERE pipeline = 'tickets' "
                 "AND owner IS DISTINCT FROM $1", victim), timeout=20)
    restore_seq = cluster.last_event()
    link.restore()
    cluster.wait([0, 1, 2])
    cluster.check(emulator, rewritten=REWRITTEN, receipts=_receipts(cluster, emulator))
    assert _drift(cluster) == []
    after = _rows(cluster, "SELECT seq, kind, fence, epoch FROM {s}.event "
                           "WHERE worker = $1 AND seq > $2 ORDER BY seq", victim, cut_seq)
    assert not [e for e in after if e["seq"] <= restore_seq], "recorded with its link cut"
    if owner == victim:
        stale = [dict(e) for e in after if e["fence"] == "shard" and e["epoch"] == epoch]
        assert not stale, stale


def test_a_restarted_worker_sends_the_stored_spool_not_a_file_its_last_life_left(
    cluster_factory: Callable[..., Cluster], emulator: EmulatorThread
) -> None:
    """
    A worker's spool dir outlives it: a file there for a chunk id may hold other rows
    than the chunk the cluster sealed under that id (a reader killed before its seal,
    and the next one cutting that chunk elsewhere on a slow source). A new incarnation
    sends only spools it kept or fetched (checked against the store's sha256) itself.
    """
    cluster = cluster_factory(rows=ROWS, workers=1, pipeline=PIPELINE)
    cluster.start(0, crash_at="after_seal")
    _killed(cluster, 0, "after_seal")
    spool = cluster.workers[0].state_dir / "spool" / "tickets-000000.jsonl"
    text = spool.read_text()
    assert '"t-T0000100"' in text
    spool.write_text(text.replace("T0000100", "T0000199"))  # the same size, another row
    cluster.start(0)
    cluster.wait([0])
    cluster.check(emulator, receipts=_receipts(cluster, emulator))


def test_two_workers_killed_leave_the_third_to_finish_alone(
    cluster_factory: Callable[..., Cluster], emulator: EmulatorThread
) -> None:
    """
    The reader dies with a create just made (its batch unrecorded, the create slot
    pending on it), and a second worker is SIGKILLed once it holds chunks (its own or the
    first one's): the last one adopts the batch, takes both workers' chunks and the
    source, and ends.
    """
    cluster = cluster_factory(rows=ROWS, pipeline=PIPELINE)
    victim = _start_with_victim(cluster, "after_create")
    _killed(cluster, victim, "after_create")
    wait_for("worker 1 holding chunks", lambda: cluster.held(1) > 0, timeout=20)
    second = cluster.procs[1]
    assert second is not None
    second.send_signal(signal.SIGKILL)
    second.wait()
    cluster.wait([2])
    cluster.check(emulator, rewritten=2 * REWRITTEN, receipts=_receipts(cluster, emulator))
    assert _drift(cluster) == []
