"""
Runs every benchmark script in bench/ in turn, each with its default arguments, then prints
a one-line summary per script. One failing (or missing a server it needs) does not stop the
rest; the exit code is 1 if any failed.

    .venv/bin/python bench/run_all.py [--only engine collector] [--skip kafka]
                                      [--timeout 1800] [--log-dir DIR]

Scripts run one after another, never together: they measure throughput on a shared machine.
Each script's own output is streamed as it runs and also kept in ``--log-dir`` if given.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent


@dataclass(slots=True)
class Outcome:
    script: str
    status: str  # ok, failed (exit N), timed out
    seconds: float


def discover(only: list[str], skip: list[str]) -> list[Path]:
    """``bench/*.py`` except helpers (``_*.py``) and this file, filtered by substrings."""
    scripts = sorted(
        path for path in BENCH.glob("*.py")
        if not path.name.startswith("_") and path.name != Path(__file__).name
    )
    if only:
        scripts = [p for p in scripts if any(word in p.stem for word in only)]
    return [p for p in scripts if not any(word in p.stem for word in skip)]


def _stop_group(pgid: int) -> None:
    """SIGTERM the script's process group, SIGKILL whatever is left after a grace period."""
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 0.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


def run_one(script: Path, timeout: float, log_dir: Path | None) -> Outcome:
    print(f"\n===== {script.name} =====", flush=True)
    log = (log_dir / f"{script.stem}.txt").open("wb") if log_dir else None
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, str(script)], cwd=ROOT, start_new_session=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert process.stdout is not None
    # A silent hang cannot block the rest; the whole group goes, emulators and brokers included.
    timer = threading.Timer(timeout, _stop_group, (process.pid,))
    timer.start()
    try:
        for line in process.stdout:
            sys.stdout.buffer.write(line)
            sys.stdout.flush()
            if log:
                log.write(line)
        code = process.wait()
    finally:
        timer.cancel()
        if log:
            log.close()
    seconds = time.perf_counter() - started
    if code == 0:
        status = "ok"
    elif seconds >= timeout:
        status = f"timed out after {timeout:.0f} s"
    else:
        status = f"failed (exit {code})"
    return Outcome(script.name, status, seconds)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--only", nargs="*", default=[], help="run scripts whose name has these")
    parser.add_argument("--skip", nargs="*", default=[], help="skip scripts whose name has these")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per script")
    parser.add_argument("--log-dir", type=Path, help="keep each script's output here")
    args = parser.parse_args()
    if args.log_dir:
        args.log_dir.mkdir(parents=True, exist_ok=True)

    scripts = discover(args.only, args.skip)
    if not scripts:
        print("no benchmark scripts matched", file=sys.stderr)
        return 1
    outcomes = [run_one(script, args.timeout, args.log_dir) for script in scripts]

    print("\n===== summary =====")
    for outcome in outcomes:
        print(f"{outcome.script:<28} {outcome.status:<24} {outcome.seconds:7.1f} s")
    failed = [o for o in outcomes if o.status != "ok"]
    print(f"{len(outcomes) - len(failed)} ok, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
