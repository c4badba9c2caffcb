"""Results that expired before batchd collected them are an alarm and a resend, never a loss."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

from batchd.daemon.emulator import EmulatorThread
from examples.tickets.generate import write_tickets

RULES = Path(__file__).resolve().parent.parent / "examples" / "tickets" / "rules.toml"
CONFIG = """
state_dir = "state"
[api]
poll_interval = "0.1s"
[[pipeline]]
name = "tickets"
custom_id = "{ticket_id}"
[pipeline.source]
type = "csv"
path = "tickets.csv"
key = "ticket_id"
[pipeline.request]
model = "claude-haiku-4-5"
max_tokens = 8
user = "{body}"
[pipeline.batching]
max_requests = 100
linger = "0s"
[[pipeline.sink]]
type = "sqlite"
path = "out.sqlite"
"""


def _run(workdir: Path, base_url: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "batchd.daemon.cli", "run", "pipeline.toml", "--until-drained",
         "--log-format", "json"],
        cwd=workdir, env={**os.environ, "ANTHROPIC_BASE_URL": base_url, **env},
        capture_output=True, text=True, timeout=90, check=False,
    )


class TestArchivedResults:
    def test_archived_batch_is_resent_with_an_alarm(
        self, tmp_path: Path, emulator_factory: object
    ) -> None:
        """A batch whose results were archived before collection is sent again, alarmed."""
        emulator: EmulatorThread = emulator_factory(rules=RULES)  # type: ignore[operator]
        write_tickets(tmp_path / "tickets.csv", 250, seed=3)
        (tmp_path / "pipeline.toml").write_text(CONFIG)

        killed = _run(tmp_path, emulator.base_url, BATCHD_CRASH_AT="after_ended")
        assert killed.returncode == -9, killed.stderr
        first = emulator.stats()["batches_created"]
        emulator.advance_clock(30 * 86400)  # past the 29-day retention

        done = _run(tmp_path, emulator.base_url)
        assert done.returncode == 0, done.stderr + done.stdout[-2000:]
        assert "results_archived" in done.stdout

        with sqlite3.connect(tmp_path / "out.sqlite") as db:
            keys = [k for (k,) in db.execute("SELECT key FROM results")]
        assert sorted(keys) == [f"T{n:07d}" for n in range(1, 251)]
        assert emulator.stats()["batches_created"] > first
        status = json.loads(subprocess.run(
            [sys.executable, "-m", "batchd.daemon.cli", "status", "pipeline.toml", "--json"],
            cwd=tmp_path, capture_output=True, text=True, check=True,
        ).stdout)
        assert any(a["kind"] == "results_archived" for a in status["alarms"])
