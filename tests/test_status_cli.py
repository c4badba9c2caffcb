"""
``batchd status`` beside a running daemon (it reads the manifest without the daemon's
lock) and after it stopped, compared with what the sinks actually hold.
"""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from batchd.daemon.emulator import EmulatorConfig, EmulatorThread
from tests.fixtures.service import (
    RULES_PATH,
    RunningDaemon,
    ServiceWorkspace,
    describe,
    workspaces,
)

ROWS = 60
CHUNKS = 3
LATENCY = 600.0  # virtual seconds: nothing ends until the test moves the clock
WIDE = {"COLUMNS": "200"}  # rich wraps to the terminal width; batch ids must fit


@dataclass
class StatusRun:
    workspace: ServiceWorkspace
    daemon: RunningDaemon
    submitted: list[dict[str, Any]]
    during_json: subprocess.CompletedProcess[str]
    during_text: subprocess.CompletedProcess[str]
    after_json: subprocess.CompletedProcess[str]
    after_text: subprocess.CompletedProcess[str]
    exit_code: int


@pytest.fixture(scope="module")
def status_run() -> Iterator[StatusRun]:
    """
    Status read while three batches are in flight (they take ten virtual minutes), then
    again after the emulator's clock was moved on and the daemon finished them and
    stopped on SIGTERM.
    """
    config = EmulatorConfig(seed=1234, rules=RULES_PATH, latency=LATENCY)
    emulator = EmulatorThread(config).start()
    try:
        with workspaces() as make:
            ws: ServiceWorkspace = make(emulator.base_url, "status")
            ws.write_tickets("tickets", ROWS, bad_rows=True)
            ws.write_config(ws.pipeline(max_requests=ROWS // CHUNKS))
            daemon = ws.start()
            submitted = daemon.wait_for("batch submitted", count=CHUNKS, timeout=60)
            during_json = ws.run("status", "@config", "--json")
            during_text = ws.run("status", "@config", env=WIDE)
            emulator.advance_clock(LATENCY + 1)
            daemon.wait_for("results committed", count=CHUNKS, timeout=60)
            daemon.signal(signal.SIGTERM)
            code = daemon.wait(15)
            after_json = ws.run("status", "@config", "--json")
            after_text = ws.run("status", "@config", env=WIDE)
            yield StatusRun(ws, daemon, submitted, during_json, during_text, after_json,
                            after_text, code)
    finally:
        emulator.stop()


def _pipeline(run: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert run.returncode == 0, describe(run)
    status = json.loads(run.stdout)
    (pipeline,) = status["pipelines"]
    assert pipeline["name"] == "tickets"
    result: dict[str, Any] = pipeline
    return result


class TestWhileRunning:
    def test_json_lists_the_batches_in_flight(self, status_run: StatusRun) -> None:
        """While the daemon holds the manifest, status shows its three submitted batches."""
        pipeline = _pipeline(status_run.during_json)
        ids = {e["batch_id"] for e in status_run.submitted}
        assert {b["batch_id"] for b in pipeline["batches"]} == ids
        assert {b["stage"] for b in pipeline["batches"]} == {"submitted"}
        assert pipeline["rows_done"] == 0
        assert pipeline["rows_pending"] == ROWS + 2  # the two bad rows ride in their chunks
        assert pipeline["batches_submitted"] == CHUNKS
        assert pipeline["requests_submitted"] == ROWS

    def test_text_shows_progress_and_live_chunks(self, status_run: StatusRun) -> None:
        """The human form names the pipeline, its progress and every batch id."""
        run = status_run.during_text
        assert run.returncode == 0, describe(run)
        assert "tickets" in run.stdout and "rows terminal" in run.stdout
        assert "live chunks" in run.stdout
        for event in status_run.submitted:
            assert event["batch_id"] in run.stdout
        assert "submitted" in run.stdout

    def test_reading_status_does_not_disturb_the_daemon(self, status_run: StatusRun) -> None:
        """The daemon finished every row and exited 0 after being read from mid-run."""
        assert status_run.exit_code == 0, status_run.daemon.tail()
        keys = status_run.workspace.sink_keys()
        assert len(keys) == ROWS and set(keys.values()) == {1}


class TestAfterStop:
    def test_counts_match_the_sinks(self, status_run: StatusRun) -> None:
        """rows_done, succeeded and dead_lettered equal the rows in the result and DLQ sinks."""
        pipeline = _pipeline(status_run.after_json)
        rows = status_run.workspace.sink_rows()
        dead = sum(status_run.workspace.dead_keys().values())
        succeeded = sum(1 for r in rows if r["status"] == "succeeded")
        assert pipeline["succeeded"] == succeeded == ROWS
        assert pipeline["dead_lettered"] == dead == 2
        assert pipeline["rows_done"] == len(rows) + dead
        assert pipeline["rows_pending"] == 0
        assert pipeline["paused"] is None

    def test_cost_and_tokens_match_the_sinks(self, status_run: StatusRun) -> None:
        """cost_usd and token totals are the sums over the result rows."""
        pipeline = _pipeline(status_run.after_json)
        rows = status_run.workspace.sink_rows()
        assert pipeline["cost_usd"] == pytest.approx(sum(r["cost_usd"] for r in rows),
                                                     abs=1e-6)
        assert pipeline["cost_usd"] > 0
        assert pipeline["input_tokens"] == sum(r["input_tokens"] for r in rows)
        assert pipeline["output_tokens"] == sum(r["output_tokens"] for r in rows)

    def test_batches_are_retired(self, status_run: StatusRun) -> None:
        """Finished batches leave the live list; the totals keep their count."""
        pipeline = _pipeline(status_run.after_json)
        assert pipeline["batches"] == []
        assert pipeline["batches_submitted"] == CHUNKS
        assert pipeline["source_committed_seq"] == ROWS + 2

    def test_text_after_stop(self, status_run: StatusRun) -> None:
        """The human form shows every row terminal and the spend."""
        run = status_run.after_text
        assert run.returncode == 0, describe(run)
        assert f"{ROWS + 2} of {ROWS + 2} rows terminal (100%, by file bytes)" in run.stdout
        assert "$0.0" in run.stdout
        assert "live chunks" not in run.stdout
