"""
Hostile operator, part 3: paths that collide, file systems that refuse, modes that leak.

Issue 12, cases 4, 9, 10, 11 and 12. Configuration mistakes stop the start with one
line and exit 2 before anything is written or sent; a sink that keeps failing alarms
and pauses instead of looping; the state and the outputs are private whatever the
umask; the key ledger's size is visible and can be bounded.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from batchd.daemon.config import load_config
from batchd.daemon.emulator import EmulatorThread
from batchd.daemon.intake.ledger import KeyLedger
from batchd.daemon.ops.metrics import Metrics
from batchd.daemon.ops.telemetry import Telemetry
from batchd.daemon.wal.manifest import MANIFEST_NAME
from batchd.plugins.errors import ConfigError
from tests.fixtures.engine import RULES_PATH, Workspace, csv_keys, describe, dump_toml
from tests.fixtures.hostile import (
    assert_nothing_lost,
    assert_paid_once,
    fill,
    one_line,
    remount_read_only,
    start_daemon,
    stop_daemon,
    tmpfs,
    wait_for,
)

pytestmark = pytest.mark.timeout(180)


def config(ws: Workspace, **changes: Any) -> dict[str, Any]:
    """The workspace's usual config as data, with top-level or pipeline keys replaced."""
    pipeline = ws.pipeline(max_requests=50, linger="60s")
    top: dict[str, Any] = {"state_dir": "state", "api": {"poll_interval": "0.1s"}}
    for key, value in changes.items():
        if key in top or key == "api":
            top[key] = value
        elif value is None:
            pipeline.pop(key, None)
        else:
            pipeline[key] = value
    top["pipeline"] = [pipeline]
    return top


def write(ws: Workspace, data: dict[str, Any]) -> None:
    ws.write_raw(dump_toml(data))


def nothing_sent(emulator: EmulatorThread) -> None:
    assert emulator.stats()["batches_created"] == 0


@pytest.fixture
def emulator(emulator_factory: Callable[..., EmulatorThread]) -> EmulatorThread:
    return emulator_factory(rules=RULES_PATH)


@pytest.fixture
def ws(emulator: EmulatorThread, workspace: Callable[..., Workspace]) -> Workspace:
    ws = workspace(emulator.base_url)
    ws.write_tickets(120)
    return ws


class TestCollidingPaths:
    """Case 4."""

    @pytest.mark.parametrize(
        ("sinks", "dead_letter", "named"),
        [
            ([{"type": "jsonl", "path": "state/spool"}], None, "state/spool"),
            ([{"type": "sqlite", "path": "state/manifest.jsonl"}], None, "manifest.jsonl"),
            ([{"type": "jsonl", "path": "state"}], None, "state"),
            ([{"type": "jsonl", "path": "out/labels"}], {"type": "jsonl", "path": "out/labels"},
             "out/labels"),
            ([{"type": "sqlite", "path": "out/a.sqlite"}] * 2, None, "out/a.sqlite"),
            ([{"type": "jsonl", "path": "out/labels"}], {"type": "jsonl", "path": "state/dead"},
             None),  # inside the state dir but no file of batchd's own: allowed
        ],
    )
    def test_outputs_colliding_with_state_or_each_other_are_refused(
        self, ws: Workspace, emulator: EmulatorThread, sinks: list[dict[str, Any]],
        dead_letter: dict[str, Any] | None, named: str | None,
    ) -> None:
        data = config(ws, sink=sinks, dead_letter=dead_letter or {"type": "jsonl",
                                                                  "path": "out/dead-letters"})
        write(ws, data)
        proc = ws.run()
        if named is None:
            assert proc.returncode == 0, describe(proc)
            return
        assert proc.returncode == 2, describe(proc)
        error = one_line(proc)
        assert named in error
        nothing_sent(emulator)
        manifest = ws.state_dir / MANIFEST_NAME
        assert not manifest.exists() or manifest.read_bytes()[:8] != b"SQLite f"

    @pytest.mark.parametrize("link", [None, "out", "out/labels.sqlite"])
    def test_validate_refuses_the_collisions_run_refuses(
        self, ws: Workspace, emulator: EmulatorThread, link: str | None
    ) -> None:
        """A sink on the key ledger, named directly or reached through a symlink (a whole
        `out` pointing into the state dir, or the file itself): `validate` lists what `run`
        would refuse, instead of saying OK."""
        (ws.state_dir / "spool").mkdir(parents=True)
        sinks = [{"type": "sqlite", "path": "out/labels.sqlite" if link else "state/keys.sqlite"}]
        if link == "out":
            (ws.root / "out").symlink_to("state")
            sinks = [{"type": "sqlite", "path": "out/keys.sqlite"}]
        elif link:
            (ws.root / "out").mkdir()
            (ws.root / link).symlink_to("../state/keys.sqlite")
        write(ws, config(ws, sink=sinks, dead_letter={"type": "jsonl", "path": "dead"}))
        checked = ws.run("validate", str(ws.config_path))
        assert checked.returncode == 2, describe(checked)
        assert "batchd's own keys.sqlite" in checked.stdout + checked.stderr
        refused = ws.run()
        assert refused.returncode == 2 and "keys.sqlite" in one_line(refused)
        nothing_sent(emulator)

    def test_sqlite_sink_on_a_file_that_is_not_sqlite(
        self, ws: Workspace, emulator: EmulatorThread
    ) -> None:
        """A careless `path = "tickets.csv"` for the sqlite sink (the input itself): exit 2
        naming it, not exit 1 and a restart loop; the file is untouched, nothing sent."""
        source = ws.root / "tickets.csv"
        before = source.read_bytes()
        write(ws, config(ws, sink=[{"type": "sqlite", "path": "tickets.csv"}]))
        refused = ws.run()
        assert refused.returncode == 2, describe(refused)
        error = one_line(refused)
        assert str(source) in error and "not a SQLite database" in error
        assert source.read_bytes() == before
        nothing_sent(emulator)

    @pytest.mark.parametrize("looped", ["state", "out/labels"])
    def test_a_symlink_loop_is_one_line_not_a_traceback(
        self, ws: Workspace, emulator: EmulatorThread, looped: str
    ) -> None:
        """`ln -s state state` (or the jsonl sink's directory linked to itself): exit 2 with
        one line naming the path, from `run` and `validate`, not a RuntimeError traceback."""
        link = ws.root / looped
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(link.name)
        write(ws, config(ws))
        for argv in ([], ["validate", str(ws.config_path)]):
            proc = ws.run(*argv)
            assert proc.returncode == 2, describe(proc)
            assert "Traceback" not in proc.stderr, describe(proc)
            assert str(link) in proc.stdout + proc.stderr and "symlink loop" in (
                proc.stdout + proc.stderr)
        nothing_sent(emulator)

    def test_jsonl_path_that_is_a_file(self, ws: Workspace, emulator: EmulatorThread) -> None:
        (ws.root / "out").mkdir()
        (ws.root / "out" / "labels").write_text("not a directory\n")
        write(ws, config(ws))
        proc = ws.run()
        assert proc.returncode == 2, describe(proc)
        error = one_line(proc)
        assert "out/labels" in error and "directory" in error
        nothing_sent(emulator)

    def test_two_daemons_cannot_write_one_jsonl_directory(
        self, emulator_factory: Callable[..., EmulatorThread],
        workspace: Callable[..., Workspace],
    ) -> None:
        """Two state dirs, one jsonl directory, one pipeline name: the second daemon is refused
        while the first runs, and after it too (its part files would be overwritten)."""
        emulator = emulator_factory(rules=RULES_PATH, latency=2.0)
        first = workspace(emulator.base_url, "a")
        keys = csv_keys(first.write_tickets(100))
        shared = first.root / "out" / "labels"
        write(first, config(first))
        second = workspace(emulator.base_url, "b")
        second.write_tickets(100, seed=99)
        data = config(second)
        data["pipeline"][0]["sink"][1]["path"] = str(shared)
        write(second, data)

        daemon = start_daemon(first, until_drained=True)
        lock = wait_for(lambda: list(shared.glob(".*lock")) if shared.is_dir() else [],
                        "the first daemon's lock")
        assert lock
        busy = second.run()
        assert busy.returncode == 2, describe(busy)
        assert str(shared) in one_line(busy)
        assert daemon.wait(timeout=120) == 0
        after = second.run()
        assert after.returncode == 2, describe(after)
        assert str(shared) in one_line(after)
        assert_nothing_lost(first, keys)


class TestDefaultDeadLetters:
    """Case 9."""

    def test_dead_letters_default_to_the_state_dir(
        self, emulator: EmulatorThread, workspace: Callable[..., Workspace]
    ) -> None:
        """No [pipeline.dead_letter]: dead letters go to STATE/dead-letters/PIPELINE, even with
        the config in a read-only directory (/etc under ProtectSystem=strict)."""
        ws = workspace(emulator.base_url)
        ws.write_tickets(60, bad_rows=True)
        etc = ws.root / "etc"
        data = config(ws, dead_letter=None, state_dir=str(ws.state_dir))
        data["pipeline"][0]["source"]["path"] = str(ws.root / "tickets.csv")
        for sink in data["pipeline"][0]["sink"]:
            sink["path"] = str(ws.root / sink["path"])
        etc.mkdir()
        (etc / "batchd.toml").write_text(dump_toml(data))
        with read_only_dir(etc):
            ws.config_path = etc / "batchd.toml"
            ws.run_ok()
            listed = ws.run("dead-letters", "list", str(ws.config_path), "tickets")
        assert listed.returncode == 0, describe(listed)
        parts = list((ws.state_dir / "dead-letters" / "tickets").glob("*.jsonl"))
        assert parts
        assert "2 dead letters" in listed.stderr
        assert not (etc / "dead-letters").exists()


class TestOneLineErrors:
    """Case 10."""

    def test_read_only_state_dir(self, ws: Workspace, emulator: EmulatorThread) -> None:
        write(ws, config(ws))
        with tmpfs(ws.state_dir, size="1m"):
            remount_read_only(ws.state_dir)
            proc = ws.run()
        assert proc.returncode == 2, describe(proc)
        error = one_line(proc)
        assert str(ws.state_dir) in error
        assert "read-only" in error.lower() or "not a writable directory" in error
        nothing_sent(emulator)

    def test_state_dir_on_a_full_disk(
        self, emulator: EmulatorThread, workspace: Callable[..., Workspace]
    ) -> None:
        ws = workspace(emulator.base_url)
        keys = csv_keys(ws.write_tickets(3000))
        write(ws, config(ws, batching={"max_requests": 2000, "linger": "60s"}))
        with tmpfs(ws.state_dir, size="400k"):
            proc = ws.run()
            assert proc.returncode == 1, describe(proc)
            error = one_line(proc)
            assert str(ws.state_dir) in error and "No space left" in error
            moved = ws.root / "moved"
            shutil.copytree(ws.state_dir, moved, symlinks=True)
        # Moved to a disk with room, the same state goes on and pays nothing twice.
        ws.state_dir.rmdir()
        moved.rename(ws.state_dir)
        ws.run_ok()
        assert_paid_once(emulator, expected=[f"t-{k}" for k in keys])
        assert_nothing_lost(ws, keys)

    @pytest.mark.parametrize("where", ["state_dir", "source", "sink", "base_url"])
    def test_nul_in_a_path_or_url(
        self, ws: Workspace, emulator: EmulatorThread, where: str
    ) -> None:
        data = config(ws)
        if where == "state_dir":
            data["state_dir"] = "st\x00ate"
        elif where == "source":
            data["pipeline"][0]["source"]["path"] = "tick\x00ets.csv"
        elif where == "sink":
            data["pipeline"][0]["sink"][1]["path"] = "out/la\x00bels"
        else:
            data["api"]["base_url"] = emulator.base_url + "\x00"
        write(ws, data)
        proc = ws.run()
        assert proc.returncode == 2, describe(proc)
        error = one_line(proc)
        assert "NUL" in error
        nothing_sent(emulator)

    def test_state_dir_that_cannot_be_made(self, ws: Workspace, emulator: EmulatorThread) -> None:
        """A parent the kernel refuses (under /proc): one line naming it, exit 2, nothing sent."""
        write(ws, config(ws, state_dir="/proc/no-such-dir/state"))
        proc = ws.run()
        assert proc.returncode == 2, describe(proc)
        assert "/proc/no-such-dir" in one_line(proc)
        nothing_sent(emulator)

    def test_status_on_a_state_dir_it_cannot_read(
        self, ws: Workspace, emulator: EmulatorThread
    ) -> None:
        data = config(ws, state_dir=str(ws.state_dir))
        write(ws, data)
        ws.run_ok()
        if os.geteuid() == 0:
            # An operator who is not the service's user: the config is readable, the state not.
            public = Path(tempfile.mkdtemp(prefix="batchd-etc-"))
            public.chmod(0o755)
            readable = public / "batchd.toml"
            readable.write_text(dump_toml(data))
            readable.chmod(0o644)
            proc = subprocess.run(
                ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                 *ws.command("status", str(readable))],
                cwd=ws.root, env=ws.env(), capture_output=True, text=True, timeout=60,
            )
        else:
            ws.state_dir.chmod(0)
            try:
                proc = ws.run("status", str(ws.config_path))
            finally:
                ws.state_dir.chmod(0o700)
        assert proc.returncode != 0, describe(proc)
        error = one_line(proc)
        assert str(ws.state_dir) in error and "ermission denied" in error

    def test_a_sink_on_a_full_disk_alarms_pauses_and_recovers(
        self, emulator: EmulatorThread, workspace: Callable[..., Workspace]
    ) -> None:
        """A full disk under a jsonl sink: the error names the file, the `sink_failed` alarm is
        raised once, the pipeline pauses (no new batch is paid for), and it goes on by itself
        once the sink can write again."""
        ws = workspace(emulator.base_url)
        keys = csv_keys(ws.write_tickets(200))
        write(ws, config(ws))
        with tmpfs(ws.jsonl_dir, size="64k") as mount:
            filler = fill(mount)
            daemon = start_daemon(ws, until_drained=True)
            try:
                alarm = wait_for(lambda: sink_alarm(ws), "the sink alarm", timeout=90)
                assert f"{ws.jsonl_dir}/.tickets-" in alarm["message"]
                assert "No space left on device" in alarm["message"]
                assert ws.status()["pipelines"][0]["paused"].startswith("sink_failed")
                created = emulator.stats()["batches_created"]
                time.sleep(1.5)  # a few retry rounds: no new batch, no second alarm
                assert emulator.stats()["batches_created"] == created
                assert len([a for a in ws.status()["alarms"] if a["kind"] == "sink_failed"]) == 1
                filler.unlink()
                assert daemon.wait(timeout=120) == 0
            finally:
                stop_daemon(daemon, signal.SIGKILL)
            assert_paid_once(emulator, expected=[f"t-{k}" for k in keys])
            assert_nothing_lost(ws, keys)


def sink_alarm(ws: Workspace) -> dict[str, Any] | None:
    found = [a for a in ws.status()["alarms"] if a["kind"] == "sink_failed"]
    return found[-1] if found else None


@contextlib.contextmanager
def read_only_dir(path: Path) -> Iterator[None]:
    """A directory the daemon cannot write: a read-only bind mount (root) or mode 0555."""
    if os.geteuid() == 0:
        subprocess.run(["mount", "--bind", str(path), str(path)], check=True)
        subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], check=True)
        try:
            yield
        finally:
            subprocess.run(["umount", "-l", str(path)], check=False)
    else:
        path.chmod(0o555)
        try:
            yield
        finally:
            path.chmod(0o755)


class TestPrivateModes:
    """Case 11."""

    def test_state_and_outputs_are_private_whatever_the_umask(
        self, ws: Workspace, emulator: EmulatorThread
    ) -> None:
        data = config(ws)
        data["pipeline"][0]["dead_letter"]["mode"] = "0640"
        write(ws, data)
        old = os.umask(0o022)  # as a shell's, when run by hand
        try:
            ws.crash("after_ended:1")  # spool files are on disk
            assert ws.spool_files()
        finally:
            os.umask(old)
        assert stat.S_IMODE(ws.state_dir.stat().st_mode) == 0o700
        for path in ws.state_dir.rglob("*"):
            want = 0o700 if path.is_dir() else 0o600
            assert stat.S_IMODE(path.stat().st_mode) == want, path
        ws.run_ok()
        for path in [ws.sqlite_path, *ws.jsonl_dir.glob("*.jsonl")]:
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        assert stat.S_IMODE(ws.jsonl_dir.stat().st_mode) == 0o700
        for path in ws.dead_dir.glob("*.jsonl"):
            assert stat.S_IMODE(path.stat().st_mode) == 0o640, path


class TestLedgerSize:
    """Case 12."""

    def test_ledger_size_is_in_status_and_metrics(
        self, ws: Workspace, emulator: EmulatorThread
    ) -> None:
        write(ws, config(ws, ledger_retention="30d"))
        ws.run_ok()
        status = ws.status()
        assert status["ledger"]["bytes"] > 0
        assert status["pipelines"][0]["ledger_keys"] == 120
        assert status["pipelines"][0]["ledger_retention_seconds"] == 30 * 86400
        metrics = Metrics(process_metrics=False)
        Telemetry(metrics, "tickets").refresh([], 10, ledger_bytes=status["ledger"]["bytes"])
        assert f"batchd_ledger_bytes {float(status['ledger']['bytes'])}" in metrics.render()

    def test_ledger_retention_forgets_old_keys_of_retired_chunks(self, tmp_path: Path) -> None:
        """Past the retention a key may come back (a stream's ticket reopened a month later):
        it is a new record, not a duplicate; keys of live chunks are never forgotten."""
        clock = [1000.0]
        ledger = KeyLedger(tmp_path / "keys.sqlite", now=lambda: clock[0])
        try:
            ledger.claim("p", 0, "p-000000", [("old", {"line": 1})])
            ledger.claim("p", 1, "p-000001", [("live", {"line": 2})])
            clock[0] += 31 * 86400
            assert ledger.prune("p", 30 * 86400, below_chunk_no=1) == 1
            claim = ledger.claim("p", 2, "p-000002", [("old", {"line": 9}), ("live", {"line": 9})])
            assert claim.duplicates == {"live": "p-000001"}
            assert ledger.count("p") == 2  # "old" claimed again, "live" still p-000001
            assert ledger.size_bytes() > 0
        finally:
            ledger.close()

    def test_retention_is_a_duration_or_off(self, ws: Workspace) -> None:
        for value, seconds in (("30d", 30 * 86400.0), ("off", 0.0)):
            write(ws, config(ws, ledger_retention=value))
            assert load_config(ws.config_path).pipelines[0].ledger_retention == seconds
        write(ws, config(ws, ledger_retention="soon"))
        with pytest.raises(ConfigError, match="ledger_retention"):
            load_config(ws.config_path)
