"""
Throughput and memory of the ``postgres`` sink, both modes, against a real server.

    .venv/bin/python bench/bench_postgres_sink.py [--rows 100000] [--group 10000]

Rows are generated per put (as the engine streams a batch's results), so the
peak RSS shows what the sink itself holds; only time inside put/flush counts.
Everything is written to a scratch schema that is dropped at the end.
Target: >= 50,000 rows/s in results mode.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from batchd.plugins.contract import PluginContext
from batchd.plugins.records import ResultRow
from batchd.plugins.sinks.postgres import PostgresSink

PUT_SIZE = 1_000


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def result_rows(start: int, stop: int) -> Iterator[list[ResultRow]]:
    """Rows ``start..stop-1`` in put-sized slices, each with a ~200-byte answer."""
    for lo in range(start, stop, PUT_SIZE):
        yield [
            ResultRow(key=str(i), custom_id=f"ticket-{i}", status="succeeded", pipeline="bench",
                      output=f"billing {i} " + "x" * 200, model="claude-haiku-4-5",
                      input_tokens=120, output_tokens=4, cost_usd=0.00006,
                      batch_id=f"msgbatch_{i // 10_000}")
            for i in range(lo, min(lo + PUT_SIZE, stop))
        ]


async def run_mode(dsn: str, options: dict[str, Any], total: int, group: int) -> float:
    """Seconds spent inside put and flush for ``total`` rows in groups of ``group``."""
    context = PluginContext(pipeline="bench", state_dir=Path(tempfile.gettempdir()),
                            config_dir=Path.cwd())
    async with PostgresSink({"dsn": dsn, **options}, context) as sink:
        await sink.open()
        elapsed = 0.0
        for lo in range(0, total, group):
            name = f"g{lo // group}"
            for chunk in result_rows(lo, min(lo + group, total)):
                began = time.perf_counter()
                await sink.put(name, chunk)
                elapsed += time.perf_counter() - began
            began = time.perf_counter()
            await sink.flush(name)
            elapsed += time.perf_counter() - began
    if getattr(sink, "missing_keys", 0):
        raise SystemExit(f"update mode missed {sink.missing_keys} keys")
    return elapsed


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--dsn", default=os.environ.get(
        "BATCHD_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test"))
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--group", type=int, default=10_000)
    args = parser.parse_args()
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(args.dsn)
    await admin.execute(f'CREATE SCHEMA "{schema}"')
    try:
        print(f"rows={args.rows} group={args.group} put={PUT_SIZE} driver=asyncpg "
              f"{asyncpg.__version__}")
        results = await run_mode(args.dsn, {"table": f"{schema}.results"}, args.rows, args.group)
        replay = await run_mode(args.dsn, {"table": f"{schema}.results"}, args.rows, args.group)
        await admin.execute(
            f"CREATE TABLE {schema}.tickets (ticket_id bigint PRIMARY KEY, body text, "
            f"category text, category_model text)")
        await admin.execute(f"INSERT INTO {schema}.tickets SELECT g, 'body' "
                            f"FROM generate_series(0, $1::int) g", args.rows - 1)
        update = await run_mode(args.dsn, {
            "mode": "update", "table": f"{schema}.tickets", "key": "ticket_id",
            "set": {"category": "output", "category_model": "model"}}, args.rows, args.group)
        for label, secs in (("results (insert)", results), ("results (replay)", replay),
                            ("update", update)):
            print(f"{label:<18} {secs:7.2f} s  {args.rows / secs:10,.0f} rows/s")
        print(f"peak RSS {peak_rss_mib():.1f} MiB")
    finally:
        await admin.execute(f'DROP SCHEMA "{schema}" CASCADE')
        await admin.close()


if __name__ == "__main__":
    asyncio.run(main())
