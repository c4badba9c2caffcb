"""
``[pipeline] max_dead_letter_ratio``: an emulator without the reply rules answers
nothing in the ``allowed`` list, so every answer is a dead letter. The pipeline must
pause after the first batch instead of burning the whole backlog, raise the alarm,
fail readiness, and make ``--until-drained`` exit 3 saying why.
"""

from __future__ import annotations

import json
import signal
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from batchd.daemon.emulator import EmulatorConfig, EmulatorThread
from tests.fixtures.service import ServiceWorkspace, describe, free_port, workspaces

ROWS = 200
BATCH = 20


@pytest.fixture
def ruleless() -> Iterator[EmulatorThread]:
    """An emulator that answers every ticket with text no label matches."""
    emulator = EmulatorThread(EmulatorConfig(seed=9)).start()
    try:
        yield emulator
    finally:
        emulator.stop()


def _pipeline(ws: ServiceWorkspace, **extra: object) -> dict[str, object]:
    table = ws.pipeline(max_requests=BATCH, max_in_flight=1, **extra)
    table["output"] = {"allowed": ["billing", "bug", "feature", "account", "other"]}
    return table


class TestDeadLetterRatio:
    def test_until_drained_stops_after_the_first_batch(self, ruleless: EmulatorThread) -> None:
        with workspaces() as make:
            ws = make(ruleless.base_url, "ratio")
            ws.write_tickets("tickets", ROWS)
            ws.write_config(_pipeline(ws, max_dead_letter_ratio=0.5, dead_letter_min_sample=BATCH))
            proc = ws.run_drained(expect=3)
            assert "pipeline 'tickets' is paused: dead letters: 20 of the latest 20 rows" \
                in proc.stderr, describe(proc)
            assert "mostly invalid_output" in proc.stderr
            assert sum(ws.dead_keys().values()) == BATCH  # not the whole backlog
            status = ws.status()["pipelines"][0]
            assert status["paused"].startswith("dead letters")
            assert [a["kind"] for a in ws.status()["alarms"]] == ["dead_letter_ratio"]

    def test_without_the_setting_the_backlog_burns(self, ruleless: EmulatorThread) -> None:
        """The control: the same run without a ratio dead-letters every row and exits 0."""
        with workspaces() as make:
            ws = make(ruleless.base_url, "burn")
            ws.write_tickets("tickets", 60)
            ws.write_config(_pipeline(ws))
            ws.run_drained(expect=0)
            assert sum(ws.dead_keys().values()) == 60

    def test_readiness_names_the_pause_and_a_restart_resumes(
        self, ruleless: EmulatorThread
    ) -> None:
        port = free_port()
        with workspaces() as make:
            ws = make(ruleless.base_url, "ready")
            ws.write_tickets("tickets", ROWS)
            ws.write_config(_pipeline(ws, max_dead_letter_ratio=0.5,
                                      dead_letter_min_sample=BATCH), metrics_port=port)
            daemon = ws.start()
            daemon.wait_for("alarm", alarm="dead_letter_ratio", timeout=60)
            with pytest.raises(urllib.error.HTTPError) as answer:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=10)
            assert answer.value.code == 503
            body = json.loads(answer.value.read())
            assert "pipeline 'tickets' is paused: dead letters" in body["reasons"][0]
            daemon.signal(signal.SIGTERM)
            assert daemon.wait(30) == 0
            again = ws.start()  # a restart is how an operator says "fixed": it resumes
            again.wait_for("resuming a pipeline paused before the restart", timeout=60)
            again.wait_for("alarm", alarm="dead_letter_ratio", timeout=60)  # not fixed
            again.signal(signal.SIGTERM)
            assert again.wait(30) == 0
