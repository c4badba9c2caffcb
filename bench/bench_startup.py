"""
What a command costs before it does anything: wall time and peak RSS of short commands.

    .venv/bin/python bench/bench_startup.py
    .venv/bin/python bench/bench_startup.py --runs 9 --build today=/path/to/other/.venv/bin

Each command runs ``--runs`` times as a fresh process (the first is a warm-up and not
counted); the median wall time, CPU time (user + system) and peak RSS (``wait4``'s ``ru_maxrss``,
the process's own) are printed. ``--build NAME=BIN`` adds another installation (its
``BIN/batchd`` and ``BIN/python``), measured in the same run, interleaved with this one so
machine load falls on both alike, and printed as a ratio to the first build. Targets
(issue 13): ``batchd --help`` and ``batchd status`` <= 0.3 s.

Commands: ``batchd --help``; ``batchd status CONFIG`` and ``batchd validate CONFIG`` on a
CSV→SQLite config of 1,000 rows that has not run; ``python -c "import batchd"`` (what a
plugin pays to import the facade).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import write_csv

CONFIG = """\
state_dir = "state"

[[pipeline]]
name = "tickets"
custom_id = "t-{{ticket_id}}"

[pipeline.source]
type = "csv"
path = "{csv}"
key = "ticket_id"

[pipeline.request]
model = "claude-haiku-4-5"
max_tokens = 8
user = "{{body}}"

[[pipeline.sink]]
type = "sqlite"
path = "out.sqlite"

[pipeline.dead_letter]
type = "jsonl"
path = "dead-letters"
"""


@dataclass(frozen=True, slots=True)
class Sample:
    wall_s: float
    cpu_s: float  # user + system: steadier than wall time on a busy machine
    peak_rss: int  # bytes
    returncode: int


def measure(command: list[str], env: dict[str, str], cwd: Path) -> Sample:
    """One run to its end: wall time (blocking wait4, no polling) and its own peak RSS."""
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    return Sample(wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024,
                  process.returncode)


def commands(bin_dir: Path, config: Path) -> dict[str, list[str]]:
    batchd, python = str(bin_dir / "batchd"), str(bin_dir / "python")
    return {
        "batchd --help": [batchd, "--help"],
        "batchd status CONFIG": [batchd, "status", str(config)],
        "batchd validate CONFIG": [batchd, "validate", str(config)],
        'python -c "import batchd"': [python, "-c", "import batchd"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7, help="runs per command (plus a warm-up)")
    parser.add_argument("--build", action="append", default=[], metavar="NAME=BIN",
                        help="another installation's bin directory, e.g. today=/x/.venv/bin")
    args = parser.parse_args()
    builds = {"this": Path(sys.executable).parent}
    for spec in args.build:
        name, _, path = spec.partition("=")
        builds[name] = Path(path)
    env = {**os.environ, "ANTHROPIC_API_KEY": "bench"}
    # An installed package has its bytecode cached (pip compiles it); a shell that sets
    # PYTHONDONTWRITEBYTECODE would make every run compile every module (~0.08 s of status).
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        work = Path(tmp)
        config = work / "pipeline.toml"
        config.write_text(CONFIG.format(csv=write_csv(work / "tickets.csv", 1000)))
        plan = {name: commands(bin_dir, config) for name, bin_dir in builds.items()}
        samples: dict[tuple[str, str], list[Sample]] = {}
        print(f"runs {args.runs} (+1 warm-up), cores {os.cpu_count()}, "
              f"load {os.getloadavg()[0]:.2f}, builds: "
              + ", ".join(f"{n}={p}" for n, p in builds.items()))
        for label in plan["this"]:
            for run in range(args.runs + 1):
                for name in builds:  # interleaved: load falls on every build alike
                    sample = measure(plan[name][label], env, work)
                    if sample.returncode != 0:
                        print(f"{name}: {label} exited {sample.returncode}")
                        return 1
                    if run:
                        samples.setdefault((name, label), []).append(sample)
        first = next(iter(builds))
        print(f"{'command':<28} {'build':<8} {'median wall':>12} {'CPU':>8} {'peak RSS':>10}"
              + ("   ratio to " + first if len(builds) > 1 else ""))
        for label in plan[first]:
            base = statistics.median(s.wall_s for s in samples[(first, label)])
            for name in builds:
                runs = samples[(name, label)]
                wall = statistics.median(s.wall_s for s in runs)
                cpu = statistics.median(s.cpu_s for s in runs)
                rss = statistics.median(s.peak_rss for s in runs)
                ratio = f"   {wall / base:.2f}x" if name != first else ""
                print(f"{label:<28} {name:<8} {wall:>10.3f} s {cpu:>6.3f} s {rss / 1e6:>7.1f} MB"
                      f"{ratio}")
        print(f"load at the end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
