"""
Cluster mode (issue 15): what the shared store costs, end to end and at the store level.

    .venv/bin/python bench/bench_cluster.py                          # end to end, 1,000,000 rows
    .venv/bin/python bench/bench_cluster.py --rows 200000 --repeat 2 # two interleaved rounds
    .venv/bin/python bench/bench_cluster.py --mode store             # store level, 200,000 rows
    .venv/bin/python bench/bench_cluster.py --mode store --rows 50000

End to end (the default; ``bench/_cluster_runs.py``): N rows of the tickets CSV through real
``batchd run --until-drained`` processes against the emulator, one worker on LocalStore,
then 1, 2 and 3 workers on PgStore (a fresh schema each), interleaved over ``--repeat``
rounds: CPU per row (the workers' own rusage plus the CPU of the PostgreSQL backends
serving them), wall time, peak RSS per worker, and the ratios to LocalStore.

Store level (``--mode store``): the ``StateStore`` contract driven directly, as
tests/test_store_contract.py does, so each step of a chunk's life can be timed:

1. Lifecycle, once per store, each in its own child process (its peak RSS is its own): for
   every chunk of M rows, claim_keys for its rows, put_spool of a realistic body (one
   Messages request per row), the seal, create slot + submit_intent + submitted,
   fetch_spool (on PgStore from the database, the local copy removed first: a collector on
   another machine), ended, results_committed, source_committed, chunk_retired, and a
   heartbeat every 5 s as the runtime's loop would send (PgStore's TTL is 30 s). CPU counted
   is the child's own around the store calls (process time), plus on PgStore the CPU of the
   PostgreSQL backends serving it (``/proc/<pid>/stat`` of its connections), since the
   database shares the machine. The schema's size (``pg_total_relation_size`` of its tables)
   before and after gives the growth per million rows (retired rows are kept: no retention
   yet).
2. Concurrency: chunks sealed up front (small spools), then W worker processes, each its own
   PgStore and worker id, claim them with ``claim_chunks`` and drive each through intent,
   submitted, ended and results_committed; transitions/s over the common wall span and
   the p50/p99 of one transition.
3. Takeover: a worker process seals chunks (holding their leases) and heartbeats every
   second; it is SIGKILLed; a survivor polls ``claim_chunks`` until it holds them all. The
   target is TTL + grace + one poll after the kill.

PostgreSQL: ``--dsn`` (default the test database); a fresh schema per run, dropped after.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import cpu_seconds, mb, run_measured

from batchd.daemon.store.contract import ChunkLease, StateStore
from batchd.daemon.wal.manifest_state import Stage
from batchd.daemon.wal.records import (
    ChunkRetired,
    ChunkSealed,
    Ended,
    Figures,
    ResultsCommitted,
    SourceCommitted,
    SubmitIntent,
    Submitted,
)

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"
ENGINE_US_PER_ROW = 50.0  # bench_engine.py, docs/benchmarks.md §9 (1,000,000 rows)
SYSTEM = ("Classify the support ticket as one of: billing, bug, feature, account, other. "
          "Answer with the label only.")
BODIES = ("I was charged twice for my subscription this month", "The export to CSV button "
          "does nothing in Firefox", "Please add an API endpoint for bulk tag updates",
          "I can't log in after resetting my password", "Do you have an office in Lisbon?")
DETAILS = ("This is urgent for our team.", "We are on the Business plan.", "",
           "Customer since 2019, never had this before.")


# -- what a chunk carries --------------------------------------------------------------


def spool_bytes(first: int, rows: int, rng: random.Random) -> bytes:
    """A packer's spool for rows first..first+rows-1: one request line and its position."""
    lines = []
    for n in range(first, first + rows):
        body = f"{rng.choice(BODIES)} {rng.choice(DETAILS)} (ticket {n})"
        request = {"custom_id": f"t-{n}", "params": {
            "model": "claude-haiku-4-5", "max_tokens": 8, "system": SYSTEM,
            "messages": [{"role": "user", "content": body}]}}
        lines.append(json.dumps(request, separators=(",", ":")) + "\t"
                     + json.dumps({"key": str(n), "line": n}) + "\n")
    return "".join(lines).encode()


def sealed(pipeline: str, chunk: str, first: int, rows: int, size: int) -> ChunkSealed:
    return ChunkSealed(pipeline=pipeline, chunk=chunk, attempt=1, requests=rows, bytes=size,
                       rejects=0, first_seq=first, last_seq=first + rows - 1,
                       position={"line": first + rows - 1}, parent=None)


def committed(chunk: str, batch_id: str, rows: int) -> ResultsCommitted:
    return ResultsCommitted(chunk=chunk, batch_id=batch_id, figures=Figures(
        succeeded=rows, dead=0, retried=0, cost_usd=rows * 1e-5, input_tokens=rows * 40,
        output_tokens=rows * 2), retry_chunk=None)


def make_store(kind: str, args: argparse.Namespace, work: Path, name: str,
               ttl: float = 30.0, grace: float = 5.0) -> StateStore:
    if kind == "local":
        from batchd.daemon.store.local import LocalStore
        return LocalStore(work / "state", worker=name)
    from batchd.daemon.store.postgres import PgStore
    return PgStore(args.dsn, schema=args.schema, name=name, spool_dir=work / f"spool-{name}",
                   lease_ttl=ttl, takeover_grace=grace, pool_size=2)


async def backend_pids(args: argparse.Namespace, name: str) -> list[int]:
    """The PostgreSQL backends serving the worker *name* (its pool's connections)."""
    import asyncpg
    conn = await asyncpg.connect(args.dsn)
    try:
        rows = await conn.fetch("SELECT pid FROM pg_stat_activity WHERE application_name = $1",
                                f"batchd:{name}:store")
    finally:
        await conn.close()
    return [int(r["pid"]) for r in rows]


# -- child: one store through N rows ------------------------------------------------------


async def lifecycle(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.work)
    name = f"life-{uuid.uuid4().hex[:8]}"
    store = make_store(args.store, args, work, name)
    rng = random.Random(7)
    incoming = work / "incoming"
    incoming.mkdir(exist_ok=True)
    cpu = wall = 0.0
    pids: list[int] = []
    backend_cpu: dict[int, float] = {}
    steps: dict[str, float] = {}

    class timed:
        def __init__(self, step: str) -> None:
            self.step = step

        def __enter__(self) -> None:
            self.c, self.w = time.process_time(), time.perf_counter()

        def __exit__(self, *_: object) -> None:
            nonlocal cpu, wall
            c, w = time.process_time() - self.c, time.perf_counter() - self.w
            cpu += c
            wall += w
            steps[self.step] = steps.get(self.step, 0.0) + w

    def sample_backends() -> None:
        for pid in pids:
            backend_cpu[pid] = max(backend_cpu.get(pid, 0.0), cpu_seconds(pid))

    await store.open()
    try:
        if args.store == "postgres":
            pids = await backend_pids(args, name)
            start_backend = {pid: cpu_seconds(pid) for pid in pids}
        shard = await store.acquire_shard("p")
        assert shard is not None
        chunks = args.rows // args.chunk
        spool_total = 0
        beat = time.monotonic()
        key_walls: list[float] = []  # per chunk: does claiming grow with the ledger?
        for i in range(chunks):
            if time.monotonic() - beat > 5.0:  # the runtime's heartbeat loop (TTL 30 s)
                with timed("heartbeat"):
                    await store.heartbeat()
                beat = time.monotonic()
            first = i * args.chunk + 1
            chunk = f"p-{i + 1:06d}"
            data = spool_bytes(first, args.chunk, rng)
            spool_total += len(data)
            path = incoming / f"{chunk}.jsonl"
            path.write_bytes(data)
            entries = [(str(n), {"line": n}) for n in range(first, first + args.chunk)]
            t = time.perf_counter()
            with timed("claim_keys"):
                await store.claim_keys(shard, chunk, entries)
            key_walls.append(time.perf_counter() - t)
            with timed("put_spool"):
                digest = await store.put_spool(chunk, shard.epoch, path)
            with timed("seal"):
                applied = await store.append(sealed("p", chunk, first, args.chunk, len(data)),
                                             lease=shard, spool=digest)
            (lease,) = applied.created
            batch = f"msgbatch_{i + 1:08d}"
            with timed("intent+submitted"):
                slot = await store.acquire_create_slot("default")
                assert slot is not None
                await store.record_intent(slot, lease, args.chunk)
                await store.record_submitted(slot, lease, batch, "2026-12-01T00:00:00Z")
            if args.store == "postgres":
                store.spool_path(chunk).unlink()  # fetched as on another machine
            with timed("fetch_spool"):
                await store.fetch_spool(chunk)
            with timed("ended"):
                await store.append(Ended(chunk=chunk, batch_id=batch,
                                         counts={"succeeded": args.chunk}),
                                   lease=lease, expected=Stage.SUBMITTED)
            with timed("results_committed"):
                await store.append(committed(chunk, batch, args.chunk), lease=lease,
                                   expected=Stage.ENDED)
            with timed("source_committed+retired"):
                await store.append(SourceCommitted(pipeline="p", position={
                    "line": first + args.chunk - 1}, source_seq=first + args.chunk - 1),
                    lease=shard)
                await store.append(ChunkRetired(chunk=chunk), lease=shard)
            store.spool_path(chunk).unlink(missing_ok=True)  # the runtime drops it at retire
            if args.store == "postgres" and i % 20 == 0:
                sample_backends()
        if args.store == "postgres":
            for pid in await backend_pids(args, name):
                if pid not in pids:  # a connection the pool opened later
                    pids.append(pid)
                    start_backend[pid] = 0.0
            sample_backends()
            server = sum(backend_cpu[p] - start_backend[p] for p in pids)
        else:
            server = 0.0
        assert not await store.chunks("p")
    finally:
        await store.aclose()
    return {"rows": chunks * args.chunk, "cpu": cpu, "wall": wall, "server_cpu": server,
            "spool_bytes": spool_total, "steps": steps,
            "key_walls": [statistics.mean(part) / args.chunk for part in
                          (key_walls[:max(1, chunks // 10)], key_walls[-max(1, chunks // 10):])]}


# -- child: one worker of the concurrency run ---------------------------------------------


async def worker(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.work)
    store = make_store("postgres", args, work, f"w{args.index}")
    latencies: list[float] = []
    await store.open()
    try:
        await asyncio.sleep(max(0.0, args.start_at - time.time()))
        began = time.time()
        beat = time.monotonic()
        while True:
            if time.monotonic() - beat > 5.0:  # the runtime's heartbeat loop (TTL 30 s)
                await store.heartbeat()
                beat = time.monotonic()
            claimed = await store.claim_chunks(args.pipeline, args.claim)
            if not claimed:
                break
            for c in claimed:
                lease: ChunkLease = c.lease
                chunk = lease.chunk
                batch = f"msgbatch_{chunk}"
                steps = (
                    (SubmitIntent(chunk=chunk, at=time.time(), requests=args.chunk),
                     Stage.SEALED),
                    (Submitted(chunk=chunk, batch_id=batch, created_at="t"), Stage.INTENT),
                    (Ended(chunk=chunk, batch_id=batch, counts={"succeeded": args.chunk}),
                     Stage.SUBMITTED),
                    (committed(chunk, batch, args.chunk), Stage.ENDED),
                )
                # A chunk another worker finished and handed back at its close comes again
                # (committed, ownerless): resume at its stage, as a claimer does.
                todo = [expected for _, expected in steps]
                start = todo.index(Stage(c.stage)) if Stage(c.stage) in todo else len(todo)
                for record, expected in steps[start:]:
                    t = time.perf_counter()
                    applied = await store.append(record, lease=lease, expected=expected)
                    latencies.append(time.perf_counter() - t)
                    assert applied.written, applied.fenced
        ended = time.time()
    finally:
        await store.aclose()
    return {"began": began, "ended": ended, "latencies": latencies}


# -- child: the worker that is killed ------------------------------------------------------


async def victim(args: argparse.Namespace) -> None:
    work = Path(args.work)
    store = make_store("postgres", args, work, "victim", ttl=args.ttl, grace=args.grace)
    await store.open()
    shard = await store.acquire_shard("k")
    assert shard is not None
    for i in range(args.chunks):
        chunk = f"k-{i + 1:06d}"
        path = work / f"{chunk}.jsonl"
        path.write_bytes(spool_bytes(i + 1, 1, random.Random(i)))
        digest = await store.put_spool(chunk, shard.epoch, path)
        await store.append(sealed("k", chunk, i + 1, 1, digest.raw_bytes), lease=shard,
                           spool=digest)
    print("ready", flush=True)
    beats = Path(args.work) / "victim.beat"
    while True:  # killed here
        await store.heartbeat()
        beats.write_text(repr(time.time()))
        await asyncio.sleep(1.0)


# -- the parent ---------------------------------------------------------------------------


def child_command(mode: str, args: argparse.Namespace, work: Path, *extra: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--dsn", args.dsn,
            "--schema", args.schema, "--work", str(work), "--rows", str(args.rows),
            "--chunk", str(args.chunk), "--concurrent-chunks", str(args.concurrent_chunks),
            "--pipeline", args.pipeline, *extra]


async def admin(args: argparse.Namespace, sql: str, *params: Any) -> Any:
    import asyncpg
    conn = await asyncpg.connect(args.dsn)
    try:
        return await conn.fetch(sql, *params)
    finally:
        await conn.close()


async def create_schema(args: argparse.Namespace) -> None:
    import asyncpg

    from batchd.daemon.cluster.migrations import migrate
    from batchd.daemon.cluster.schema import Sql
    conn = await asyncpg.connect(args.dsn)
    try:
        await conn.execute(f'CREATE SCHEMA "{args.schema}"')
        await migrate(conn, Sql(args.schema))
    finally:
        await conn.close()


async def schema_size(args: argparse.Namespace) -> tuple[int, dict[str, int]]:
    rows = await admin(args, "SELECT c.relname, pg_total_relation_size(c.oid) AS size "
                             "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                             "WHERE n.nspname = $1 AND c.relkind = 'r'", args.schema)
    sizes = {r["relname"]: int(r["size"]) for r in rows}
    return sum(sizes.values()), sizes


def run_lifecycle(kind: str, args: argparse.Namespace, work: Path) -> dict[str, Any] | None:
    out = work / f"life-{kind}"
    out.mkdir()
    run = run_measured(child_command("lifecycle", args, out, "--store", kind),
                       env={**os.environ, "PYTHONUNBUFFERED": "1"}, cwd=out,
                       timeout=args.timeout)
    if run.returncode != 0:
        print(f"== lifecycle on {kind}: FAILED (exit {run.returncode})")
        for line in run.stderr_tail:
            print(f"    {line}")
        return None
    result: dict[str, Any] = json.loads(run.stdout.strip().splitlines()[-1])
    result["run"] = run
    return result


def print_lifecycle(kind: str, r: dict[str, Any]) -> None:
    rows, run = r["rows"], r["run"]
    print(f"== lifecycle on {kind}: {rows:,} rows in chunks of {r['chunk']:,}, spools "
          f"{mb(r['spool_bytes'])}")
    print(f"  store calls        wall {r['wall']:.2f} s = {r['wall'] / rows * 1e6:.1f} us/row, "
          f"CPU {r['cpu']:.2f} s = {r['cpu'] / rows * 1e6:.1f} us/row own")
    if kind == "postgres":
        print(f"  PostgreSQL backend CPU {r['server_cpu']:.2f} s = "
              f"{r['server_cpu'] / rows * 1e6:.1f} us/row")
    print(f"  child process      wall {run.wall_s:.2f} s, CPU {run.cpu_s:.2f} s, peak RSS "
          f"{mb(run.peak_rss)} (VmHWM polled {mb(run.polled_hwm)})")
    for step, seconds in r["steps"].items():
        print(f"    {step:<26} {seconds / rows * 1e6:7.1f} us/row wall")
    first, last = r["key_walls"]
    print(f"  claim_keys, first tenth of the chunks {first * 1e6:.1f} us/row, last tenth "
          f"{last * 1e6:.1f} us/row (the ledger's growth)")


def run_workers(args: argparse.Namespace, work: Path, count: int) -> dict[str, Any]:
    """Seal ``--concurrent-chunks`` chunks, then *count* workers drive them to committed."""
    pipeline_out = work / f"workers-{count}"
    pipeline_out.mkdir()
    args.pipeline = f"c{count}"  # each run its own pipeline: the last run's chunks stay live
    seed = subprocess.run(child_command("seed", args, pipeline_out), capture_output=True,
                          text=True, timeout=args.timeout)
    if seed.returncode != 0:
        raise RuntimeError(f"seeding failed: {seed.stderr[-2000:]}")
    start_at = time.time() + 3.0  # all open first, then start together
    procs = []
    for index in range(count):
        log = (pipeline_out / f"w{index}.out").open("wb")
        procs.append((subprocess.Popen(
            child_command("worker", args, pipeline_out, "--index", str(index), "--start-at",
                          repr(start_at), "--claim", str(args.claim)),
            stdout=log, stderr=subprocess.STDOUT), index))
    results, peaks, cpus = [], [], []
    for proc, index in procs:
        _, status, usage = os.wait4(proc.pid, 0)
        text = (pipeline_out / f"w{index}.out").read_text()
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"worker {index} failed: {text[-2000:]}")
        results.append(json.loads(text.strip().splitlines()[-1]))
        peaks.append(usage.ru_maxrss * 1024)
        cpus.append(usage.ru_utime + usage.ru_stime)
    latencies = sorted(x for r in results for x in r["latencies"])
    span = max(r["ended"] for r in results) - min(r["began"] for r in results)
    per_worker = [len(r["latencies"]) for r in results]
    return {"workers": count, "transitions": len(latencies), "span": span,
            "rate": len(latencies) / span,
            "p50": statistics.median(latencies) * 1e3,
            "p99": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1e3,
            "per_worker": per_worker, "peak_rss": max(peaks), "cpu": sum(cpus)}


async def seed(args: argparse.Namespace) -> None:
    """Seal the concurrency run's chunks (tiny spools) and leave them unheld."""
    work = Path(args.work)
    store = make_store("postgres", args, work, "sealer")
    await store.open()
    try:
        shard = await store.acquire_shard(args.pipeline)
        assert shard is not None
        for i in range(args.concurrent_chunks):
            chunk = f"{args.pipeline}-{i + 1:06d}"
            path = work / f"{chunk}.jsonl"
            path.write_bytes(spool_bytes(i + 1, 1, random.Random(i)))
            digest = await store.put_spool(chunk, shard.epoch, path)
            await store.append(sealed(args.pipeline, chunk, i * args.chunk + 1, args.chunk,
                                      digest.raw_bytes), lease=shard, spool=digest)
    finally:
        await store.aclose()  # deregistering hands every chunk back at once


def start_victim(args: argparse.Namespace, work: Path) -> subprocess.Popen[str]:
    out = work / "takeover"
    out.mkdir()
    return subprocess.Popen(
        child_command("victim", args, out, "--ttl", str(args.ttl), "--grace", str(args.grace),
                      "--chunks", str(args.takeover_chunks)),
        stdout=subprocess.PIPE, stderr=(out / "victim.err").open("wb"), text=True)


async def takeover(args: argparse.Namespace, work: Path,
                   proc: subprocess.Popen[str]) -> dict[str, Any]:
    out = work / "takeover"
    assert proc.stdout is not None
    line = await asyncio.to_thread(proc.stdout.readline)
    if line.strip() != "ready":
        proc.kill()
        raise RuntimeError(f"victim did not start: {(out / 'victim.err').read_text()[-2000:]}")
    survivor = make_store("postgres", args, out, "survivor", ttl=args.ttl, grace=args.grace)
    await survivor.open()

    async def beat() -> None:  # a claimer must itself be alive: the runtime's heartbeat loop
        while True:
            await asyncio.sleep(args.ttl / 3)
            await survivor.heartbeat()

    beating = asyncio.create_task(beat())
    try:
        await asyncio.sleep(2.5)  # some heartbeats in
        killed = time.time()
        os.kill(proc.pid, signal.SIGKILL)
        await asyncio.to_thread(proc.wait)
        last_beat = float((out / "victim.beat").read_text())
        held: set[str] = set()
        polls = 0
        while len(held) < args.takeover_chunks:
            if time.time() - killed > 10 * (args.ttl + args.grace + args.poll):
                raise RuntimeError(f"no takeover: {len(held)} of {args.takeover_chunks}")
            polls += 1
            held.update(c.lease.chunk for c in await survivor.claim_chunks("k", 100))
            if len(held) < args.takeover_chunks:
                await asyncio.sleep(args.poll)
        done = time.time()
    finally:
        beating.cancel()
        await survivor.aclose()
    return {"after_kill": done - killed, "after_beat": done - last_beat, "polls": polls,
            "chunks": len(held)}


def percent(extra: float) -> str:
    return f"{extra / ENGINE_US_PER_ROW * 100:+.0f} %"


def parent(args: argparse.Namespace) -> int:
    args.schema = f"bench_cluster_{uuid.uuid4().hex[:10]}"
    print(f"rows {args.rows:,}, chunks of {args.chunk:,}, schema {args.schema}, cores "
          f"{os.cpu_count()}, load {os.getloadavg()[0]:.2f}")
    asyncio.run(create_schema(args))
    ok = True
    try:
        with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp:
            work = Path(tmp)
            local = run_lifecycle("local", args, work)
            before, _ = asyncio.run(schema_size(args))
            pg = run_lifecycle("postgres", args, work)
            after, tables = asyncio.run(schema_size(args))
            for kind, r in (("local", local), ("postgres", pg)):
                if r is not None:
                    r["chunk"] = args.chunk
                    print_lifecycle(kind, r)
            if local is not None and pg is not None:
                rows = pg["rows"]
                lc, pc = local["cpu"] / rows * 1e6, pg["cpu"] / rows * 1e6
                ps = pg["server_cpu"] / rows * 1e6
                print("== the shared store's overhead per row (engine CPU ~"
                      f"{ENGINE_US_PER_ROW:.0f} us/row, bench_engine, docs/benchmarks.md §9)")
                print(f"  LocalStore          {lc:6.1f} us/row CPU")
                print(f"  PgStore             {pc:6.1f} us/row CPU in the worker "
                      f"({pc - lc:+.1f} over LocalStore = {percent(pc - lc)} of the engine)")
                print(f"  PgStore + server    {pc + ps:6.1f} us/row CPU "
                      f"({pc + ps - lc:+.1f} over LocalStore = {percent(pc + ps - lc)} of the "
                      "engine; target <= +15 %)")
                print(f"  wall                {local['wall'] / rows * 1e6:6.1f} vs "
                      f"{pg['wall'] / rows * 1e6:.1f} us/row (LocalStore vs PgStore)")
                grown = after - before
                print(f"== store growth: {mb(before)} -> {mb(after)} for {rows:,} rows retired = "
                      f"{mb(grown * 1e6 / rows)} per million rows")
                for name, size in sorted(tables.items(), key=lambda t: -t[1])[:6]:
                    print(f"    {name:<22} {mb(size)}")
            else:
                ok = False
            print(f"== transitions on PgStore: {args.concurrent_chunks} chunks of "
                  f"{args.chunk} requests, 4 transitions each, claim_chunks({args.claim})")
            for count in args.workers:
                r = run_workers(args, work, count)
                print(f"  {count} worker(s)  {r['transitions']:>6} transitions in "
                      f"{r['span']:.2f} s = {r['rate']:,.0f}/s  p50 {r['p50']:.2f} ms  "
                      f"p99 {r['p99']:.2f} ms  (per worker {r['per_worker']}, CPU "
                      f"{r['cpu']:.2f} s, peak RSS {mb(r['peak_rss'])})")
            r = asyncio.run(takeover(args, work, start_victim(args, work)))
            target = args.ttl + args.grace + args.poll
            print(f"== takeover: TTL {args.ttl} s, grace {args.grace} s, poll {args.poll} s, "
                  f"{r['chunks']} chunks held by a SIGKILLed worker")
            print(f"  all claimed {r['after_kill']:.2f} s after the kill "
                  f"({r['after_beat']:.2f} s after its last heartbeat; target <= {target:.1f} s:"
                  f" {'met' if r['after_beat'] <= target else 'MISSED'}, counted from the beat), "
                  f"{r['polls']} polls")
    finally:
        asyncio.run(admin(args, f'DROP SCHEMA "{args.schema}" CASCADE'))
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").strip().split("\n\n")[0])
    parser.add_argument("--mode", choices=("end-to-end", "store"), default="end-to-end")
    parser.add_argument("--rows", type=int,
                        help="default 1,000,000 end to end, 200,000 at the store level")
    parser.add_argument("--repeat", type=int, default=1,
                        help="end to end: rounds of every configuration, interleaved")
    parser.add_argument("--max-requests", type=int, default=10_000,
                        help="end to end: requests per batch (bench_engine's)")
    parser.add_argument("--max-in-flight", type=int, default=4, help="end to end: per worker")
    parser.add_argument("--poll-interval", type=float, default=0.2, help="end to end")
    parser.add_argument("--mirror", action="store_true",
                        help="end to end: each round runs every configuration, then again in "
                             "reverse order (A B C C B A), and compares a round's sums")
    parser.add_argument("--keep", type=Path, help="end to end: work here and keep it")
    parser.add_argument("--tree", type=Path,
                        help="end to end: also run each PgStore worker count with the batchd "
                             "package of this source tree (`git archive REV | tar -x -C DIR`), "
                             "interleaved: a before/after comparison in one run")
    parser.add_argument("--batchd", help="end to end: the command that stands for `batchd` "
                        "run by the workers (another build, a profiler wrapper)")
    parser.add_argument("--chunk", type=int, default=1_000, help="rows per chunk")
    parser.add_argument("--dsn", default=os.environ.get("BATCHD_TEST_PG_DSN", DEFAULT_DSN))
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--concurrent-chunks", type=int, default=300,
                        help="chunks each concurrency run drives")
    parser.add_argument("--claim", type=int, default=4, help="claim_chunks limit per call")
    parser.add_argument("--ttl", type=float, default=3.0, help="lease TTL for the takeover")
    parser.add_argument("--grace", type=float, default=1.0, help="takeover grace")
    parser.add_argument("--poll", type=float, default=0.5, help="survivor's claim interval")
    parser.add_argument("--takeover-chunks", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=3600)
    # the children's own arguments
    parser.add_argument("--child", choices=("lifecycle", "worker", "seed", "victim"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--store", default="local", help=argparse.SUPPRESS)
    parser.add_argument("--schema", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--pipeline", default="c", help=argparse.SUPPRESS)
    parser.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--start-at", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--chunks", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "lifecycle":
        print(json.dumps(asyncio.run(lifecycle(args))))
    elif args.child == "worker":
        print(json.dumps(asyncio.run(worker(args))))
    elif args.child == "seed":
        asyncio.run(seed(args))
    elif args.child == "victim":
        asyncio.run(victim(args))
    elif args.mode == "end-to-end":
        from _cluster_runs import end_to_end
        args.rows = args.rows or 1_000_000
        return end_to_end(args)
    else:
        args.rows = args.rows or 200_000
        return parent(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
