"""
asyncpg or psycopg 3 for the PostgreSQL sink and source: measured, not guessed.

    .venv/bin/python bench/bench_pg_drivers.py [--rows 100000] [--group 10000]

Both drivers do exactly what the sink's results mode does per group (COPY the
rows into a temp table, one ``INSERT … ON CONFLICT (key) DO UPDATE``, commit)
and what the source does (keyset pages of 1,000 rows), on the same server and
data, one after the other. psycopg is only needed to run this comparison
(``pip install 'psycopg[binary]'``); batchd itself uses asyncpg.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid

import asyncpg

DSN = os.environ.get("BATCHD_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
COLUMNS = ("key", "custom_id", "status", "output", "model", "input_tokens", "output_tokens",
           "cost_usd", "batch_id", "attempt")
TABLE_SQL = (
    "CREATE TABLE {t} (key TEXT PRIMARY KEY, custom_id TEXT, status TEXT, output TEXT,"
    " model TEXT, input_tokens INTEGER, output_tokens INTEGER, cost_usd DOUBLE PRECISION,"
    " batch_id TEXT, attempt INTEGER, updated_at TIMESTAMPTZ DEFAULT now())"
)
UPSERT = (
    "INSERT INTO {t} ({cols}) SELECT {cols} FROM stage ON CONFLICT (key) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in COLUMNS[1:])
)


def rows(start: int, count: int) -> list[tuple[object, ...]]:
    return [
        (f"T{n:09d}", f"t-{n}", "succeeded", "billing", "claude-haiku-4-5", 42, 2, 0.000031,
         "msgbatch_0123456789", 1)
        for n in range(start, start + count)
    ]


async def asyncpg_sink(table: str, total: int, group: int) -> float:
    conn = await asyncpg.connect(DSN)
    began = time.perf_counter()
    for start in range(0, total, group):
        async with conn.transaction():
            await conn.execute(f"CREATE TEMP TABLE stage (LIKE {table}) ON COMMIT DROP")
            await conn.copy_records_to_table("stage", records=rows(start, group), columns=COLUMNS)
            await conn.execute(UPSERT.format(t=table, cols=", ".join(COLUMNS)))
    elapsed = time.perf_counter() - began
    await conn.close()
    return total / elapsed


async def psycopg_sink(table: str, total: int, group: int) -> float:
    import psycopg

    conn = await psycopg.AsyncConnection.connect(DSN)
    began = time.perf_counter()
    for start in range(0, total, group):
        async with conn.transaction():
            await conn.execute(f"CREATE TEMP TABLE stage (LIKE {table}) ON COMMIT DROP")
            async with conn.cursor().copy(
                f"COPY stage ({', '.join(COLUMNS)}) FROM STDIN"
            ) as copy:
                for row in rows(start, group):
                    await copy.write_row(row)
            await conn.execute(UPSERT.format(t=table, cols=", ".join(COLUMNS)))
    elapsed = time.perf_counter() - began
    await conn.close()
    return total / elapsed


async def asyncpg_source(table: str) -> float:
    conn = await asyncpg.connect(DSN)
    began, last, count = time.perf_counter(), "", 0
    while page := await conn.fetch(
        f"SELECT key, output FROM {table} WHERE key > $1 ORDER BY key LIMIT 1000", last
    ):
        count += len(page)
        last = page[-1]["key"]
    elapsed = time.perf_counter() - began
    await conn.close()
    return count / elapsed


async def psycopg_source(table: str) -> float:
    import psycopg

    conn = await psycopg.AsyncConnection.connect(DSN)
    began, last, count = time.perf_counter(), "", 0
    while True:
        cur = await conn.execute(
            f"SELECT key, output FROM {table} WHERE key > %s ORDER BY key LIMIT 1000", (last,)
        )
        page = await cur.fetchall()
        if not page:
            break
        count += len(page)
        last = page[-1][0]
    elapsed = time.perf_counter() - began
    await conn.close()
    return count / elapsed


async def main(total: int, group: int) -> None:
    admin = await asyncpg.connect(DSN)
    results: dict[str, tuple[float, float]] = {}
    try:
        for name, sink, source in (("asyncpg", asyncpg_sink, asyncpg_source),
                                   ("psycopg 3", psycopg_sink, psycopg_source)):
            table = f"bench_{uuid.uuid4().hex[:8]}"
            await admin.execute(TABLE_SQL.format(t=table))
            try:
                written = await sink(table, total, group)
                read = await source(table)
            except ImportError:
                print(f"{name}: not installed, skipped")
                continue
            finally:
                await admin.execute(f"DROP TABLE IF EXISTS {table}")
            results[name] = (written, read)
            print(f"{name:10} sink {written:10,.0f} rows/s   source {read:10,.0f} rows/s")
    finally:
        await admin.close()
    if len(results) == 2:
        (aw, ar), (pw, pr) = results["asyncpg"], results["psycopg 3"]
        print(f"asyncpg/psycopg: sink {aw / pw:.2f}x, source {ar / pr:.2f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--group", type=int, default=10_000)
    args = parser.parse_args()
    asyncio.run(main(args.rows, args.group))
