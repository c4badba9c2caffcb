"""
The collector alone: a results file of succeeded lines → parse → join on custom_id →
SQLite upsert, driving ``batchd.daemon.results.collector.Collector.collect`` directly.

    .venv/bin/python bench/bench_collector.py [--rows 100000] [--profile]

The spool is written with the engine's SpoolWriter and the results in the emulator's shape
(shuffled, as the API returns them); the sinks are the real SqliteSink and JsonlSink. For scale
in the same run it also times a bare orjson loop over the same file, and — through the
emulator, on a batch made from the same spool — the engine's raw ``result_blocks`` + orjson
against the SDK's own ``results()`` decoding. Only time inside ``collect`` counts (both spool
passes, every sink put and the committing flush); each collect variant runs ``--repeat`` times
into fresh sinks and the best run counts. Wall time and this process's CPU time (all threads)
are both printed: on a shared machine the CPU figure is the steadier one. Target: >= 100,000
rows/s with the SQLite sink. ``--profile`` prints where the collector's event-loop thread
spends its time.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import hashlib
import io
import os
import pstats
import random
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import anthropic
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import EmulatorProcess, count_keys

from batchd.daemon.batches.api import BatchesApi
from batchd.daemon.config import ApiConfig, PipelineConfig, load_config
from batchd.daemon.gc_tuning import tune_gc
from batchd.daemon.intake.spool import SpoolWriter
from batchd.daemon.models.pricing import PriceTable
from batchd.daemon.results.collector import Collector
from batchd.plugins.contract import PluginContext, Sink
from batchd.plugins.records import ResultRow
from batchd.plugins.sinks.jsonl import JsonlSink
from batchd.plugins.sinks.sqlite import SqliteSink

PIPELINE = """\
[[pipeline]]
name = "tickets"
custom_id = "t-{ticket_id}"

[pipeline.source]
type = "csv"
path = "tickets.csv"
key = "ticket_id"

[pipeline.request]
model = "claude-haiku-4-5"
max_tokens = 8
system = "Classify the support ticket as one of: billing, bug, feature, account, other."
user = "{body}"

[pipeline.output]
allowed = ["billing", "bug", "feature", "account", "other"]
lowercase = true

[[pipeline.sink]]
type = "sqlite"
path = "out.sqlite"
"""
LABELS = ("billing", "bug", "feature", "account", "other")
_BLOCK = 1 << 20


def write_spool(path: Path, rows: int) -> None:
    """The chunk's spool, as the packer writes it (request, then key/custom_id/position)."""
    writer = SpoolWriter(path)
    for number in range(1, rows + 1):
        key = f"T{number:07d}"
        params = {
            "model": "claude-haiku-4-5",
            "max_tokens": 8,
            "system": "Classify the support ticket as one of: billing, bug, feature, account.",
            "messages": [{"role": "user", "content": f"Ticket {key}: I was charged twice."}],
        }
        custom_id = f"t-{key}"
        request = b'{"custom_id":"' + custom_id.encode() + b'","params":' + orjson.dumps(params)
        writer.add_request(request + b"}", {
            "key": key, "position": {"line": number + 1, "row": number, "offset": number * 86,
                                     "end_line": number + 1},
            "seq": number, "custom_id": custom_id, "attempt": 1,
        })
    writer.seal()


def write_results(path: Path, rows: int, seed: int = 1) -> int:
    """Succeeded result lines in the emulator's shape, shuffled; returns the file size."""
    order = list(range(1, rows + 1))
    random.Random(seed).shuffle(order)
    with path.open("wb", buffering=_BLOCK) as out:
        for number in order:
            custom_id = f"t-T{number:07d}"
            digest = hashlib.blake2b(custom_id.encode(), digest_size=12).hexdigest()
            message = {
                "id": f"msg_01{digest}", "type": "message", "role": "assistant",
                "model": "claude-haiku-4-5",
                "content": [{"type": "text", "text": LABELS[number % len(LABELS)]}],
                "stop_reason": "end_turn", "stop_sequence": None,
                "usage": {"input_tokens": 31, "output_tokens": 2,
                          "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
                          "service_tier": "batch"},
            }
            line = {"custom_id": custom_id, "result": {"type": "succeeded", "message": message}}
            out.write(orjson.dumps(line) + b"\n")
    return path.stat().st_size


async def file_blocks(path: Path) -> AsyncIterator[list[bytes]]:
    """The results file as the collector's ``blocks`` stream: raw lines, 1 MiB at a time."""
    tail = b""
    with path.open("rb") as source:
        while block := source.read(_BLOCK):
            lines = (tail + block).split(b"\n")
            tail = lines.pop()
            yield lines
            await asyncio.sleep(0)
    if tail:
        yield [tail]


def bare_orjson(path: Path) -> tuple[float, float, int]:
    started, cpu = time.perf_counter(), time.process_time()
    count = 0
    with path.open("rb", buffering=_BLOCK) as source:
        for line in source:
            orjson.loads(line)
            count += 1
    return time.perf_counter() - started, time.process_time() - cpu, count


def price_function() -> Callable[[str, dict[str, Any]], float]:
    """The cost function the supervisor hands the collector."""
    return PriceTable({}).cost_function(lambda model: None)


class NullSink(Sink):
    """Keeps nothing: isolates the collector's own parse/join/route cost from the sinks'."""

    async def open(self) -> None:
        return None

    async def put(self, group: str, rows: Sequence[ResultRow]) -> None:
        return None

    async def flush(self, group: str) -> None:
        return None

    async def aclose(self) -> None:
        return None


def _zero_cost(model: str, usage: dict[str, Any]) -> float:
    return 0.0


async def run_collect(
    pipeline: PipelineConfig, work: Path, spool: Path, variant: str,
    blocks: Callable[[], AsyncIterator[list[bytes]]], *, priced: bool = True, profile: bool = False,
) -> tuple[float, float, int]:
    """
    One ``collect`` into fresh sinks (``variant``: sqlite, sqlite+jsonl or null);
    returns (wall seconds, process CPU seconds, keys stored — rows routed for the null sink).
    """
    out = work / f"{variant}-{priced}"
    context = PluginContext(pipeline="tickets", state_dir=out, config_dir=out)
    sinks: list[Sink] = [NullSink()]
    if variant != "null":
        sinks = [SqliteSink({"path": "results.sqlite"}, context)]
    if variant == "sqlite+jsonl":
        sinks.append(JsonlSink({"path": "results"}, context))
    dead = JsonlSink({"path": "dead"}, context)
    for sink in (*sinks, dead):
        await sink.open()
    collector = Collector(pipeline, sinks, dead, price_function() if priced else _zero_cost)
    profiler = cProfile.Profile() if profile else None
    started, cpu = time.perf_counter(), time.process_time()
    if profiler:
        profiler.enable()
    summary = await collector.collect(chunk="tickets-000000", root="tickets-000000",
                                      batch_id="msgbatch_bench", spool=spool, blocks=blocks)
    if profiler:
        profiler.disable()
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    for sink in (*sinks, dead):
        await sink.aclose()
    if profiler:
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(18)
        print(f"-- cProfile of collect ({variant}), event-loop thread, by own time "
              "(the profiler slows it ~1.5x)")
        print("\n".join(text.getvalue().splitlines()[4:]))
    if summary.succeeded + summary.truncated != sum(1 for _ in spool.open("rb")):
        raise SystemExit(f"{variant}: collect routed {summary} — not every row succeeded")
    if variant == "null":
        return seconds, cpu, summary.succeeded
    return seconds, cpu, count_keys(out / "results.sqlite")[1]


async def through_emulator(
    work: Path, spool: Path, rows: int
) -> dict[str, tuple[float, float, int]]:
    """A batch made from the spool; its results read raw + orjson, then by the SDK."""
    timings: dict[str, tuple[float, float, int]] = {}
    with EmulatorProcess(work / "emulator") as emulator:
        api = BatchesApi(ApiConfig(base_url=emulator.base_url), "bench")
        try:
            size = sum(len(line.split(b"\t", 1)[0]) + 1 for line in spool.open("rb")) + 14
            batch = await api.create(spool, size)
            ended = await api.retrieve(batch.id)
            assert ended.request_counts.succeeded == rows, ended.request_counts
            for label in ("first fetch (emulator writes its file)", "engine result_blocks+orjson"):
                started, cpu = time.perf_counter(), time.process_time()
                count = 0
                async for block in api.result_blocks(batch.id):
                    for line in block:
                        orjson.loads(line)
                        count += 1
                timings[label] = (time.perf_counter() - started, time.process_time() - cpu, count)
        finally:
            await api.aclose()
        client = anthropic.Anthropic(base_url=emulator.base_url, api_key="bench", max_retries=0)
        started, cpu = time.perf_counter(), time.process_time()
        count = sum(1 for _ in client.messages.batches.results(batch.id))
        timings["SDK results() (pydantic models)"] = (
            time.perf_counter() - started, time.process_time() - cpu, count)
        client.close()
    return timings


async def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--profile", action="store_true", help="cProfile the SQLite collect")
    parser.add_argument("--no-emulator", action="store_true", help="skip the SDK comparison")
    parser.add_argument("--repeat", type=int, default=3,
                        help="collect runs per variant; the best counts (the machine is shared)")
    args = parser.parse_args()
    rows = args.rows
    tune_gc()  # as ``batchd run`` does once its imports are done

    with tempfile.TemporaryDirectory(prefix="bench-collector-") as tmp:
        work = Path(tmp)
        (work / "pipeline.toml").write_text(PIPELINE)
        pipeline = load_config(work / "pipeline.toml").pipelines[0]
        spool, results = work / "tickets-000000.jsonl", work / "results.jsonl"
        write_spool(spool, rows)
        size = write_results(results, rows)
        print(f"rows {rows}, results file {size / 1e6:.1f} MB, spool "
              f"{spool.stat().st_size / 1e6:.1f} MB, load {os.getloadavg()[0]:.2f}")

        figures: dict[str, tuple[float, float, int]] = {}
        figures["bare orjson.loads loop over the file"] = bare_orjson(results)
        variants = (
            ("collect -> SQLite", "sqlite", True),
            ("collect -> SQLite + JSONL (tickets example)", "sqlite+jsonl", True),
            ("  diagnostic: collect -> SQLite, cost fn 0", "sqlite", False),
            ("  diagnostic: collect -> no-op sink", "null", True),
            ("  diagnostic: collect -> no-op sink, cost 0", "null", False),
        )
        for label, variant, priced in variants:
            best_wall = best_cpu = float("inf")
            for attempt in range(args.repeat):
                seconds, cpu, stored = await run_collect(
                    pipeline, work / str(attempt), spool, variant, lambda: file_blocks(results),
                    priced=priced,
                )
                if stored != rows:
                    raise SystemExit(f"{label}: SQLite holds {stored} keys, want {rows}")
                best_wall, best_cpu = min(best_wall, seconds), min(best_cpu, cpu)
            figures[label] = (best_wall, best_cpu, rows)
        if args.profile:
            await run_collect(pipeline, work, spool, "sqlite", lambda: file_blocks(results),
                              profile=True)
        if not args.no_emulator:
            figures.update(await through_emulator(work, spool, rows))

    print(f"collect variants: best of {args.repeat}; CPU is this process's, all threads")
    print(f"{'':<46} {'wall':>8} {'rows/s':>9} {'CPU':>8} {'rows/CPU-s':>10}")
    for label, (seconds, cpu, count) in figures.items():
        print(f"{label:<46} {seconds:6.2f} s {count / seconds:>9,.0f} {cpu:6.2f} s "
              f"{count / max(cpu, 1e-9):>10,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
