"""
What the engine benchmarks share: the emulator as its own process, a child
run whose peak RSS and CPU are its own, and the tickets CSV.

Each measured program runs as a subprocess so its peak RSS is not mixed with
the emulator's or the benchmark's: ``os.wait4`` hands back the child's
``ru_maxrss`` (the kernel's high-water mark at exit, what ``/usr/bin/time -v``
prints), and a thread polls ``VmHWM`` while it runs as a cross-check. The two
differ when the benchmark itself has grown: Linux starts a child's ``ru_maxrss``
at the high-water mark of the parent it was forked from (a ``sleep`` started by a
300 MB Python reports 299 MB), so ``polled_hwm`` is the child's own.
"""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx2
import orjson

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from examples.tickets.generate import write_tickets  # noqa: E402

__all__ = (
    "ROOT",
    "RULES",
    "ChildRun",
    "EmulatorProcess",
    "batchd_command",
    "compile_package",
    "count_keys",
    "cpu_seconds",
    "mb",
    "proc_status_bytes",
    "run_measured",
    "write_csv",
)

RULES = ROOT / "examples" / "tickets" / "rules.toml"
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def mb(size: float) -> str:
    return f"{size / 1e6:.1f} MB"


def proc_status_bytes(pid: int, name: str) -> int:
    """A ``/proc/<pid>/status`` memory field (VmRSS, VmHWM) in bytes; 0 once it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return 0
    match = re.search(rf"^{name}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a live process so far (``/proc/<pid>/stat`` fields 14 and 15)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def batchd_command(*args: str) -> list[str]:
    """The installed ``batchd`` console script next to this interpreter, else ``-m``."""
    script = Path(sys.executable).parent / "batchd"
    if script.exists():
        return [str(script), *args]
    return [sys.executable, "-m", "batchd.daemon.cli", *args]


def compile_package(tree: Path = ROOT) -> int:
    """
    Byte-compile the ``batchd`` package of *tree* (its ``daemon``, ``connectors`` and
    ``plugins`` folders), as installing a wheel does; how many files were compiled.

    A process started from a source tree compiles every module it imports unless
    ``__pycache__`` holds it, and ``PYTHONDONTWRITEBYTECODE`` (set on some machines)
    keeps it from being written: each ``batchd run`` then spent ~0.25 s compiling,
    once per worker, which a user's install never does.
    """
    import compileall
    import io
    from contextlib import redirect_stdout

    count = 0
    for folder in ("daemon", "connectors", "plugins", "batchd"):
        path = tree / folder
        if path.is_dir():
            with redirect_stdout(io.StringIO()):
                compileall.compile_dir(path, quiet=2, workers=1)
            count += sum(1 for _ in path.rglob("*.py"))
    return count


def write_csv(path: Path, rows: int, seed: int = 7) -> Path:
    """The tickets CSV (ticket_id, body) the demo uses, streamed to disk."""
    write_tickets(path, rows, seed=seed)
    return path


def count_keys(db: Path, table: str = "results", column: str = "key") -> tuple[int, int]:
    """(rows, distinct keys) in a SQLite table."""
    with sqlite3.connect(db) as conn:
        rows, distinct = conn.execute(
            f'SELECT COUNT(*), COUNT(DISTINCT "{column}") FROM "{table}"'
        ).fetchone()
    return int(rows), int(distinct)


class EmulatorProcess:
    """``batchd emulator`` in its own process (latency 0 unless told), stopped on exit."""

    def __init__(self, state_dir: Path, *, latency: str = "0", rules: Path = RULES,
                 extra: tuple[str, ...] = ()) -> None:
        self.state_dir = state_dir
        self.args = ["emulator", "--port", "0", "--latency", latency,
                     "--rules", str(rules), "--state-dir", str(state_dir), *extra]
        self.process: subprocess.Popen[str] | None = None
        self.base_url = ""

    def __enter__(self) -> EmulatorProcess:
        self.process = subprocess.Popen(
            batchd_command(*self.args), cwd=ROOT, stdout=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.startswith("listening on "):
            self.process.kill()
            raise RuntimeError(f"emulator did not start: {line!r}")
        self.base_url = line.split()[-1]
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def stats(self) -> dict[str, Any]:
        response = httpx2.get(f"{self.base_url}/_emulator/stats", timeout=120)
        response.raise_for_status()
        stats: dict[str, Any] = orjson.loads(response.content)
        return stats

    def api_calls(self) -> dict[str, int]:
        """HTTP calls to ``/v1`` so far, by endpoint."""
        calls: dict[str, int] = self.stats().get("http_requests", {})
        return calls

    def reset(self) -> None:
        """Forget every batch and counter (between two measured runs)."""
        httpx2.post(f"{self.base_url}/_emulator/reset", timeout=120).raise_for_status()


@dataclass(slots=True)
class ChildRun:
    """What one measured child did."""

    returncode: int
    wall_s: float
    peak_rss: int  # bytes, from wait4's ru_maxrss
    polled_hwm: int  # bytes, the last VmHWM read while it ran
    cpu_s: float  # user + system of the child itself
    stdout: str = ""
    stderr_tail: list[str] = field(default_factory=list)


def run_measured(
    command: Sequence[str], *, env: dict[str, str], cwd: Path, timeout: float = 3600,
    stdout_path: Path | None = None, stderr_path: Path | None = None,
) -> ChildRun:
    """Run ``command`` to its end; its wall time, peak RSS and CPU, and its output."""
    out_path = stdout_path or cwd / "child.stdout"
    err_path = stderr_path or cwd / "child.stderr"
    with out_path.open("wb") as out, err_path.open("wb") as err:
        started = time.perf_counter()
        process = subprocess.Popen(list(command), cwd=cwd, env=env, stdout=out, stderr=err)
        hwm = [0]
        done = threading.Event()

        def poll() -> None:
            while not done.wait(0.1):
                hwm[0] = max(hwm[0], proc_status_bytes(process.pid, "VmHWM"))

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        deadline = started + timeout
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                process.kill()
                pid, status, usage = os.wait4(process.pid, 0)
                break
            time.sleep(0.02)
        wall = time.perf_counter() - started
        done.set()
        poller.join()
        process.returncode = os.waitstatus_to_exitcode(status)
    stderr_lines = err_path.read_text(errors="replace").splitlines()
    return ChildRun(
        returncode=process.returncode,
        wall_s=wall,
        peak_rss=usage.ru_maxrss * 1024,
        polled_hwm=hwm[0],
        cpu_s=usage.ru_utime + usage.ru_stime,
        stdout=out_path.read_text(errors="replace"),
        stderr_tail=stderr_lines[-15:],
    )
