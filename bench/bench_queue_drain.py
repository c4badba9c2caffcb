"""
The processing queue kept full: a 1,000,000-row backlog through an emulator at a tier's
queue (Start: 200,000 requests) with a batch latency of L seconds, against the ideal
``backlog / queue x L`` (the queue full of work every moment, nothing else costing time).

    .venv/bin/python bench/bench_queue_drain.py                  # 1M rows, L = 60 s, 10k chunks
    .venv/bin/python bench/bench_queue_drain.py --latency 10     # creating 200k takes seconds too
    .venv/bin/python bench/bench_queue_drain.py --rows 200000 --latency 5   # a quick look

Chunks of 10,000 with max_in_flight 24 (20 fill the queue, 4 wait sealed): after a batch
ends, the next create is what keeps its share of the queue idle, and a small chunk is
created in well under a second.

batchd (``[api] tier`` = the emulator's tier, so it waits for room instead of being refused)
and ``batchd emulator --tier start --latency L`` run as separate processes. Prints the wall
time, the ratio to the ideal (target <= 1.15), the queue's peak occupancy (never above the
tier's), the 429s the creates met (target: none, at most one per shrink episode) and peak
RSS. Exits 1 if rows were lost, the queue was passed, or the run failed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import EmulatorProcess, batchd_command, count_keys, mb, run_measured, write_csv

QUEUES = {"start": 200_000, "build": 300_000, "scale": 500_000}

PIPELINE = """\
state_dir = "{state}"

[api]
poll_interval = "{poll}s"
poll_jitter = 0.2
tier = "{tier}"

[[pipeline]]
name = "tickets"
custom_id = "t-{{ticket_id}}"

[pipeline.source]
type = "csv"
path = "{csv}"
key = "ticket_id"

[pipeline.request]
model = "claude-haiku-5-5"
max_tokens = 8
thinking = "disabled"
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--latency", type=float, default=60.0, help="seconds a batch takes")
    parser.add_argument("--tier", choices=sorted(QUEUES), default="start")
    parser.add_argument("--max-requests", type=int, default=10_000)
    parser.add_argument("--max-in-flight", type=int, default=24)
    parser.add_argument("--poll-interval", type=float, default=0.5)
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--keep", type=Path, help="work in this directory and keep it")
    args = parser.parse_args()

    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-queue-"))
    work.mkdir(parents=True, exist_ok=True)
    for stale in ("state", "dead", "emulator"):
        shutil.rmtree(work / stale, ignore_errors=True)
    (work / "results.sqlite").unlink(missing_ok=True)
    try:
        csv_path = work / "tickets.csv"
        if not csv_path.exists() or args.keep is None:
            write_csv(csv_path, args.rows)
        config = work / "pipeline.toml"
        db = work / "results.sqlite"
        config.write_text(PIPELINE.format(
            state=work / "state", poll=args.poll_interval, tier=args.tier, csv=csv_path,
            max_requests=args.max_requests, max_in_flight=args.max_in_flight, db=db,
            dead=work / "dead"))
        queue = QUEUES[args.tier]
        ideal = args.rows / queue * args.latency
        print(f"rows {args.rows:,}, tier {args.tier} (queue {queue:,}), latency "
              f"{args.latency:g} s, chunks of {args.max_requests:,}, max_in_flight "
              f"{args.max_in_flight}, poll {args.poll_interval:g} s, cores {os.cpu_count()}, "
              f"load {os.getloadavg()[0]:.2f}")
        with EmulatorProcess(work / "emulator", latency=f"{args.latency}s",
                             extra=("--tier", args.tier)) as emulator:
            env = {**os.environ, "ANTHROPIC_BASE_URL": emulator.base_url,
                   "ANTHROPIC_API_KEY": "bench", "PYTHONUNBUFFERED": "1"}
            run = run_measured(
                [*batchd_command(), "run", str(config), "--until-drained", "--log-level",
                 "warning", "--log-format", "json"],
                env=env, cwd=work, timeout=args.timeout,
            )
            stats = emulator.stats()
        stored, distinct = count_keys(db) if db.exists() else (0, 0)
        errors: dict[str, int] = stats.get("http_errors", {})
        refused = sum(n for key, n in errors.items() if key.startswith("429"))
        peak = stats.get("peak_in_progress_requests", 0)
        ratio = run.wall_s / ideal
        print(f"  exit code          {run.returncode}")
        print(f"  wall               {run.wall_s:.2f} s")
        print(f"  ideal              {ideal:.2f} s  (rows / queue x latency)")
        print(f"  ratio to ideal     {ratio:.3f}  (target <= 1.15)")
        print(f"  queue peak         {peak:,} of {queue:,}")
        print(f"  429s               {refused}  {errors}")
        print(f"  batches created    {stats.get('batches_created')}")
        print(f"  peak RSS           {mb(run.peak_rss)}")
        print(f"  CPU                {run.cpu_s:.2f} s batchd")
        print(f"  SQLite keys        {stored:,} rows, {distinct:,} distinct (want {args.rows:,})")
        ok = run.returncode == 0 and stored == distinct == args.rows and peak <= queue
        if run.returncode != 0:
            for line in run.stderr_tail:
                print(f"    {line}")
        return 0 if ok else 1
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
