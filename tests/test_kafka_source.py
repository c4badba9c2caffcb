"""The ``kafka`` source against a real Kafka-protocol broker (tansu, or BATCHD_TEST_KAFKA)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from batchd.connectors.kafka_source import KafkaSource
from batchd.plugins.contract import PluginContext
from batchd.plugins.errors import ConfigError, RetriableError
from batchd.plugins.manager import source_factory
from batchd.plugins.records import Record
from tests.fixtures.kafka import create_topic, produce_json, unique_name

CONTEXT = PluginContext(pipeline="tickets", state_dir=Path("/tmp"), config_dir=Path("/tmp"))


def make_source(bootstrap: str, topic: str, group: str, **extra: Any) -> KafkaSource:
    options: dict[str, Any] = {
        "bootstrap_servers": bootstrap,
        "topics": [topic],
        "group_id": group,
        "key_field": "ticket_id",
        "drain_idle": 0.3,
        "poll_timeout_ms": 200,
        "heartbeat_interval_ms": 200,
        "session_timeout_ms": 2000,
    }
    options.update(extra)
    return KafkaSource({k: v for k, v in options.items() if v is not None}, CONTEXT)


async def read_until_drained(source: KafkaSource, limit: float = 60.0) -> list[Record]:
    """Poll until the source reports zero lag; fail after ``limit`` seconds."""
    out: list[Record] = []
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        batch = await source.poll()
        if batch is None:
            return out
        out.extend(batch)
    raise AssertionError(f"source not drained after {limit}s ({len(out)} records)")


async def seed(bootstrap: str, topic: str, count: int, partitions: int = 3) -> None:
    """``count`` tickets spread over ``partitions`` partitions by message key."""
    await create_topic(bootstrap, topic, partitions)
    await produce_json(
        bootstrap,
        topic,
        ((f"k{i}".encode(), {"ticket_id": f"t{i}", "body": f"body {i}"}) for i in range(count)),
    )


async def committed_offsets(bootstrap: str, group: str, topic: str, n: int) -> dict[int, Any]:
    """The group's committed offset per partition, read by an outside observer."""
    observer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group)
    await observer.start()
    try:
        return {p: await observer.committed(TopicPartition(topic, p)) for p in range(n)}
    finally:
        await observer.stop()


def tp_offsets(records: list[Record]) -> set[tuple[int, int]]:
    return {(r.position["partition"], r.position["offset"]) for r in records}


class TestOptions:
    def test_registered_as_kafka(self) -> None:
        """The plugin manager finds the source under type "kafka"."""
        assert source_factory("kafka") is KafkaSource

    def test_group_id_required(self) -> None:
        """A missing group_id is a ConfigError naming the option."""
        with pytest.raises(ConfigError, match="group_id: is required"):
            KafkaSource({"bootstrap_servers": "h:1", "topics": ["t"]}, CONTEXT)

    def test_unknown_option_rejected(self) -> None:
        """A misspelt option is reported rather than ignored."""
        with pytest.raises(ConfigError, match="'topic'"):
            KafkaSource({"bootstrap_servers": "h:1", "topic": "t", "group_id": "g"}, CONTEXT)

    def test_key_and_key_field_conflict(self) -> None:
        """Giving both key forms is ambiguous and rejected."""
        with pytest.raises(ConfigError, match="not both"):
            make_source("h:1", "t", "g", key={"field": "id"})

    def test_bad_key_shape(self) -> None:
        """key must be "message_key" or { field = ... }."""
        with pytest.raises(ConfigError, match="key: must be \"message_key\""):
            KafkaSource(
                {"bootstrap_servers": "h:1", "topics": ["t"], "group_id": "g", "key": "id"},
                CONTEXT,
            )

    def test_env_bootstrap(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """env:VAR is resolved at load time and an unset variable is named."""
        monkeypatch.delenv("BATCHD_NO_SUCH_VAR", raising=False)
        with pytest.raises(ConfigError, match="BATCHD_NO_SUCH_VAR"):
            make_source("env:BATCHD_NO_SUCH_VAR", "t", "g")
        monkeypatch.setenv("BATCHD_KAFKA_ADDR", "a:1,b:2")
        source = make_source("env:BATCHD_KAFKA_ADDR", "t", "g")
        assert source._settings["bootstrap_servers"] == ["a:1", "b:2"]

    def test_bad_bootstrap_address(self) -> None:
        """An address without a port is a ConfigError."""
        with pytest.raises(ConfigError, match="host:port"):
            make_source("localhost", "t", "g")


@pytest.mark.anyio
class TestReading:
    async def test_each_message_exactly_once(self, kafka_bootstrap: str) -> None:
        """10,000 messages over 3 partitions come out once each, in partition order."""
        topic, group = unique_name("src"), unique_name("g")
        await seed(kafka_bootstrap, topic, 10_000)
        async with make_source(kafka_bootstrap, topic, group) as source:
            await source.start(None)
            records = await read_until_drained(source)
        keys = [r.key for r in records]
        assert len(keys) == 10_000 and set(keys) == {f"t{i}" for i in range(10_000)}
        assert all(r.error is None and r.fields["body"] for r in records)
        last: dict[int, int] = {}
        for record in records:
            p, o = record.position["partition"], record.position["offset"]
            assert o > last.get(p, -1)
            last[p] = o
        assert sorted(last) == [0, 1, 2]

    async def test_next_snapshots_follow_poll_order(self, kafka_bootstrap: str) -> None:
        """Each position's next map is offset+1 of the last record returned per partition."""
        topic, group = unique_name("src"), unique_name("g")
        await seed(kafka_bootstrap, topic, 600)
        async with make_source(kafka_bootstrap, topic, group, batch=50) as source:
            await source.start(None)
            records = await read_until_drained(source)
        expected = {f"{topic}:{p}": 0 for p in range(3)}
        for record in records:
            pos = record.position
            expected[f"{topic}:{pos['partition']}"] = pos["offset"] + 1
            assert pos["next"] == expected
        assert sum(expected.values()) == 600

    async def test_commit_then_restart_continues_after_it(self, kafka_bootstrap: str) -> None:
        """A new consumer in the group starts exactly after the committed snapshot."""
        topic, group = unique_name("src"), unique_name("g")
        await seed(kafka_bootstrap, topic, 300)
        async with make_source(kafka_bootstrap, topic, group, batch=40) as source:
            await source.start(None)
            first = await read_until_drained(source)
            cut = first[120].position
            await source.commit(cut)
        committed = await committed_offsets(kafka_bootstrap, group, topic, 3)
        assert {f"{topic}:{p}": o for p, o in committed.items()} == cut["next"]
        async with make_source(kafka_bootstrap, topic, group) as source:
            await source.start(None)
            second = await read_until_drained(source)
        assert tp_offsets(second) == tp_offsets(first[121:])

    async def test_resume_beats_committed_offsets(self, kafka_bootstrap: str) -> None:
        """start(resume) seeks past the sealed position even when commits lag behind."""
        topic, group = unique_name("src"), unique_name("g")
        await seed(kafka_bootstrap, topic, 300)
        async with make_source(kafka_bootstrap, topic, group, batch=40) as source:
            await source.start(None)
            first = await read_until_drained(source)
            await source.commit(first[50].position)
        async with make_source(kafka_bootstrap, topic, group) as source:
            await source.start(first[200].position)
            second = await read_until_drained(source)
        assert tp_offsets(second) == tp_offsets(first[201:])

    async def test_bad_messages_become_error_records(self, kafka_bootstrap: str) -> None:
        """Unusable messages are error records naming topic, partition and offset."""
        topic, group = unique_name("src"), unique_name("g")
        await create_topic(kafka_bootstrap, topic, 1)
        await produce_json(
            kafka_bootstrap,
            topic,
            [
                (b"a", b"not json"),
                (b"b", [1, 2]),
                (b"c", {"body": "no id"}),
                (b"d", {"ticket_id": None}),
                (b"e", {"ticket_id": True}),
                (b"f", None),
                (b"g", {"ticket_id": 7, "body": "fine"}),
            ],
        )
        async with make_source(kafka_bootstrap, topic, group) as source:
            await source.start(None)
            records = await read_until_drained(source)
        assert [r.key for r in records] == [f"{topic}-0-{o}" for o in range(6)] + ["7"]
        reasons = [r.error for r in records]
        assert reasons[0] is not None and reasons[0].startswith(
            f"topic {topic} partition 0 offset 0:"
        )
        assert "not JSON" in reasons[0]
        assert "JSON list, not an object" in str(reasons[1])
        assert "'ticket_id' is missing" in str(reasons[2])
        assert "'ticket_id' is null" in str(reasons[3])
        assert "bool" in str(reasons[4])
        assert "tombstone" in str(reasons[5])
        assert reasons[6] is None and records[6].fields == {"ticket_id": 7, "body": "fine"}
        assert all(r.fields == {} for r in records[:6])
        assert records[3].position["next"] == {f"{topic}:0": 4}

    async def test_message_key_and_fields(self, kafka_bootstrap: str) -> None:
        """By default the Kafka key is the record key; fields selects a subset."""
        topic, group = unique_name("src"), unique_name("g")
        await create_topic(kafka_bootstrap, topic, 1)
        await produce_json(
            kafka_bootstrap,
            topic,
            [(b"K-1", {"body": "x", "noise": 1}), (None, {"body": "y"}), (b"\xff", {"body": "z"})],
        )
        source = make_source(kafka_bootstrap, topic, group, key_field=None, fields=["body"])
        async with source:
            await source.start(None)
            records = await read_until_drained(source)
        assert (records[0].key, records[0].fields, records[0].error) == ("K-1", {"body": "x"}, None)
        assert "no key" in str(records[1].error)
        assert "not UTF-8" in str(records[2].error)

    async def test_drained_only_at_zero_lag(self, kafka_bootstrap: str) -> None:
        """poll() returns None after drain_idle at the end, and records once more arrive."""
        topic, group = unique_name("src"), unique_name("g")
        await create_topic(kafka_bootstrap, topic, 2)
        async with make_source(kafka_bootstrap, topic, group, drain_idle=0.5) as source:
            await source.start(None)
            began = time.monotonic()
            assert await read_until_drained(source) == []
            assert time.monotonic() - began >= 0.5
            await produce_json(kafka_bootstrap, topic, [(b"x", {"ticket_id": "late"})])
            records = await read_until_drained(source)
        assert [r.key for r in records] == ["late"]

    async def test_poll_is_cancellable(self, kafka_bootstrap: str) -> None:
        """A cancelled poll returns control at once and the source keeps working."""
        topic, group = unique_name("src"), unique_name("g")
        await create_topic(kafka_bootstrap, topic, 1)
        async with make_source(kafka_bootstrap, topic, group, poll_timeout_ms=5000) as source:
            await source.start(None)
            began = time.monotonic()
            with anyio.move_on_after(0.2) as scope:
                await source.poll()
            assert scope.cancelled_caught and time.monotonic() - began < 1.5
            await produce_json(kafka_bootstrap, topic, [(b"x", {"ticket_id": "after"})])
            records: list[Record] | None = []
            while not records and time.monotonic() - began < 30:
                records = await source.poll()
        assert records is not None and [r.key for r in records] == ["after"]

    async def test_unreachable_broker_is_retriable(self) -> None:
        """A broker that refuses connections raises RetriableError from start()."""
        source = make_source("127.0.0.1:1", "t", "g")
        with pytest.raises(RetriableError, match="connecting"):
            await source.start(None)
        await source.aclose()


@pytest.mark.anyio
class TestRebalance:
    async def test_revoked_partitions_are_not_committed(self, kafka_bootstrap: str) -> None:
        """After a second member joins, a commit skips partitions that moved to it."""
        topic, group = unique_name("src"), unique_name("g")
        await seed(kafka_bootstrap, topic, 300)
        async with make_source(kafka_bootstrap, topic, group) as first:
            await first.start(None)
            records = await read_until_drained(first)
            snapshot = records[-1].position
            async with make_source(kafka_bootstrap, topic, group) as second:
                await second.start(None)
                again = await poll_until(lambda: bool(first._next and second._next), first, second)
                kept = {f"{topic}:{tp.partition}" for tp in first._next}
                assert 0 < len(kept) < 3
                await first.commit(snapshot)
                committed = await committed_offsets(kafka_bootstrap, group, topic, 3)
            # The partitions come back; nothing this process already returned is re-read.
            again += await poll_until(lambda: len(first._next) == 3, first)
            again += await read_until_drained(first)
        assert tp_offsets(again) == set()
        for p, offset in committed.items():
            if f"{topic}:{p}" in kept:
                assert offset == snapshot["next"][f"{topic}:{p}"]
            else:
                assert offset is None


async def poll_until(condition: Callable[[], bool], *sources: KafkaSource) -> list[Record]:
    """
    Keep every member polling (so the group can rebalance) until ``condition``
    holds; the records the first member returned meanwhile.
    """
    seen: list[Record] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for n, source in enumerate(sources):
            batch = await source.poll()
            if n == 0 and batch:
                seen.extend(batch)
        if condition() and all(source._joined for source in sources):
            return seen
    raise AssertionError("the group did not rebalance in time")


class TestExample:
    def test_example_pipeline_builds(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """examples/tickets-kafka/pipeline.toml loads and its Kafka tables validate."""
        from batchd.daemon.config import load_config
        from batchd.plugins.manager import sink_factory

        monkeypatch.setenv("KAFKA_BOOTSTRAP", "127.0.0.1:9092")
        path = Path(__file__).parent.parent / "examples" / "tickets-kafka" / "pipeline.toml"
        pipeline = load_config(path).pipeline("tickets")
        context = PluginContext(pipeline="tickets", state_dir=Path("/tmp"), config_dir=path.parent)
        source = source_factory(pipeline.source.type)(dict(pipeline.source.options), context)
        assert isinstance(source, KafkaSource) and source._key_field == "ticket_id"
        for spec in (*pipeline.sinks, pipeline.dead_letter):
            sink = sink_factory(spec.type)(dict(spec.options), context)
            assert sink._settings["bootstrap_servers"] == ["127.0.0.1:9092"]  # type: ignore[attr-defined]


@pytest.mark.anyio
class TestShards:
    """Cluster mode's split: one source per partition, assigned, not a group member."""

    async def test_shards_are_the_topics_partitions(self, kafka_bootstrap: str) -> None:
        topic = unique_name("src")
        await create_topic(kafka_bootstrap, topic, 3)
        source = make_source(kafka_bootstrap, topic, unique_name("g"))
        assert await source.shards() == [f"{topic}:0", f"{topic}:1", f"{topic}:2"]
        with pytest.raises(ConfigError, match="shard 'nope' is not topic:partition"):
            source.only("nope")
        with pytest.raises(ConfigError, match="shard 'other:1' is not of the topics"):
            source.only("other:1")
        missing = make_source(kafka_bootstrap, unique_name("absent"), unique_name("g"))
        with pytest.raises(ConfigError, match="do not exist"):
            await missing.shards()

    async def test_one_partition_read_committed_and_resumed(self, kafka_bootstrap: str) -> None:
        """A restricted source reads its partition only, commits it only, and resumes
        past the sealed position even when the group's offset is behind it."""
        topic, group = unique_name("src"), unique_name("g")
        await seed(kafka_bootstrap, topic, 300)
        shard = f"{topic}:1"
        async with make_source(kafka_bootstrap, topic, group, batch=40) as source:
            source.only(shard)
            await source.start(None)
            first = await read_until_drained(source)
            assert first and {r.position["partition"] for r in first} == {1}
            assert all(set(r.position["next"]) == {shard} for r in first)
            await source.commit(first[10].position)
        committed = await committed_offsets(kafka_bootstrap, group, topic, 3)
        assert committed == {0: None, 1: first[10].position["offset"] + 1, 2: None}
        async with make_source(kafka_bootstrap, topic, group) as source:
            source.only(shard)
            await source.start(None)  # no sealed position: the group's offset
            assert tp_offsets(await read_until_drained(source)) == tp_offsets(first[11:])
        async with make_source(kafka_bootstrap, topic, group) as source:
            source.only(shard)
            await source.start(first[30].position)  # the sealed floor beats the group's
            assert tp_offsets(await read_until_drained(source)) == tp_offsets(first[31:])
