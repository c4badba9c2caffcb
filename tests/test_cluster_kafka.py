"""
Cluster mode reading Kafka: a topic's partitions split across three real ``batchd run``
workers (one shard lease per partition, the consumer ``assign()``-ed to the partitions a
worker holds), one of them SIGKILLed mid-run.

The broker is the tests' tansu (or ``BATCHD_TEST_KAFKA``), the store the real
PostgreSQL, the API the emulator. A new holder of a dead worker's partition resumes
after the highest position sealed from it: no record reaches the emulator twice, every
key gets one outcome, and the group's committed offsets reach the end of every
partition.
"""

from __future__ import annotations

import csv
import signal
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from batchd.daemon.emulator import EmulatorThread
from tests.fixtures.cluster_workers import Cluster, _query, wait_for
from tests.fixtures.kafka import consume_all, create_topic, produce_json, unique_name

PARTITIONS = 6
ROWS = 1200


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return [row for row in csv.DictReader(f) if row.get("ticket_id")]


async def _committed_and_ends(bootstrap: str, topic: str,
                              group: str) -> dict[int, tuple[int | None, int]]:
    """
    partition -> (the group's committed offset, the partition's end offset).

    The end is read by consuming to the high watermark (tansu's ListOffsets is not
    accurate, docs/kafka.md).
    """
    ends: dict[int, int] = {}
    async for message in consume_all(bootstrap, topic):
        ends[message.partition] = max(ends.get(message.partition, 0), message.offset + 1)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group,
                                enable_auto_commit=False)
    await consumer.start()
    try:
        return {p: (await consumer.committed(TopicPartition(topic, p)), ends.get(p, 0))
                for p in range(PARTITIONS)}
    finally:
        await consumer.stop()


def _shards_of(cluster: Cluster, i: int) -> list[str]:
    try:
        worker = cluster.worker_id(i)
    except (FileNotFoundError, IndexError):
        return []
    rows = _query(cluster.dsn, f'SELECT shard FROM "{cluster.schema}".shard '
                               f"WHERE owner = '{worker}'")
    return sorted(r["shard"] for r in rows)


def _sealed_from(cluster: Cluster, shards: list[str]) -> int:
    """Chunks sealed from these shards (their records must never be read again)."""
    if not shards:
        return 0
    names = ", ".join(f"'{s}'" for s in shards)
    rows = _query(cluster.dsn, f'SELECT count(*) AS n FROM "{cluster.schema}".chunk '
                               f"WHERE shard IN ({names})")
    return int(rows[0]["n"])


def _sealed_floors(cluster: Cluster, worker: str) -> dict[str, int]:
    """shard -> the next offset after the last record *worker* sealed from it."""
    rows = _query(cluster.dsn, f'SELECT record FROM "{cluster.schema}".event '
                               f"WHERE kind = 'chunk_sealed' AND worker = '{worker}'")
    floors: dict[str, int] = {}
    for row in rows:
        record = orjson.loads(row["record"])
        shard = record["shard"]
        floors[shard] = max(floors.get(shard, 0), record["position"]["next"][shard])
    return floors


def _starts(cluster: Cluster, i: int, *, after: datetime) -> list[tuple[str, int]]:
    """(partition, first offset read) of every partition worker *i* began reading after *after*."""
    out = []
    for line in (cluster.workers[i].root / "run.log").read_text().splitlines():
        if '"kafka partitions assigned"' not in line:
            continue
        event = orjson.loads(line)
        if datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")) > after:
            out.extend(event["partitions"].items())
    return out


class TestKafkaPartitionsSplit:
    def test_six_partitions_three_workers_one_killed(
        self, cluster_factory: Callable[..., Cluster], emulator: EmulatorThread,
        kafka_bootstrap: str,
    ) -> None:
        topic, group = unique_name("cluster-tickets"), unique_name("cluster-group")
        source: dict[str, Any] = {
            "type": "kafka", "bootstrap_servers": kafka_bootstrap, "topics": [topic],
            "group_id": group, "key_field": "ticket_id", "drain_idle": 0.5,
            "poll_timeout_ms": 200, "batch": 100,
        }
        cluster = cluster_factory(rows=ROWS, pipeline={"source": source, "max_requests": 40})
        rows = _rows(cluster.input)

        async def fill() -> None:
            await create_topic(kafka_bootstrap, topic, PARTITIONS)
            await produce_json(kafka_bootstrap, topic,
                               [(row["ticket_id"].encode(), row) for row in rows])

        anyio.run(fill)
        for i in range(3):
            cluster.start(i)
        # Mid-run: worker 1 reads some partitions and has sealed chunks from them, which
        # their next reader must not read (nor send, nor pay) again.
        wait_for("worker 1 sealing from its partitions",
                 lambda: _sealed_from(cluster, _shards_of(cluster, 1)) >= 1, timeout=30)
        held = _shards_of(cluster, 1)
        killed = cluster.worker_id(1)
        victim = cluster.procs[1]
        assert victim is not None
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        killed_at = datetime.now(UTC)
        cluster.wait([0, 2])

        # Each record went to the API once; every key one outcome (the killed worker's
        # sink rows of chunks it had not recorded as committed may be written again).
        cluster.check(emulator, rewritten=3 * 40)
        offsets = anyio.run(_committed_and_ends, kafka_bootstrap, topic, group)
        assert all(end > 0 for _, end in offsets.values()), offsets  # every partition used
        assert {p: c for p, (c, _) in offsets.items()} == {p: e for p, (_, e) in
                                                           offsets.items()}, offsets
        # The partitions were read apart, and the killed worker's were taken over, each
        # read again from just past the highest offset it had sealed (none re-read).
        floors = _sealed_floors(cluster, killed)
        assert floors and set(floors) <= set(held), (floors, held)
        starts = [start for i in (0, 2) for start in _starts(cluster, i, after=killed_at)]
        for shard, floor in floors.items():
            taken = [offset for name, offset in starts if name == shard]
            assert taken and min(taken) == floor, (shard, floor, taken, cluster.logs())
        readers = [i for i in range(3)
                   if '"reading a source shard"' in (cluster.workers[i].root
                                                      / "run.log").read_text()]
        assert len(readers) >= 2, readers
