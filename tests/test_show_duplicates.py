"""
``batchd show`` for a key the source holds twice: the first row is answered, the second
is dead-lettered as ``duplicate_key`` without being sent. Its story must tell the two
apart: one attempt (the first row's batch), and the second row as a duplicate read
later — not a "dead letter, never sent" listed as attempt 1 before the real one.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from batchd.daemon.emulator import EmulatorConfig, EmulatorThread
from tests.fixtures.service import RULES_PATH, ServiceWorkspace, describe, workspaces


@pytest.fixture(scope="module")
def drained() -> Iterator[ServiceWorkspace]:
    emulator = EmulatorThread(EmulatorConfig(seed=3, rules=RULES_PATH)).start()
    try:
        with workspaces() as make:
            ws: ServiceWorkspace = make(emulator.base_url, "dup")
            path = ws.write_tickets("tickets", 6)
            lines = path.read_text().splitlines()
            path.write_text("\n".join([*lines, lines[2]]) + "\n")  # T0000002 again, last
            ws.write_config(ws.pipeline())
            ws.run_drained()
            yield ws
    finally:
        emulator.stop()


def test_duplicate_is_not_an_attempt(drained: ServiceWorkspace) -> None:
    proc = drained.run("show", "@config", "T0000002", "--json")
    assert proc.returncode == 0, describe(proc)
    story = json.loads(proc.stdout)
    assert story["outcome"] == "succeeded"
    (attempt,) = story["attempts"]
    assert attempt["outcome"] == "succeeded" and attempt["batch_id"]
    (duplicate,) = story["duplicates"]
    assert duplicate["error_type"] == "duplicate_key"
    assert duplicate["position"]["line"] == 8  # header + 6 tickets, then the repeat


def test_text_lists_the_duplicate_after_the_attempt(drained: ServiceWorkspace) -> None:
    proc = drained.run("show", "@config", "T0000002")
    assert proc.returncode == 0, describe(proc)
    lines = proc.stdout.splitlines()
    attempts = [i for i, line in enumerate(lines) if line.lstrip().startswith("attempt ")]
    dups = [i for i, line in enumerate(lines) if line.lstrip().startswith("duplicate:")]
    assert len(attempts) == 1 and "succeeded" in lines[attempts[0]], proc.stdout
    assert len(dups) == 1 and dups[0] > attempts[0], proc.stdout
    assert "line 8" in lines[dups[0]] and "duplicate_key" in lines[dups[0]], proc.stdout


def test_dashboard_key_page_lists_the_duplicate(drained: ServiceWorkspace) -> None:
    """The dashboard's key page reads the same story (rendered without a daemon)."""
    from batchd.daemon.commands.show import key_history
    from batchd.daemon.config import load_config
    from batchd.daemon.ops.dashboard import render_key

    config = load_config(drained.config_path)
    history = key_history(config, config.pipelines[0], "T0000002")
    page = render_key(history, title="T0000002", pipelines=["tickets"])
    assert page.count("class=attempt>") == 1 and "duplicate: read again at" in page
