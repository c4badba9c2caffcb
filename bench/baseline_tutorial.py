"""
The way most tutorials move a CSV through the Message Batches API — the yardstick batchd is
measured against.

    .venv/bin/python bench/baseline_tutorial.py [--rows 100000]
    .venv/bin/python bench/baseline_tutorial.py --csv tickets.csv --db out.sqlite  # as a child

Read the whole CSV, build the whole ``requests`` list in memory, ``batches.create`` it (at most
100,000 requests a batch), poll ``retrieve`` until ``ended``, let the SDK parse
``batches.results()`` into a dict of answers, then one ``INSERT OR REPLACE`` per row into
SQLite and a commit at the end. Same model, prompt, ``max_tokens``, custom_ids and polling
interval as bench_engine.py gives batchd, so only the way of working differs.

With ``--csv`` it only does that (against ``ANTHROPIC_BASE_URL``) and prints one JSON line;
bench_engine.py runs it like that as a subprocess so its peak RSS is its own. Without it, it
makes the CSV, starts the emulator and runs itself that way, printing the figures.
"""

from __future__ import annotations

import argparse
import csv
import os
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anthropic
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import EmulatorProcess, mb, run_measured, write_csv

MODEL = "claude-haiku-4-5"
MAX_TOKENS = 8
SYSTEM = ("Classify the support ticket as one of: billing, bug, feature, account, other. "
          "Answer with the label only.")
MAX_BATCH = 100_000


def tutorial(csv_path: Path, db_path: Path, poll_interval: float) -> dict[str, Any]:
    """The tutorial's steps, timed; returns what it counted."""
    client = anthropic.Anthropic(api_key=os.environ.get("ANTHROPIC_API_KEY") or "bench")
    marks: dict[str, float] = {}
    started = time.perf_counter()

    with csv_path.open(newline="", encoding="utf-8") as source:
        rows = list(csv.DictReader(source))
    requests = [
        {
            "custom_id": f"t-{row['ticket_id']}",
            "params": {
                "model": MODEL,
                "max_tokens": MAX_TOKENS,
                "system": SYSTEM,
                "messages": [{"role": "user", "content": row["body"]}],
            },
        }
        for row in rows
    ]
    marks["build requests"] = time.perf_counter() - started

    answers: dict[str, str] = {}
    errors = 0
    for start in range(0, len(requests), MAX_BATCH):
        step = time.perf_counter()
        batch = client.messages.batches.create(requests=requests[start:start + MAX_BATCH])  # type: ignore[arg-type]
        marks["create"] = marks.get("create", 0.0) + time.perf_counter() - step
        step = time.perf_counter()
        while batch.processing_status != "ended":
            time.sleep(poll_interval)
            batch = client.messages.batches.retrieve(batch.id)
        marks["poll"] = marks.get("poll", 0.0) + time.perf_counter() - step
        step = time.perf_counter()
        for result in client.messages.batches.results(batch.id):
            if result.result.type == "succeeded":
                block = result.result.message.content[0]
                text = block.text if block.type == "text" else ""
                answers[result.custom_id] = text.strip().lower()
            else:
                errors += 1
        marks["results (SDK)"] = marks.get("results (SDK)", 0.0) + time.perf_counter() - step

    step = time.perf_counter()
    db = sqlite3.connect(db_path)
    db.execute("CREATE TABLE IF NOT EXISTS results (key TEXT PRIMARY KEY, label TEXT)")
    for custom_id, label in answers.items():
        db.execute("INSERT OR REPLACE INTO results (key, label) VALUES (?, ?)",
                   (custom_id[2:], label))
    db.commit()
    db.close()
    marks["sqlite"] = time.perf_counter() - step
    return {"rows": len(rows), "answers": len(answers), "errors": errors,
            "seconds": {k: round(v, 3) for k, v in marks.items()}}


def standalone(rows: int, poll_interval: float) -> int:
    """Make the CSV, start the emulator, run the tutorial as a measured child, print."""
    with tempfile.TemporaryDirectory(prefix="bench-baseline-") as tmp:
        work = Path(tmp)
        csv_path = write_csv(work / "tickets.csv", rows)
        with EmulatorProcess(work / "emulator") as emulator:
            env = {**os.environ, "ANTHROPIC_BASE_URL": emulator.base_url,
                   "ANTHROPIC_API_KEY": "bench"}
            run = run_measured(
                [sys.executable, __file__, "--csv", str(csv_path), "--db",
                 str(work / "baseline.sqlite"), "--poll-interval", str(poll_interval)],
                env=env, cwd=work,
            )
            calls = emulator.api_calls()
        if run.returncode != 0:
            print("baseline failed:", *run.stderr_tail, sep="\n", file=sys.stderr)
            return 1
        report = orjson.loads(run.stdout.strip().splitlines()[-1])
    print(f"rows               {rows}")
    print(f"wall               {run.wall_s:.2f} s  ({rows / run.wall_s:,.0f} records/s)")
    print(f"peak RSS           {mb(run.peak_rss)}")
    print(f"CPU                {run.cpu_s:.2f} s")
    print(f"API calls          {sum(calls.values())}  {calls}")
    print(f"answers stored     {report['answers']}")
    for step, seconds in report["seconds"].items():
        print(f"  {step:<16} {seconds:.2f} s")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000, help="standalone: CSV rows")
    parser.add_argument("--csv", type=Path, help="run the tutorial on this CSV and print JSON")
    parser.add_argument("--db", type=Path, help="SQLite file to write (with --csv)")
    parser.add_argument("--poll-interval", type=float, default=0.2)
    args = parser.parse_args()
    if args.csv is None:
        return standalone(args.rows, args.poll_interval)
    if args.db is None:
        parser.error("--csv needs --db")
    report = tutorial(args.csv, args.db, args.poll_interval)
    sys.stdout.buffer.write(orjson.dumps(report) + b"\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
