"""
End to end: a tickets CSV through ``batchd run --until-drained`` into SQLite, against the
emulator with zero latency, beside the tutorial way (baseline_tutorial.py) on the same CSV.

    .venv/bin/python bench/bench_engine.py --rows 100000
    .venv/bin/python bench/bench_engine.py --rows 1000000            # no baseline by default
    .venv/bin/python bench/bench_engine.py --rows 100000 --no-baseline --max-in-flight 8

batchd and the emulator run as separate processes (the emulator shares the machine's cores,
so its CPU is printed too), and batchd's peak RSS is its own (wait4's ``ru_maxrss``, checked
against ``VmHWM`` polled while it runs). API calls are the emulator's ``http_requests``. A run
counts only if the SQLite table then holds exactly N distinct keys and nothing was
dead-lettered. Targets: >= 20,000 records/s end to end; peak RSS < 200 MB at 1,000,000 rows and
no higher than at 100,000. Prints figures; exits 1 if a run failed or lost rows.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    ChildRun,
    EmulatorProcess,
    batchd_command,
    count_keys,
    cpu_seconds,
    mb,
    run_measured,
    write_csv,
)

PIPELINE = """\
state_dir = "{state}"

[api]
poll_interval = "{poll}s"

[[pipeline]]
name = "tickets"
custom_id = "t-{{ticket_id}}"
max_attempts = 3

[pipeline.source]
type = "csv"
path = "{csv}"
key = "ticket_id"

[pipeline.request]
model = "claude-haiku-4-5"
max_tokens = 8
system = "Classify the support ticket as one of: billing, bug, feature, account, other. \
Answer with the label only."
user = "{{body}}"

[pipeline.output]
allowed = ["billing", "bug", "feature", "account", "other"]
lowercase = true

[pipeline.batching]
max_requests = {max_requests}
linger = "60s"
max_in_flight = {max_in_flight}

[[pipeline.sink]]
type = "sqlite"
path = "{db}"

[pipeline.dead_letter]
type = "jsonl"
path = "{dead}"
"""


def _dead_letters(directory: Path) -> int:
    if not directory.exists():
        return 0
    return sum(sum(1 for _ in part.open("rb")) for part in directory.glob("*.jsonl"))


def _fresh(*paths: Path) -> None:
    """Remove what an earlier run in a kept directory left (else batchd would resume it)."""
    for path in paths:
        for leftover in (path, *path.parent.glob(path.name + "-*")):
            if leftover.is_dir():
                shutil.rmtree(leftover)
            else:
                leftover.unlink(missing_ok=True)


def run_batchd(work: Path, csv_path: Path, rows: int, args: argparse.Namespace) -> dict[str, Any]:
    config = work / "pipeline.toml"
    db, dead = work / "batchd.sqlite", work / "dead-letters"
    _fresh(db, dead, work / "state", work / "emulator-batchd")
    config.write_text(PIPELINE.format(
        state=work / "state", poll=args.poll_interval, csv=csv_path, db=db, dead=dead,
        max_requests=args.max_requests, max_in_flight=args.max_in_flight,
    ))
    with EmulatorProcess(work / "emulator-batchd") as emulator:
        env = {**os.environ, "ANTHROPIC_BASE_URL": emulator.base_url,
               "ANTHROPIC_API_KEY": "bench", "PYTHONUNBUFFERED": "1"}
        emulator_cpu = cpu_seconds(emulator.pid)
        command = shlex.split(args.batchd) if args.batchd else batchd_command()
        run = run_measured(
            [*command, "run", str(config), "--until-drained", "--log-level", "warning",
             "--log-format", "json"],
            env=env, cwd=work, timeout=args.timeout,
        )
        emulator_cpu = cpu_seconds(emulator.pid) - emulator_cpu
        calls = emulator.api_calls()
    keys = count_keys(db) if db.exists() else (0, 0)
    return {"run": run, "calls": calls, "emulator_cpu": emulator_cpu, "keys": keys,
            "dead": _dead_letters(dead)}


def run_baseline(work: Path, csv_path: Path, args: argparse.Namespace) -> dict[str, Any]:
    db = work / "baseline.sqlite"
    _fresh(db, work / "emulator-baseline")
    with EmulatorProcess(work / "emulator-baseline") as emulator:
        env = {**os.environ, "ANTHROPIC_BASE_URL": emulator.base_url,
               "ANTHROPIC_API_KEY": "bench"}
        emulator_cpu = cpu_seconds(emulator.pid)
        script = Path(__file__).resolve().parent / "baseline_tutorial.py"
        run = run_measured(
            [sys.executable, str(script), "--csv", str(csv_path), "--db", str(db),
             "--poll-interval", str(args.poll_interval)],
            env=env, cwd=work, timeout=args.timeout,
            stdout_path=work / "baseline.stdout", stderr_path=work / "baseline.stderr",
        )
        emulator_cpu = cpu_seconds(emulator.pid) - emulator_cpu
        calls = emulator.api_calls()
    report = orjson.loads(run.stdout.strip().splitlines()[-1]) if run.returncode == 0 else {}
    keys = count_keys(db) if db.exists() else (0, 0)
    return {"run": run, "calls": calls, "emulator_cpu": emulator_cpu, "keys": keys,
            "report": report}


def _print_run(label: str, rows: int, result: dict[str, Any]) -> bool:
    run: ChildRun = result["run"]
    calls: dict[str, int] = result["calls"]
    stored, distinct = result["keys"]
    ok = run.returncode == 0 and stored == distinct == rows and not result.get("dead")
    print(f"== {label}")
    print(f"  exit code          {run.returncode}")
    print(f"  wall               {run.wall_s:.2f} s")
    print(f"  records/s          {rows / run.wall_s:,.0f}  (end to end)")
    print(f"  peak RSS           {mb(run.peak_rss)}  (VmHWM polled: {mb(run.polled_hwm)})")
    print(f"  CPU                {run.cpu_s:.2f} s own, {result['emulator_cpu']:.2f} s emulator")
    print(f"  CPU per record     {run.cpu_s / rows * 1e6:.0f} us own  (ceiling on a free core: "
          f"{rows / run.cpu_s:,.0f} records/s)")
    print(f"  API calls          {sum(calls.values())}")
    for endpoint, count in sorted(calls.items()):
        print(f"    {endpoint:<44} {count}")
    print(f"  SQLite keys        {stored} rows, {distinct} distinct (want {rows})")
    if "dead" in result:
        print(f"  dead letters       {result['dead']}")
    for step, seconds in result.get("report", {}).get("seconds", {}).items():
        print(f"    {step:<18} {seconds:.2f} s")
    if not ok:
        print(f"  FAILED; last stderr lines of {label}:")
        for line in run.stderr_tail:
            print(f"    {line}")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--max-requests", type=int, default=10_000)
    parser.add_argument("--max-in-flight", type=int, default=4)
    parser.add_argument("--poll-interval", type=float, default=0.2)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per measured run")
    parser.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=None,
                        help="also run the tutorial way (default: only up to 200,000 rows)")
    parser.add_argument("--batchd", help="command that stands for `batchd` (another build, "
                        "a profiler wrapper); default: the installed console script")
    parser.add_argument("--keep", type=Path, help="work in this directory and keep it")
    args = parser.parse_args()
    baseline = args.baseline if args.baseline is not None else args.rows <= 200_000

    with tempfile.TemporaryDirectory(prefix="bench-engine-") as tmp:
        work = (args.keep or Path(tmp)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        csv_path = write_csv(work / "tickets.csv", args.rows)
        print(f"rows {args.rows}, CSV {mb(csv_path.stat().st_size)}, max_requests "
              f"{args.max_requests}, max_in_flight {args.max_in_flight}, poll "
              f"{args.poll_interval}s, cores {os.cpu_count()}, load {os.getloadavg()[0]:.2f}")
        engine = run_batchd(work, csv_path, args.rows, args)
        ok = _print_run("batchd run --until-drained", args.rows, engine)
        if baseline:
            tutorial = run_baseline(work, csv_path, args)
            ok = _print_run("tutorial baseline", args.rows, tutorial) and ok
            ours, theirs = engine["run"], tutorial["run"]
            print("== batchd / baseline")
            print(f"  wall time          {ours.wall_s / theirs.wall_s:.2f}x")
            print(f"  peak RSS           {ours.peak_rss / theirs.peak_rss:.2f}x")
            print(f"  CPU                {ours.cpu_s / theirs.cpu_s:.2f}x")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
