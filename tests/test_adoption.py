"""
A lost create response is resolved by adopting *our* batch, never someone else's.

Two installations share one API key (one emulator): run A finishes; run C, a fresh
state directory with the same keys and chunk size, loses its create response. The only
batch it may adopt is the one its own create made — A's batch has the same request count
and was created minutes, not milliseconds, before C announced its create.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

from batchd.daemon.emulator import EmulatorConfig, EmulatorThread
from tests.fixtures.engine import Workspace

RULES = Path(__file__).resolve().parent.parent / "examples" / "tickets" / "rules.toml"
ROWS = 20


def _batch_ids(ws: Workspace) -> set[str]:
    with closing(sqlite3.connect(ws.sqlite_path)) as db:
        return {batch for (batch,) in db.execute("SELECT DISTINCT batch_id FROM results")}


def test_lost_create_never_adopts_another_runs_batch(
    workspace: Callable[..., Workspace],
) -> None:
    with EmulatorThread(EmulatorConfig(seed=5, rules=RULES)) as emulator:
        first = workspace(emulator.base_url, "a")
        first.write_tickets(ROWS)
        first.write_config(max_requests=ROWS)
        first.run_ok()
        (theirs,) = _batch_ids(first)
        emulator.advance_clock(30)  # A's batch is half a minute old when C starts

        second = workspace(emulator.base_url, "c")
        second.write_tickets(ROWS)
        second.write_config(max_requests=ROWS, user="Translate, then classify: {body}")
        emulator.set_faults(drop_after_create=1)
        proc = second.run_ok()

        assert "adopted a batch" in proc.stdout + proc.stderr  # its own lost one
        (ours,) = _batch_ids(second)
        assert ours != theirs
        assert len(second.outputs().results) == ROWS
        stats = emulator.stats()
        assert stats["faults_injected"]["drop_after_create"] == 1
        assert stats["batches_created"] == 2  # C's lost batch was adopted, not paid twice
