"""
The shared key ledger (issue 15, schema version 6): what a claim costs PostgreSQL per key,
and how fast retention forgets a retired chunk's keys.

Claims go through ``key_ledger.claim_keys`` exactly as a cluster reader makes them (one
statement: the shard lease checked, the keys listed and inserted), ``--claim`` keys each,
from one connection whose backend's CPU (``/proc/<pid>/stat``) is read before and after:
the server's CPU per key is the figure the end-to-end bench (``bench_cluster.py``) sums
into its "PostgreSQL" column. Then every chunk is marked retired (an UPDATE, standing in
for the lifecycle, which ``bench_cluster.py`` measures) and one ``prune_ledger`` pass
forgets them all: keys per second. Needs PostgreSQL on this machine (``--dsn``); a fresh
schema is made and dropped.

    .venv/bin/python bench/bench_ledger.py                    # 1,000,000 keys, claims of 2,000
    .venv/bin/python bench/bench_ledger.py --keys 200000 --claim 1000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid
from typing import Any

import asyncpg

from batchd.daemon.cluster import key_ledger, migrations, retention, shards, workers
from batchd.daemon.cluster.schema import Sql
from batchd.daemon.intake.packer import CLAIM_EVERY_SHARED

TICK = os.sysconf("SC_CLK_TCK")


def backend_cpu(pid: int) -> float:
    """User + system seconds of one local PostgreSQL backend."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


async def seal_rows(conn: Any, sql: Sql, chunks: list[str]) -> None:
    """Chunk rows for the claimed chunks, already retired (the lifecycle is not measured)."""
    await conn.execute(sql(
        "INSERT INTO {s}.chunk (chunk, pipeline, attempt, requests, bytes, rejects, stage,"
        " shard, root, epoch, sealed_event, retired_at)"
        " SELECT c, 'p', 0, 0, 0, 0, 'retired', '0', c, 0, 0, now() - interval '1 day'"
        " FROM unnest($1::text[]) AS c"), chunks)


async def run(args: argparse.Namespace) -> None:
    sql = Sql(f"bench_ledger_{uuid.uuid4().hex[:10]}")
    conn = await asyncpg.connect(args.dsn)
    try:
        await migrations.migrate(conn, sql)
        worker = await workers.register(conn, sql, "bench", ttl=600.0)
        lease = await shards.acquire(conn, sql, worker, "p", "0", grace=0.0)
        assert lease is not None
        pid = await conn.fetchval("SELECT pg_backend_pid()")
        chunks: list[str] = []
        claim_cpu = claim_wall = 0.0
        for first in range(0, args.keys, args.claim):
            chunk = f"p-{first // args.chunk:06d}"
            if not chunks or chunks[-1] != chunk:
                chunks.append(chunk)
            entries = [(f"TCK-{n:09d}", {"line": n + 2, "offset": n * 180})
                       for n in range(first, min(first + args.claim, args.keys))]
            cpu, wall = backend_cpu(pid), time.perf_counter()
            claim = await key_ledger.claim_keys(conn, sql, lease, chunk, entries)
            claim_wall += time.perf_counter() - wall
            claim_cpu += backend_cpu(pid) - cpu
            assert not claim.duplicates and not claim.replays
        await seal_rows(conn, sql, chunks)
        cpu, wall = backend_cpu(pid), time.perf_counter()
        pruned = await retention.prune_ledger(conn, sql, "p", 0.0)
        prune_wall = time.perf_counter() - wall
        prune_cpu = backend_cpu(pid) - cpu
        left = await conn.fetchval(sql("SELECT count(*) FROM {s}.key_ledger"))
        lists = await conn.fetchval(sql("SELECT count(*) FROM {s}.key_list"))
        print(f"rows {args.keys:,} in claims of {args.claim:,}, chunks of {args.chunk:,}; "
              f"cores {os.cpu_count()}, load {os.getloadavg()[0]:.2f}")
        print(f"  claims   {args.keys / claim_wall:>10,.0f} keys/s, server CPU "
              f"{claim_cpu / args.keys * 1e6:.2f} us/key")
        print(f"  prune    {pruned.keys / prune_wall:>10,.0f} keys/s ({pruned.keys:,} keys of "
              f"{pruned.chunks} chunks in {prune_wall:.2f} s), server CPU "
              f"{prune_cpu / max(pruned.keys, 1) * 1e6:.2f} us/key; left: {left} keys, "
              f"{lists} lists")
    finally:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{sql.schema}" CASCADE')
        await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", default=os.environ.get(
        "BATCHD_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test"))
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--claim", type=int, default=CLAIM_EVERY_SHARED,
                        help="keys per claim (a cluster reader's)")
    parser.add_argument("--chunk", type=int, default=10_000, help="keys per chunk")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
