"""
Progress as a person at a terminal sees it.

``batchd status --watch`` runs in a real terminal (tmux: the command is typed with
send-keys, the screen read with capture-pane) while a daemon works; it must show
the pipeline and refresh as batches finish. ``batchd run`` in a terminal (a real
pty) logs progress against the whole file, and the figure never goes back.
"""

from __future__ import annotations

import json
import os
import pty
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator

import pytest

from batchd.daemon.emulator import EmulatorConfig, EmulatorThread
from tests.fixtures.service import RULES_PATH, ServiceWorkspace, wait_until, workspaces

LATENCY = 600.0

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")


class Tmux:
    """One detached tmux session with a shell, driven like a person at the keyboard."""

    def __init__(self, cwd: str, env: dict[str, str]) -> None:
        self.name = f"batchd-{uuid.uuid4().hex[:8]}"
        self.env = env
        subprocess.run(["tmux", "new-session", "-d", "-s", self.name, "-x", "160", "-y", "50",
                        "-c", cwd, "bash --norc --noprofile"], env=env, check=True, timeout=30)

    def type(self, line: str) -> None:
        subprocess.run(["tmux", "send-keys", "-t", self.name, line, "Enter"], check=True,
                       timeout=30)

    def keys(self, *keys: str) -> None:
        subprocess.run(["tmux", "send-keys", "-t", self.name, *keys], check=True, timeout=30)

    def screen(self) -> str:
        return subprocess.run(["tmux", "capture-pane", "-p", "-t", self.name],
                              capture_output=True, text=True, check=True, timeout=30).stdout

    def wait_for(self, pattern: str, timeout: float = 90) -> str:
        def check() -> str:
            screen = self.screen()
            return screen if re.search(pattern, screen, re.MULTILINE) else ""

        try:
            found: str = wait_until(check, timeout, f"{pattern!r} on screen", step=0.2)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- screen ---\n{self.screen()}") from None
        return found

    def close(self) -> None:
        subprocess.run(["tmux", "kill-session", "-t", self.name], check=False, timeout=30)


@pytest.fixture
def slow_emulator() -> Iterator[EmulatorThread]:
    emulator = EmulatorThread(EmulatorConfig(seed=3, rules=RULES_PATH, latency=LATENCY)).start()
    try:
        yield emulator
    finally:
        emulator.stop()


class TestStatusWatch:
    def test_watch_shows_and_refreshes(self, slow_emulator: EmulatorThread) -> None:
        with workspaces() as make:
            ws: ServiceWorkspace = make(slow_emulator.base_url, "watch")
            ws.write_tickets("tickets", 60)
            ws.write_config(ws.pipeline(max_requests=20))
            daemon = ws.start()
            daemon.wait_for("batch submitted", count=3, timeout=60)
            env = {**ws.env(), "TERM": "xterm-256color"}
            tmux = Tmux(str(ws.root), env)
            try:
                tmux.type(f"{shlex.quote(sys.executable)} -m batchd.daemon.cli status "
                          "pipeline.toml --watch --interval 0.3")
                screen = tmux.wait_for(r"0 of ~?60 rows terminal")
                assert "tickets" in screen and "live chunks" in screen
                assert screen.count("submitted") >= 3
                slow_emulator.advance_clock(LATENCY + 1)
                daemon.wait_for("results committed", count=3, timeout=60)
                screen = tmux.wait_for(r"60 of 60 rows terminal \(100%, by file bytes\)")
                assert "live chunks" not in screen  # redrawn, not appended
                tmux.keys("C-c")
                tmux.type("echo exit-$?")
                screen = tmux.wait_for(r"^exit-130$", timeout=60)  # Ctrl-C, back at the prompt
                assert "Traceback" not in screen
            finally:
                tmux.close()
                daemon.signal(signal.SIGTERM)
                daemon.wait(30)


def _run_in_pty(ws: ServiceWorkspace) -> tuple[int, list[dict[str, object]]]:
    """``batchd run --until-drained`` with a terminal as stdout; its JSON log events."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "batchd.daemon.cli", "run", str(ws.config_path), "--until-drained",
         "--log-format", "json"],
        cwd=ws.root, env=ws.env(), stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    chunks: list[bytes] = []

    def read() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    code = proc.wait(timeout=120)
    reader.join(10)
    os.close(master)
    events = []
    for line in b"".join(chunks).decode(errors="replace").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict):
            events.append(event)
    return code, events


class TestRunProgress:
    def test_progress_is_against_the_file_and_never_goes_back(self) -> None:
        """Small batches, one at a time, so the terminal shows several progress lines."""
        emulator = EmulatorThread(EmulatorConfig(seed=4, rules=RULES_PATH, latency=0.4)).start()
        try:
            with workspaces() as make:
                ws = make(emulator.base_url, "pty")
                ws.write_tickets("tickets", 300)
                ws.write_config(ws.pipeline(max_requests=15, max_in_flight=2))
                code, events = _run_in_pty(ws)
        finally:
            emulator.stop()
        assert code == 0, events[-5:]
        progress = [e for e in events if e.get("event") == "progress"]
        assert len(progress) >= 2, events[-5:]
        shown = [int(re.search(r"\] (\d+)%", str(e["bar"])).group(1))  # type: ignore[union-attr]
                 for e in progress]
        assert shown == sorted(shown), shown
        started = [e for e, pct in zip(progress, shown, strict=True) if 0 < pct < 100]
        assert started, progress
        # Against the whole file, not the rows read so far: about 300 from the first line on
        # (estimated from the bytes read; rows differ a little in length).
        for event in started:
            found = re.search(r"of ~?([\d,]+) rows terminal \(\d+%, by file bytes\)",
                              str(event["rows"]))
            assert found, event["rows"]
            assert 270 <= int(found.group(1).replace(",", "")) <= 330, event["rows"]
