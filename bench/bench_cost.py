"""
What prompt caching saves: 50,000 tickets with a 3,000-token shared system prompt on a
current model, ``cache = "1h"`` against no cache, billed from the emulator's usage lines
and the model catalog's prices; and ``batchd estimate``'s range, which must contain the bill.

    .venv/bin/python bench/bench_cost.py
    .venv/bin/python bench/bench_cost.py --rows 50000 --model claude-sonnet-5-5

Each variant runs ``batchd run --until-drained`` against its own ``batchd emulator``
process (latency 0: the whole backlog within the cache's TTL, the case the 1-hour TTL is
for). The bill is recomputed here from every succeeded result line (read with the SDK)
and the catalog's numbers, independently of batchd's own pricing, and compared with
``batchd status``. Exits 1 if a run failed, status disagrees with the bill by more than a
cent, or the estimate's range misses the bill.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import anthropic

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import EmulatorProcess, batchd_command, run_measured, write_csv

from batchd.daemon.models.catalog import default_catalog

SYSTEM = ("You label customer support tickets for a software company. " * 210)[:12_000]

PIPELINE = """\
state_dir = "{state}"

[api]
poll_interval = "0.2s"

[[pipeline]]
name = "tickets"
custom_id = "t-{{ticket_id}}"

[pipeline.source]
type = "csv"
path = "{csv}"
key = "ticket_id"

[pipeline.request]
model = "{model}"
max_tokens = 8
thinking = "disabled"
{cache}
system = {system}
user = "{{body}}"

[pipeline.output]
allowed = ["billing", "bug", "feature", "account", "other"]
lowercase = true

[pipeline.batching]
max_requests = 10000
linger = "60s"
max_in_flight = 4

[[pipeline.sink]]
type = "sqlite"
path = "{db}"

[pipeline.dead_letter]
type = "jsonl"
path = "{dead}"
"""


def billed(base_url: str) -> tuple[float, dict[str, int]]:
    """USD of every succeeded line, from its usage and the catalog, and the token totals."""
    client = anthropic.Anthropic(base_url=base_url, api_key="bench", max_retries=2)
    catalog = default_catalog()
    total = 0.0
    tokens = {"input": 0, "output": 0, "cache_write_5m": 0, "cache_write_1h": 0,
              "cache_read": 0}
    for batch in client.messages.batches.list(limit=100):
        for line in client.messages.batches.results(batch.id):
            if line.result.type != "succeeded":
                continue
            message = line.result.message
            info = catalog.get(message.model)
            assert info is not None and info.price is not None, message.model
            usage = message.usage
            written = usage.cache_creation_input_tokens or 0
            read = usage.cache_read_input_tokens or 0
            w1h = usage.cache_creation.ephemeral_1h_input_tokens if usage.cache_creation else 0
            price = info.prices_for(usage.input_tokens + written + read)
            assert price is not None
            total += (usage.input_tokens * price.input + usage.output_tokens * price.output
                      + (written - w1h) * price.cache_write_5m + w1h * price.cache_write_1h
                      + read * price.cache_read) / 1e6 * 0.5
            tokens["input"] += usage.input_tokens
            tokens["output"] += usage.output_tokens
            tokens["cache_write_5m"] += written - w1h
            tokens["cache_write_1h"] += w1h
            tokens["cache_read"] += read
    return total, tokens


def variant(work: Path, csv_path: Path, model: str, cache: str | None) -> dict[str, Any]:
    name = f"cache-{cache or 'none'}"
    here = work / name
    shutil.rmtree(here, ignore_errors=True)
    here.mkdir(parents=True)
    config = here / "pipeline.toml"
    config.write_text(PIPELINE.format(
        state=here / "state", csv=csv_path, model=model,
        cache=f'cache = "{cache}"' if cache else "", system=json.dumps(SYSTEM),
        db=here / "results.sqlite", dead=here / "dead"))
    env = {**os.environ, "ANTHROPIC_API_KEY": "bench", "PYTHONUNBUFFERED": "1"}
    estimate = subprocess.run([*batchd_command(), "estimate", str(config), "--json"], env=env,
                              capture_output=True, text=True, check=True, cwd=here)
    (result,) = json.loads(estimate.stdout)
    with EmulatorProcess(here / "emulator") as emulator:
        env["ANTHROPIC_BASE_URL"] = emulator.base_url
        run = run_measured([*batchd_command(), "run", str(config), "--until-drained",
                            "--log-level", "warning", "--log-format", "json"],
                           env=env, cwd=here)
        bill, tokens = billed(emulator.base_url)
    status = subprocess.run([*batchd_command(), "status", str(config), "--json"], env=env,
                            capture_output=True, text=True, check=True, cwd=here)
    pipeline = json.loads(status.stdout)["pipelines"][0]
    return {"name": name, "run": run, "bill": bill, "tokens": tokens,
            "status_cost": pipeline["cost_usd"], "rows_done": pipeline["rows_done"],
            "low": result["cost_low_usd"], "high": result["cost_high_usd"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--model", default="claude-haiku-5-5")
    parser.add_argument("--keep", type=Path)
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-cost-"))
    work.mkdir(parents=True, exist_ok=True)
    ok = True
    try:
        csv_path = write_csv(work / "tickets.csv", args.rows)
        print(f"rows {args.rows:,}, model {args.model}, system prompt {len(SYSTEM):,} chars "
              f"(~{len(SYSTEM) // 4:,} tokens), thinking off, max_tokens 8")
        results = [variant(work, csv_path, args.model, cache) for cache in (None, "1h")]
        for r in results:
            contained = r["low"] <= r["bill"] <= r["high"]
            agrees = abs(r["status_cost"] - r["bill"]) <= 0.01
            ok = ok and r["run"].returncode == 0 and contained and agrees and (
                r["rows_done"] == args.rows)
            print(f"== {r['name']}")
            print(f"  exit code          {r['run'].returncode}, wall {r['run'].wall_s:.1f} s, "
                  f"rows done {r['rows_done']:,}")
            print(f"  tokens             {r['tokens']}")
            print(f"  billed (usage x catalog)  ${r['bill']:.4f}")
            print(f"  batchd status             ${r['status_cost']:.4f}  "
                  f"({'agrees' if agrees else 'DISAGREES'} to the cent)")
            print(f"  estimate range            ${r['low']:.4f} – ${r['high']:.4f}  "
                  f"({'contains' if contained else 'MISSES'} the bill)")
        none, hour = results
        print(f"== cache 1h / no cache: billed cost ratio {hour['bill'] / none['bill']:.3f} "
              f"(saves ${none['bill'] - hour['bill']:.4f} of ${none['bill']:.4f})")
        return 0 if ok else 1
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
