"""
Append throughput of the write-ahead manifest with group commit, plus replay and compaction.

    .venv/bin/python bench/bench_manifest.py [--appends 5000] [--dir /var/lib/batchd-bench]

For 1, 10 and 100 concurrent appenders it reports appends/s and records per fsync
(group commit should make the latter grow with concurrency), then how fast the
resulting log replays and compacts. Run it on the disk the state dir will live on:
fsync cost is the whole story. Every append is a real fdatasync'd record.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from batchd.daemon.wal.manifest import Manifest, replay


async def appenders(state_dir: Path, concurrency: int, total: int) -> None:
    """Run *total* alarm appends from *concurrency* tasks and print the rate."""
    per_task = total // concurrency

    async def worker(n: int) -> None:
        for i in range(per_task):
            await m.append("alarm", pipeline="bench", chunk=None, kind="k", message=f"{n}/{i}")

    async with await Manifest.open(state_dir) as m:
        start = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for n in range(concurrency):
                tg.start_soon(worker, n)
        elapsed = time.perf_counter() - start
        done = per_task * concurrency
        print(
            f"{concurrency:>4} appenders: {done / elapsed:>9,.0f} appends/s  "
            f"{done / m.fsync_count:>6.1f} records/fsync  ({m.fsync_count} fsyncs, {elapsed:.2f} s)"
        )


async def replay_and_compact(state_dir: Path) -> None:
    """Time replaying and compacting the log the append runs left behind."""
    path = state_dir / "manifest.jsonl"
    size = path.stat().st_size
    start = time.perf_counter()
    state, _ = await anyio.to_thread.run_sync(replay, path)
    elapsed = time.perf_counter() - start
    print(
        f"replay: {state.seq:,} records, {size / 2**20:.1f} MiB in {elapsed:.2f} s "
        f"({state.seq / elapsed:,.0f} records/s)"
    )
    async with await Manifest.open(state_dir) as m:
        start = time.perf_counter()
        await m.compact()
        print(
            f"compact: {size:,} -> {m.size_bytes():,} bytes in {time.perf_counter() - start:.3f} s"
        )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--appends", type=int, default=5000, help="appends per concurrency level")
    parser.add_argument("--dir", type=Path, help="parent dir for the scratch state dir")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="batchd-manifest-bench-", dir=args.dir) as tmp:
        state_dir = Path(tmp)
        for concurrency in (1, 10, 100):
            await appenders(state_dir, concurrency, args.appends)
        await replay_and_compact(state_dir)


if __name__ == "__main__":
    anyio.run(main)
