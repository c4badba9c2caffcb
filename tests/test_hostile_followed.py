"""
Hostile operator: the file a daemon follows is cut or rewritten under it (issue 12).

At start a changed file is refused (tests/test_hostile_inputs.py). These cases happen
*while* batchd follows the file in daemon mode: `> tickets.csv` then new rows, or the
file rewritten with other, longer content. Reading on at the old offset would silently
skip the new file's first rows (or read one from its middle); instead the daemon stops
with one line naming the file, and the start after it decides as any start does.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from batchd.daemon.emulator import EmulatorThread
from tests.fixtures.engine import RULES_PATH, Workspace, describe
from tests.fixtures.hostile import (
    assert_nothing_lost,
    assert_paid_once,
    daemon_log,
    start_daemon,
    stop_daemon,
    wait_for,
)
from tests.test_hostile_inputs import fixed_width_csv, result_outputs

pytestmark = pytest.mark.timeout(180)


def follow_until_idle(ws: Workspace, rows: int) -> subprocess.Popen[str]:
    daemon = start_daemon(ws)
    wait_for(lambda: len(result_outputs(ws)) >= rows, "every row answered", timeout=90)
    return daemon


def stopped_with(proc: subprocess.Popen[str], what: str, source: Path, *also: str) -> str:
    """The daemon stops by itself (exit 1: a restart decides) with one line naming the file."""
    try:
        wait_for(lambda: proc.poll() is not None, f"the daemon to stop on the {what} file")
    finally:
        if proc.poll() is None:
            stop_daemon(proc, signal.SIGKILL)
    assert proc.returncode == 1, daemon_log(proc)[-3000:]
    last = daemon_log(proc).strip().splitlines()[-1]
    assert last.startswith("batchd: ") and source.name in last, last
    assert any(word in last for word in (what, *also)), last
    return last


class TestFollowedFileChanges:
    def test_truncated_while_followed_stops_then_resumes_the_restored_file(
        self, emulator_factory: Callable[..., EmulatorThread],
        workspace: Callable[..., Workspace],
    ) -> None:
        """`> tickets.csv` and two new rows while the daemon idles at the end: it stops naming
        the file (not reading on past the new end, where the new rows never arrive); with the
        original put back and the rows appended, the next run sends only the new rows."""
        emulator = emulator_factory(rules=RULES_PATH)
        ws = workspace(emulator.base_url)
        source = ws.root / "tickets.csv"
        keys = fixed_width_csv(source, "T", 120)
        original = source.read_bytes()
        ws.write_config(max_requests=50, linger="0.2s", max_in_flight=2)
        daemon = follow_until_idle(ws, len(keys))

        extra = b"N0000001,I was charged twice so please refund\nN0000002,crash on export\n"
        source.write_bytes(b"ticket_id,body\n" + extra)
        stopped_with(daemon, "truncated", source)

        source.write_bytes(original + extra)
        proc = ws.run_ok()
        assert "Traceback" not in proc.stderr, describe(proc)
        everything = [*keys, "N0000001", "N0000002"]
        assert_paid_once(emulator, expected=[f"t-{k}" for k in everything])
        assert_nothing_lost(ws, everything)

    def test_rewritten_longer_while_followed_stops_and_is_refused(
        self, emulator_factory: Callable[..., EmulatorThread],
        workspace: Callable[..., Workspace],
    ) -> None:
        """The file rewritten in place with other, longer content between two polls (so it
        is never shorter than what was read): the daemon stops naming it instead of reading
        the new file from the old offset; the restart refuses it (exit 2); nothing of the
        new file is sent."""
        emulator = emulator_factory(rules=RULES_PATH)
        ws = workspace(emulator.base_url)
        source = ws.root / "tickets.csv"
        keys = fixed_width_csv(source, "T", 120)
        ws.write_config(max_requests=50, linger="0.2s", max_in_flight=2)
        daemon = follow_until_idle(ws, len(keys))

        fixed_width_csv(source, "U", 300)
        stopped_with(daemon, "rewritten", source, "truncated")  # if it looked mid-write
        refused = ws.run()
        assert refused.returncode == 2, describe(refused)
        assert not any(cid.startswith("t-U") for cid in emulator.stats()["received"])
        assert_paid_once(emulator, expected=[f"t-{k}" for k in keys])
        assert set(result_outputs(ws)) == set(keys)
