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
from datetime import datetime
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


def _sealed_from(cluster: Cluster, i: int) -> int:
    """From how many partitions worker *i* has sealed chunks."""
    try:
        worker = cluster.worker_id(i)
    except (FileNotFoundError, IndexError):
        return 0
    return len(_sealed_floors(cluster, worker))


def _victim_sealed(cluster: Cluster, i: int) -> bool:
    """Whether worker *i* has sealed a chunk from a partition it still reads."""
    try:
        worker = cluster.worker_id(i)
    except (FileNotFoundError, IndexError):
        return False
    return bool(set(_sealed_floors(cluster, worker)) & set(_shards_of(cluster, i)))


def _sealed_floors(cluster: Cluster, worker: str) -> dict[str, int]:
    """shard -> the next offset after the last record *worker* sealed from it."""
    floors: dict[str, int] = {}
    for _, sealer, shard, offset in _seals(cluster):
        if sealer == worker:
            floors[shard] = max(floors.get(shard, 0), offset)
    return floors


def _seals(cluster: Cluster) -> list[tuple[float, str, str, int]]:
    """Every seal, in order: (when, by whom, its shard, the next offset after it)."""
    rows = _query(cluster.dsn, f'SELECT ts, worker, record FROM "{cluster.schema}".event '
                               "WHERE kind = 'chunk_sealed' ORDER BY seq")
    out = []
    for row in rows:
        record = orjson.loads(row["record"])
        shard = record["shard"]
        out.append((row["ts"], row["worker"], shard, record["position"]["next"][shard]))
    return out


def _starts(cluster: Cluster, i: int) -> list[tuple[float, str, int]]:
    """(when, partition, first offset read) of every partition worker *i* began reading."""
    out = []
    for line in (cluster.workers[i].root / "run.log").read_text().splitlines():
        if '"kafka partitions assigned"' not in line:
            continue
        event = orjson.loads(line)
        when = datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()
        out.extend((when, name, offset) for name, offset in event["partitions"].items())
    return out


def _check_every_start_at_the_sealed_floor(cluster: Cluster) -> int:
    """
    Whoever began reading a partition, whenever (at start, after a hand-back, after a
    takeover), began just past the last record anyone had sealed from it by then: no
    sealed record read twice, none skipped. A seal of the previous holder after that
    moment would have been fenced. Returns how many starts resumed past a seal.
    """
    seals = _seals(cluster)
    resumed = 0
    for i in range(len(cluster.workers)):
        for when, shard, offset in _starts(cluster, i):
            floor = max((o for ts, _, s, o in seals if s == shard and ts < when), default=0)
            assert offset == floor, (i, shard, offset, floor, cluster.logs())
            resumed += floor > 0
    return resumed


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
        # Worker 0 alone first: it takes all six partitions and seals from them; when
        # the others join it hands four back at chunk boundaries.
        cluster.start(0)
        wait_for("worker 0 sealing from two partitions", lambda: _sealed_from(cluster, 0) >= 2,
                 timeout=30)
        cluster.start(1)
        cluster.start(2)
        # Mid-run: worker 1 reads some partitions and has sealed chunks from them, which
        # their next reader must not read (nor send, nor pay) again.
        wait_for("worker 1 sealing from its partitions",
                 lambda: _victim_sealed(cluster, 1), timeout=30)
        held = _shards_of(cluster, 1)
        killed = cluster.worker_id(1)
        victim = cluster.procs[1]
        assert victim is not None
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        cluster.wait([0, 2])

        # Each record went to the API once; every key one outcome (the killed worker's
        # sink rows of chunks it had not recorded as committed may be written again).
        cluster.check(emulator, rewritten=3 * 40)
        offsets = anyio.run(_committed_and_ends, kafka_bootstrap, topic, group)
        assert all(end > 0 for _, end in offsets.values()), offsets  # every partition used
        assert {p: c for p, (c, _) in offsets.items()} == {p: e for p, (_, e) in
                                                           offsets.items()}, offsets
        # Every start of a partition was at its sealed floor: after worker 0's hand-backs
        # and after worker 1's death alike (some of each resumed past a seal).
        assert _check_every_start_at_the_sealed_floor(cluster) >= 2
        survivors = "\n".join((cluster.workers[i].root / "run.log").read_text() for i in (0, 2))
        assert '"handing a source shard back' in survivors, cluster.logs()
        taken = {orjson.loads(line)["shard"] for line in survivors.splitlines()
                 if '"reading a source shard"' in line and f'"previous_owner":"{killed}"' in line}
        sealed_by_victim = set(_sealed_floors(cluster, killed)) & set(held)
        assert sealed_by_victim and sealed_by_victim <= taken, (held, taken, cluster.logs())
