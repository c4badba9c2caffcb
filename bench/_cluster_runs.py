"""
bench_cluster.py's end-to-end part: N rows through real ``batchd run --until-drained``
processes against the emulator, one worker on LocalStore, then 1, 2 and 3 workers on
PgStore, interleaved (``--repeat`` rounds of all of them), so the machine's load falls
on every configuration alike.

Per run: the wall time from the first worker's start to the last one's exit; each
worker's user + system CPU from its own ``wait4`` rusage, its peak RSS from its
``VmHWM``, read every 20 ms while it runs (not ``wait4``'s ``ru_maxrss``: Linux starts a
child's at the high-water mark of the parent it was forked from, and this benchmark grows
while it checks each run's sinks; that made 134-188 MB "peaks" of workers that never
passed 90 MB); on PgStore the
CPU of the PostgreSQL backends serving the workers (``/proc/<pid>/stat`` of the sessions
whose ``application_name`` names a worker's pid, polled while they run: a backend's
CPU is counted from its start, so the largest reading is its total); the emulator's CPU
apart (it stands for the API). A run counts only if the workers' SQLite sinks hold
exactly N distinct keys, each once, and nothing was dead-lettered.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import (
    EmulatorProcess,
    batchd_command,
    compile_package,
    cpu_seconds,
    mb,
    proc_status_bytes,
    write_csv,
)

__all__ = ("end_to_end",)

DSN_VAR = "BATCHD_BENCH_CLUSTER_DSN"

PIPELINE = """\
state_dir = "{state}"

[api]
poll_interval = "{poll}s"
{cluster}
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

CLUSTER = """
[cluster]
store = "postgres"
dsn = "env:{var}"
schema = "{schema}"
lease_ttl = "30s"
takeover_grace = "30s"
"""


@dataclass
class Run:
    """One configuration's run: its workers' figures and the database's."""

    label: str
    workers: int
    wall: float = 0.0
    cpu: list[float] = field(default_factory=list)  # per worker, user + system
    rss: list[int] = field(default_factory=list)  # per worker, peak
    backend_cpu: float = 0.0
    emulator_cpu: float = 0.0
    keys: tuple[int, int] = (0, 0)  # rows in the sinks, distinct keys
    dead: int = 0
    failed: str = ""
    load: float = 0.0
    steal: float = 0.0  # the share of the machine's CPU time the hypervisor took meanwhile

    @property
    def total_cpu(self) -> float:
        return sum(self.cpu) + self.backend_cpu


class BackendSampler:
    """Polls the CPU of the PostgreSQL sessions serving the given worker pids."""

    def __init__(self, dsn: str, interval: float = 0.25) -> None:
        self.dsn, self.interval = dsn, interval
        self.pids: list[int] = []
        self.seen: dict[int, float] = {}  # backend pid -> largest CPU reading
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self, worker_pids: list[int]) -> None:
        self.pids = worker_pids
        self._thread.start()

    def stop(self) -> float:
        self._done.set()
        self._thread.join()
        return sum(self.seen.values())

    def _run(self) -> None:
        asyncio.run(self._loop())

    async def _loop(self) -> None:
        import asyncpg
        conn = await asyncpg.connect(self.dsn)
        host = socket.gethostname()
        names = [f"batchd:{host}:{pid}:store"[:63] for pid in self.pids]
        try:
            while True:
                rows = await conn.fetch(
                    "SELECT pid FROM pg_stat_activity WHERE application_name = ANY($1::text[])",
                    names)
                for row in rows:
                    pid = int(row["pid"])
                    self.seen[pid] = max(self.seen.get(pid, 0.0), cpu_seconds(pid))
                if self._done.wait(self.interval):
                    return
        finally:
            await conn.close()


def _cpu_ticks() -> list[int]:
    """The machine's CPU time by kind (``/proc/stat``: user, nice, system, idle, ..., steal)."""
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:9]]


def _steal(before: list[int], after: list[int]) -> float:
    """
    The share of CPU time a hypervisor gave to other guests between two readings: on a
    shared host it moved CPU per row by up to a quarter between runs minutes apart.
    """
    spent = [b - a for a, b in zip(before, after, strict=True)]
    return spent[7] / sum(spent) if sum(spent) else 0.0


def _keys(dbs: list[Path]) -> tuple[int, int]:
    """Rows across the sinks, and distinct keys among them."""
    rows, keys = 0, set()
    for db in dbs:
        if not db.exists():
            continue
        with sqlite3.connect(db) as conn:
            for (key,) in conn.execute('SELECT "key" FROM results'):
                rows += 1
                keys.add(key)
    return rows, len(keys)


def _dead(directory: Path) -> int:
    if not directory.exists():
        return 0
    return sum(sum(1 for _ in part.open("rb")) for part in directory.glob("*.jsonl"))


async def _drop(dsn: str, schema: str) -> None:
    import asyncpg
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


def run_once(args: argparse.Namespace, work: Path, csv_path: Path, workers: int,
             shared: bool, tree: Path | None = None) -> Run:
    label = f"PgStore x{workers}" if shared else "LocalStore"
    if tree is not None:
        label += " (tree)"
    out = work / f"{'pg' if shared else 'local'}-{workers}-{uuid.uuid4().hex[:6]}"
    out.mkdir()
    schema = f"bench_e2e_{uuid.uuid4().hex[:10]}"
    run = Run(label, workers, load=os.getloadavg()[0])
    configs, dbs, deads = [], [], []
    for index in range(workers):
        ws = out / f"w{index}"
        ws.mkdir()
        db, dead = ws / "out.sqlite", ws / "dead-letters"
        cluster = CLUSTER.format(var=DSN_VAR, schema=schema) if shared else ""
        config = ws / "pipeline.toml"
        config.write_text(PIPELINE.format(
            state=ws / "state", poll=args.poll_interval, cluster=cluster, csv=csv_path, db=db,
            dead=dead, max_requests=args.max_requests, max_in_flight=args.max_in_flight))
        configs.append(config)
        dbs.append(db)
        deads.append(dead)
    sampler = BackendSampler(args.dsn) if shared else None
    try:
        with EmulatorProcess(out / "emulator") as emulator:
            env = {**os.environ, "ANTHROPIC_BASE_URL": emulator.base_url,
                   "ANTHROPIC_API_KEY": "bench", "PYTHONUNBUFFERED": "1", DSN_VAR: args.dsn}
            if tree is not None:  # that tree's batchd package comes first on the path
                env["PYTHONPATH"] = str(tree)
            if shared:
                init = subprocess.run(batchd_command("cluster", "init", str(configs[0])),
                                      env=env, capture_output=True, text=True, timeout=120)
                if init.returncode != 0:
                    run.failed = f"cluster init: {init.stderr.strip()[-500:]}"
                    return run
            emulator_cpu = cpu_seconds(emulator.pid)
            ticks = _cpu_ticks()
            started = time.perf_counter()
            procs = []
            for config in configs:
                err = (config.parent / "stderr.log").open("wb")
                command = shlex.split(args.batchd) if args.batchd else batchd_command()
                if tree is not None:
                    command = [sys.executable, "-m", "batchd.daemon.cli"]
                procs.append(subprocess.Popen(
                    [*command, "run", str(config), "--until-drained", "--log-level",
                     "warning", "--log-format", "json"],
                    cwd=config.parent, env=env, stdout=subprocess.DEVNULL, stderr=err))
            if sampler is not None:
                sampler.start([p.pid for p in procs])
            deadline = started + args.timeout
            pending = {p.pid: p for p in procs}
            hwm = dict.fromkeys(pending, 0)
            while pending:
                for pid in list(pending):
                    hwm[pid] = max(hwm[pid], proc_status_bytes(pid, "VmHWM"))
                    done, status, usage = os.wait4(pid, os.WNOHANG)
                    if done:
                        proc = pending.pop(pid)
                        proc.returncode = os.waitstatus_to_exitcode(status)
                        run.cpu.append(usage.ru_utime + usage.ru_stime)
                        run.rss.append(hwm[pid])
                if pending and time.perf_counter() > deadline:
                    for proc in pending.values():
                        proc.kill()
                    run.failed = f"timeout after {args.timeout:.0f} s"
                time.sleep(0.02)
            run.wall = time.perf_counter() - started
            run.steal = _steal(ticks, _cpu_ticks())
            if sampler is not None:
                run.backend_cpu = sampler.stop()
            run.emulator_cpu = cpu_seconds(emulator.pid) - emulator_cpu
        for proc, config in zip(procs, configs, strict=True):
            if proc.returncode != 0 and not run.failed:
                tail = (config.parent / "stderr.log").read_text(errors="replace")[-800:]
                run.failed = f"{config.parent.name} exit {proc.returncode}: {tail}"
        run.keys = _keys(dbs)
        run.dead = sum(_dead(d) for d in deads)
        rows = args.rows
        if not run.failed and (run.keys != (rows, rows) or run.dead):
            run.failed = (f"sinks hold {run.keys[0]} rows, {run.keys[1]} distinct keys "
                          f"(want {rows}); {run.dead} dead letters")
    finally:
        if shared:
            asyncio.run(_drop(args.dsn, schema))
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    return run


def _print(run: Run, rows: int) -> None:
    if run.failed:
        print(f"  {run.label:<18} FAILED: {run.failed}")
        return
    own = sum(run.cpu) / rows * 1e6
    db = run.backend_cpu / rows * 1e6
    print(f"  {run.label:<18} wall {run.wall:7.2f} s ({rows / run.wall:8,.0f} rows/s)  "
          f"CPU workers {own:5.1f} + PostgreSQL {db:5.1f} = {own + db:5.1f} us/row  "
          f"per worker CPU {', '.join(f'{c:.1f}' for c in run.cpu)} s, peak RSS "
          f"{', '.join(mb(r) for r in run.rss)}  (emulator {run.emulator_cpu:.1f} s, "
          f"load {run.load:.2f}, steal {run.steal:.0%})")


def end_to_end(args: argparse.Namespace) -> int:
    rows = args.rows
    print(f"== end to end: {rows:,} rows, max_requests {args.max_requests:,}, max_in_flight "
          f"{args.max_in_flight} per worker, poll {args.poll_interval} s, workers "
          f"{args.workers}, {args.repeat} round(s) interleaved; cores {os.cpu_count()}, "
          f"load {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    configs: list[tuple[int, bool, Path | None]] = [(1, False, None)]
    for n in args.workers:
        configs.append((n, True, None))
        if args.tree is not None:
            configs.append((n, True, args.tree.resolve()))
    compiled = compile_package()
    if args.tree is not None:
        compiled += compile_package(args.tree.resolve())
    print(f"   ({compiled} modules byte-compiled first, as an installed wheel is)")
    results: dict[str, list[Run]] = {}
    with _workdir(args) as work:
        csv_path = write_csv(work / "tickets.csv", rows)
        for round_no in range(1, args.repeat + 1):
            # Each round starts with the next configuration: a run's place in the round
            # (after a teardown and the sink check, or right after another run) moved its
            # CPU per row by several percent, and must not fall on one store every time.
            turn = (round_no - 1) % len(configs)
            order = configs[turn:] + configs[:turn]
            if args.mirror:  # A B C C B A: a drift of the machine's speed falls on all alike
                order = configs + configs[::-1]
            print(f"-- round {round_no}")
            for workers, shared, tree in order:
                run = run_once(args, work, csv_path, workers, shared, tree)
                _print(run, rows)
                results.setdefault(run.label, []).append(run)
    ok = all(not r.failed for runs in results.values() for r in runs)
    local = [r for r in results.get("LocalStore", []) if not r.failed]
    if not local:
        return 1
    base = statistics.median(r.total_cpu for r in local) / rows * 1e6
    base_wall = statistics.median(r.wall for r in local)
    print(f"== medians over {args.repeat} round(s); CPU per row = workers' rusage + their "
          "PostgreSQL backends")
    print(f"  {'store':<18} {'CPU us/row':>10} {'vs Local':>9} {'workers':>8} {'backends':>9} "
          f"{'wall s':>8} {'vs Local':>9} {'peak RSS/worker':>16}")
    for label, runs in results.items():
        good = [r for r in runs if not r.failed]
        if not good:
            continue
        cpu = statistics.median(r.total_cpu for r in good) / rows * 1e6
        own = statistics.median(sum(r.cpu) for r in good) / rows * 1e6
        db = statistics.median(r.backend_cpu for r in good) / rows * 1e6
        wall = statistics.median(r.wall for r in good)
        rss = max(max(r.rss) for r in good)
        print(f"  {label:<18} {cpu:10.1f} {cpu / base - 1:+9.0%} {own:8.1f} {db:9.1f} "
              f"{wall:8.2f} {wall / base_wall:8.2f}x {mb(rss):>16}")
    # Paired: each round's runs against the LocalStore runs of the same round (with
    # --mirror, the sum of a configuration's two runs against LocalStore's two).
    per_round = 2 if args.mirror else 1
    print("== per round, against the same round's LocalStore (CPU per row):")
    for label, runs in results.items():
        if label != "LocalStore":
            _print_ratios(label, runs, results["LocalStore"], per_round)
    for label, runs in results.items():  # another tree against this one, round by round
        if label.endswith(" (tree)"):
            _print_ratios(f"{label} vs this tree", runs, results[label.removesuffix(" (tree)")],
                          per_round)
    print("  (target: PgStore CPU per row <= +15 % over LocalStore)")
    return 0 if ok else 1


def _print_ratios(label: str, runs: list[Run], base: list[Run], per_round: int) -> None:
    """Each round's CPU of *runs* over that of *base*, and their median."""
    ratios = []
    for at in range(0, min(len(runs), len(base)), per_round):
        these, those = runs[at:at + per_round], base[at:at + per_round]
        if not any(r.failed for r in these + those):
            ratios.append(sum(r.total_cpu for r in these) / sum(r.total_cpu for r in those) - 1)
    if ratios:
        print(f"  {label:<26} {' '.join(f'{r:+.0%}' for r in ratios)}  median "
              f"{statistics.median(ratios):+.1%}")


class _workdir:
    def __init__(self, args: argparse.Namespace) -> None:
        self.keep: Path | None = args.keep
        self.tmp: Any = None

    def __enter__(self) -> Path:
        if self.keep is not None:
            self.keep.mkdir(parents=True, exist_ok=True)
            return self.keep.resolve()
        import tempfile
        self.tmp = tempfile.TemporaryDirectory(prefix="bench-cluster-e2e-")
        return Path(self.tmp.name)

    def __exit__(self, *_: object) -> None:
        if self.tmp is not None:
            self.tmp.cleanup()
