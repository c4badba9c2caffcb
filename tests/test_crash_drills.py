"""
Crash drills: ``kill -9`` the daemon at each step the manifest announces,
restart it, and demand the same outputs as a run that was never interrupted.

``BATCHD_CRASH_AT=<point>[:N]`` makes the daemon SIGKILL itself the N-th time
it reaches a crash point (batchd.daemon.wal.manifest.crash_point). Per-request faults are
a pure function of (seed, custom_id, attempt), so an interrupted run that
sends nothing twice ends exactly like the baseline: same labels, same dead
letters, the same number of batches created and receipts per custom_id.
"""

from __future__ import annotations

import random
import signal
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from batchd.daemon.emulator import EmulatorConfig, EmulatorThread
from batchd.daemon.wal.manifest import MANIFEST_NAME
from tests.fixtures.emulator import SEED
from tests.fixtures.engine import RULES_PATH, EngineOutputs, Workspace, describe

TICKETS = 260
ROWS = TICKETS + 2  # write_tickets(bad_rows=True) adds two malformed rows
FAULTS: dict[str, Any] = {"api_error": 0.1, "expired": 0.05, "invalid_request": 0.04}
# Chunks of 110 so one collect passes 100 results (the mid_results point); a long
# linger so chunk boundaries depend only on the input, never on timing.
CONFIG: dict[str, Any] = {"max_requests": 110, "linger": "60s", "max_in_flight": 4}
# Today's request options on, so every drill also covers them: a model that thinks by
# default with thinking off, effort, a cached system prompt, stop sequences, US inference.
CONFIG["request"] = {
    "model": "claude-haiku-5-5", "thinking": "disabled", "effort": "low", "cache": "1h",
    "system": "Classify the support ticket as one of: billing, bug, feature, account, "
              "other. Answer with the label only. " * 40,
    "stop_sequences": ["\n\n"], "inference_geo": "us",
}
MAX_RESTARTS = 4
# The drills run side by side in one module fixture; on two busy cores that takes a while.
pytestmark = pytest.mark.timeout(300)


@dataclass
class Finished:
    """A drained workspace and what its emulator saw."""

    ws: Workspace
    outputs: EngineOutputs
    batches_created: int
    received: dict[str, int]
    crashes: list[subprocess.CompletedProcess[str]] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)


def _emulator_config(root: Any, **overrides: Any) -> EmulatorConfig:
    values: dict[str, Any] = {
        "rules": RULES_PATH, "faults": FAULTS, "seed": SEED, "latency": 0.0,
        "state_dir": root / "emulator",
    }
    values.update(overrides)
    return EmulatorConfig(**values)


def _prepare(ws: Workspace) -> None:
    ws.write_tickets(TICKETS, bad_rows=True)
    ws.write_config(poll_interval="0.05s", **CONFIG)


def _finish(ws: Workspace, emulator: EmulatorThread) -> Finished:
    stats = emulator.stats()
    return Finished(ws, ws.outputs(), stats["batches_created"], stats["received"])


def restart_until_drained(ws: Workspace, **kwargs: Any) -> int:
    """Run without a crash point until exit 0; returns how many runs it took."""
    for attempt in range(1, MAX_RESTARTS + 1):
        proc = ws.run(**kwargs)
        if proc.returncode == 0:
            return attempt
        assert proc.returncode != -signal.SIGKILL, describe(proc)
    raise AssertionError(f"not drained after {MAX_RESTARTS} restarts:\n{describe(proc)}")


def run_baseline(root: Path) -> Finished:
    """The input run once, never interrupted."""
    with EmulatorThread(_emulator_config(root)) as emulator:
        ws = Workspace(root / "ws", emulator.base_url)
        _prepare(ws)
        ws.run_ok()
        return _finish(ws, emulator)


def run_drill(root: Path, point: str) -> Finished:
    """Crash at ``point`` (``compaction`` with a 2000-byte threshold), then restart until done."""
    compact = 2000 if point.startswith("compaction") else None
    with EmulatorThread(_emulator_config(root)) as emulator:
        ws = Workspace(root / "ws", emulator.base_url)
        _prepare(ws)
        crash = ws.run(crash_at=point, compact_bytes=compact)
        notes: dict[str, Any] = {
            "created_at_crash": emulator.stats()["batches_created"],
            "snapshot_tmp_at_crash": (ws.state_dir / (MANIFEST_NAME + ".tmp")).exists(),
        }
        if crash.returncode == -signal.SIGKILL:
            notes["restarts"] = restart_until_drained(ws, compact_bytes=compact)
        finished = _finish(ws, emulator)
        finished.crashes.append(crash)
        finished.notes.update(notes)
        return finished


def run_random_kills(root: Path, kills: int = 3, seed: int = 20261125) -> Finished:
    """SIGKILL the daemon at random moments ``kills`` times, then run it to completion."""
    rng = random.Random(seed)
    with EmulatorThread(_emulator_config(root, latency=0.4)) as emulator:
        ws = Workspace(root / "ws", emulator.base_url)
        _prepare(ws)
        manifest = ws.state_dir / MANIFEST_NAME
        killed = 0
        for _ in range(kills):
            before = manifest.stat().st_size if manifest.exists() else -1
            proc = ws.start(compact_bytes=4000)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and proc.poll() is None and (
                not manifest.exists() or manifest.stat().st_size == before
            ):
                time.sleep(0.02)  # the clock starts once the daemon is working
            time.sleep(rng.uniform(0.05, 0.6))  # well inside a run, on a fast machine too
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                killed += 1
            proc.wait(timeout=30)
        restarts = restart_until_drained(ws, compact_bytes=4000)
        finished = _finish(ws, emulator)
        finished.notes.update(killed=killed, restarts=restarts)
        return finished


def assert_same_as_baseline(finished: Finished, baseline: Finished) -> None:
    """Same labels, dead letters and API traffic as the uninterrupted run; clean state."""
    out, base = finished.outputs, baseline.outputs
    assert len(base.results) > 200 and len(base.dead) > 5  # the baseline is worth comparing
    assert out.results == base.results
    assert {k: d["error_type"] for k, d in out.dead.items()} == {
        k: d["error_type"] for k, d in base.dead.items()
    }
    assert set(out.jsonl_keys) == set(out.results)
    assert set(out.jsonl_keys.values()) == {1}, "a key is in more than one JSONL part"
    assert set(out.dead_counts.values()) == {1}, "a key is dead-lettered twice"
    assert finished.received == baseline.received, "some custom_id was sent more often"
    assert finished.batches_created == baseline.batches_created
    ws = finished.ws
    assert ws.leftover_tmp() == []
    assert ws.spool_files() == []
    state = ws.manifest_state()
    assert state.chunks == {}
    assert state.pipelines["tickets"].committed_seq == ROWS


POINTS = (
    "after_seal",
    "after_intent",
    "after_create",
    "after_ended:2",
    "mid_results",
    "after_flush:2",
    "after_source_commit",
    "compaction",
)


@pytest.fixture(scope="module")
def drills(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Finished]:
    """
    The baseline, every crash drill and the random kills, run side by side.

    Each is its own emulator and state dir, so they cannot disturb each
    other; running them concurrently keeps the module fast, because most of
    a ``batchd run`` is interpreter start-up.
    """
    jobs: dict[str, Callable[[], Finished]] = {
        "baseline": lambda: run_baseline(tmp_path_factory.mktemp("baseline")),
        "random": lambda: run_random_kills(tmp_path_factory.mktemp("random")),
    }
    for point in POINTS:
        jobs[point] = lambda p=point: run_drill(  # type: ignore[misc]
            tmp_path_factory.mktemp(p.replace(":", "_")), p
        )
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {name: pool.submit(job) for name, job in jobs.items()}
        return {name: future.result() for name, future in futures.items()}


class TestCrashPoints:
    @pytest.mark.parametrize("point", POINTS)
    def test_restart_matches_uninterrupted_run(
        self, point: str, drills: dict[str, Finished]
    ) -> None:
        """Killed by SIGKILL at the point and restarted, the run ends exactly like the baseline."""
        drill = drills[point]
        (crash,) = drill.crashes
        assert crash.returncode == -signal.SIGKILL, describe(crash)
        assert_same_as_baseline(drill, drills["baseline"])

    def test_create_is_adopted_not_repeated(self, drills: dict[str, Finished]) -> None:
        """Killed between create and ``submitted``, the restart adopts the batch it made."""
        drill = drills["after_create"]
        assert drill.notes["created_at_crash"] == 1
        log = (drill.ws.root / "logs" / "02-run.log").read_text()
        assert "adopted a batch created before a crash" in log
        assert drill.batches_created == drills["baseline"].batches_created
        assert max(drill.received.values()) <= max(drills["baseline"].received.values())

    def test_intent_without_create_resends(self, drills: dict[str, Finished]) -> None:
        """Killed after the intent but before the create, the restart finds no batch and sends."""
        drill = drills["after_intent"]
        assert drill.notes["created_at_crash"] == 0
        log = (drill.ws.root / "logs" / "02-run.log").read_text()
        assert "no batch found for the earlier create" in log

    def test_compaction_crash_keeps_the_old_log(self, drills: dict[str, Finished]) -> None:
        """Killed between writing a snapshot and renaming it, the old log still replays."""
        drill = drills["compaction"]
        assert drill.notes["snapshot_tmp_at_crash"]
        first_line = (drill.ws.state_dir / MANIFEST_NAME).read_bytes().split(b"\n", 1)[0]
        assert b'"kind":"snapshot"' in first_line  # the restarted daemon compacted too


class TestRandomKills:
    def test_sigkill_at_random_moments(self, drills: dict[str, Finished]) -> None:
        """Three SIGKILLs at random moments, then a run to completion: same as the baseline."""
        drill = drills["random"]
        assert drill.notes["killed"] >= 2
        assert_same_as_baseline(drill, drills["baseline"])
