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
import time

from batchd.daemon.emulator import EmulatorThread
from tests.fixtures.cluster_workers import Cluster, wait_for


class TestThreeWorkers:
    def test_three_workers_finish_one_pipeline_together(
        self, cluster_workers: Cluster, emulator: EmulatorThread
    ) -> None:
        cluster = cluster_workers
        for i in range(3):
            cluster.start(i)
        cluster.wait([0, 1, 2])
        cluster.check(emulator)
        # More than one worker drove chunks (the claim loop shares them out).
        logs = [(ws.root / "run.log").read_text() for ws in cluster.workers]
        submitting = [i for i, text in enumerate(logs) if "batch submitted" in text]
        assert len(submitting) >= 2, submitting

    def test_a_killed_worker_s_chunks_are_taken_over_and_paid_once(
        self, cluster_workers: Cluster, emulator: EmulatorThread
    ) -> None:
        cluster = cluster_workers
        for i in range(3):
            cluster.start(i)
        wait_for("some batches submitted", lambda: cluster.batches_submitted() >= 4)
        victim = cluster.procs[1]
        assert victim is not None
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        cluster.wait([0, 2])
        cluster.check(emulator, rewritten=3 * 50)  # its chunks in flight, at most

    def test_a_stopped_worker_is_fenced_and_acts_no_more(
        self, cluster_workers: Cluster, emulator: EmulatorThread
    ) -> None:
        cluster = cluster_workers
        for i in range(3):
            cluster.start(i)
        wait_for("some batches submitted", lambda: cluster.batches_submitted() >= 4)
        wait_for("worker 1 holding chunks", lambda: cluster.held(1) > 0)
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
