"""The ``kafka`` sink against a real Kafka-protocol broker (tansu, or BATCHD_TEST_KAFKA)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka.partitioner import murmur2

from batchd.plugins.contract import PluginContext
from batchd.plugins.errors import ConfigError, FatalError, RetriableError
from batchd.plugins.manager import sink_factory
from batchd.plugins.records import ResultRow
from batchd.plugins.sinks.kafka import HEADER_CUSTOM_ID, KafkaSink
from tests.fixtures.kafka import TansuBroker, consume_all, create_topic, unique_name

CONTEXT = PluginContext(pipeline="tickets", state_dir=Path("/tmp"), config_dir=Path("/tmp"))


def make_sink(bootstrap: str, topic: str, **extra: Any) -> KafkaSink:
    return KafkaSink({"bootstrap_servers": bootstrap, "topic": topic, **extra}, CONTEXT)


def result_row(i: int, attempt: int = 1) -> ResultRow:
    return ResultRow(
        key=f"ticket-{i}",
        custom_id=f"c{i}",
        status="succeeded",
        pipeline="tickets",
        output=f"label {i % 7}",
        model="claude-haiku-4-5",
        input_tokens=120 + i % 13,
        output_tokens=3,
        cost_usd=0.0001,
        batch_id="msgbatch_1",
        attempt=attempt,
    )


async def read_topic(bootstrap: str, topic: str) -> list[Any]:
    return [message async for message in consume_all(bootstrap, topic)]


class TestOptions:
    def test_registered_as_kafka(self) -> None:
        """The plugin manager finds the sink under type "kafka"."""
        assert sink_factory("kafka") is KafkaSink

    def test_topic_required(self) -> None:
        """A missing topic is a ConfigError naming the option."""
        with pytest.raises(ConfigError, match="topic: is required"):
            KafkaSink({"bootstrap_servers": "h:1"}, CONTEXT)

    def test_idempotence_needs_acks_all(self) -> None:
        """idempotent with acks = 1 is rejected with the way out in the message."""
        with pytest.raises(ConfigError, match="idempotent = false"):
            make_sink("h:1", "t", acks=1)
        assert make_sink("h:1", "t", acks=1, idempotent=False)._acks == 1

    def test_unknown_field_and_compression(self) -> None:
        """fields must name row fields; compression must be a known codec."""
        with pytest.raises(ConfigError, match="outptu"):
            make_sink("h:1", "t", fields=["key", "outptu"])
        with pytest.raises(ConfigError, match="compression"):
            make_sink("h:1", "t", compression="brotli")


@pytest.mark.anyio
class TestWriting:
    async def test_one_message_per_key(self, kafka_bootstrap: str) -> None:
        """10,000 rows become 10,000 messages keyed by row key with the row's JSON."""
        topic = unique_name("sink")
        await create_topic(kafka_bootstrap, topic, 3)
        rows = [result_row(i) for i in range(10_000)]
        async with make_sink(kafka_bootstrap, topic) as sink:
            await sink.open()
            for start in range(0, len(rows), 2500):
                await sink.put("batch-1", rows[start : start + 2500])
            await sink.flush("batch-1")
        messages = await read_topic(kafka_bootstrap, topic)
        by_key = {m.key.decode(): m for m in messages}
        assert len(messages) == len(by_key) == 10_000
        for row in rows[::97]:
            message = by_key[row.key]
            assert orjson.loads(message.value) == row.to_dict()
            assert (HEADER_CUSTOM_ID, row.custom_id.encode()) in list(message.headers)
            assert message.partition == (murmur2(row.key.encode()) & 0x7FFFFFFF) % 3

    async def test_flush_waits_for_every_ack(self, kafka_bootstrap: str) -> None:
        """put returns with deliveries pending; after flush all are readable."""
        topic = unique_name("sink")
        await create_topic(kafka_bootstrap, topic, 2)
        async with make_sink(kafka_bootstrap, topic, linger_ms=50) as sink:
            await sink.open()
            await sink.put("g", [result_row(i) for i in range(3000)])
            assert sink._groups["g"].pending > 0
            await sink.flush("g")
            assert "g" not in sink._groups
            messages = await read_topic(kafka_bootstrap, topic)
        assert len(messages) == 3000

    async def test_replay_duplicates_only_by_key(self, kafka_bootstrap: str) -> None:
        """A replayed group writes the same keys again; last-value-per-key is unchanged."""
        topic = unique_name("sink")
        await create_topic(kafka_bootstrap, topic, 3)
        rows = [result_row(i) for i in range(500)]
        async with make_sink(kafka_bootstrap, topic) as sink:
            await sink.open()
            await sink.put("b1", rows[:200])  # a partial first attempt ...
            await sink.flush("b1")
            await sink.put("b1", rows)  # ... then the whole group again
            await sink.flush("b1")
        messages = await read_topic(kafka_bootstrap, topic)
        assert len(messages) == 700
        latest = {m.key.decode(): orjson.loads(m.value) for m in messages}
        assert latest == {row.key: row.to_dict() for row in rows}

    async def test_dead_letter_rows(self, kafka_bootstrap: str) -> None:
        """Dead-letter rows carry the dead-letter shape, history included."""
        topic = unique_name("dlq")
        await create_topic(kafka_bootstrap, topic, 1)
        row = ResultRow(
            key="ticket-9",
            custom_id="c9",
            status="dead_letter",
            pipeline="tickets",
            error_type="invalid_request_error",
            error_message="max_tokens: too large",
            attempt=2,
            history=[{"attempt": 1, "error_type": "overloaded_error"}],
            request={"model": "claude-haiku-4-5", "max_tokens": 16},
            source={"topic": "tickets", "partition": 0, "offset": 41},
        )
        async with make_sink(kafka_bootstrap, topic) as sink:
            await sink.open()
            await sink.put("dl", [row])
            await sink.flush("dl")
        (message,) = await read_topic(kafka_bootstrap, topic)
        doc = orjson.loads(message.value)
        assert doc == row.to_dict()
        assert doc["error_type"] == "invalid_request_error" and doc["attempts"] == 2
        assert doc["source"]["offset"] == 41 and "output" not in doc

    async def test_fields_subset(self, kafka_bootstrap: str) -> None:
        """fields keeps only the named keys of the row."""
        topic = unique_name("sink")
        await create_topic(kafka_bootstrap, topic, 1)
        async with make_sink(kafka_bootstrap, topic, fields=["key", "output"]) as sink:
            await sink.open()
            await sink.put("g", [result_row(1)])
            await sink.flush("g")
        (message,) = await read_topic(kafka_bootstrap, topic)
        assert orjson.loads(message.value) == {"key": "ticket-1", "output": "label 1"}

    async def test_gzip_compression(self, kafka_bootstrap: str) -> None:
        """compression = "gzip" round-trips through the broker."""
        topic = unique_name("sink")
        await create_topic(kafka_bootstrap, topic, 1)
        async with make_sink(kafka_bootstrap, topic, compression="gzip") as sink:
            await sink.open()
            await sink.put("g", [result_row(i) for i in range(200)])
            await sink.flush("g")
        messages = await read_topic(kafka_bootstrap, topic)
        assert [orjson.loads(m.value)["key"] for m in messages] == [
            f"ticket-{i}" for i in range(200)
        ]

    async def test_oversized_message_is_fatal(self, kafka_bootstrap: str) -> None:
        """A row larger than max_request_size stops the sink with its key named."""
        topic = unique_name("sink")
        await create_topic(kafka_bootstrap, topic, 1)
        big = result_row(5)
        big.output = "x" * 4096
        async with make_sink(kafka_bootstrap, topic, max_request_size=2048) as sink:
            await sink.open()
            with pytest.raises(FatalError, match=r"'ticket-5'.*max_request_size"):
                await sink.put("g", [result_row(1), big])

    async def test_unacknowledged_messages_fail_flush(self, tmp_path: Path) -> None:
        """If the broker dies before acking, flush raises RetriableError, not success."""
        broker = TansuBroker(tmp_path / "tansu.log")
        broker.wait_ready()
        try:
            await create_topic(broker.bootstrap, "doomed", 1)
            sink = make_sink(broker.bootstrap, "doomed", request_timeout_ms=1500)
            async with sink:
                await sink.open()
                await sink.put("g", [result_row(0)])
                await sink.flush("g")
                broker.stop()
                began = time.monotonic()
                await sink.put("g", [result_row(i) for i in range(1, 50)])
                with pytest.raises(RetriableError, match=r"49 message.* of group 'g' were not ack"):
                    await sink.flush("g")
                assert time.monotonic() - began < 30
        finally:
            broker.stop()


@pytest.mark.anyio
class TestTls:
    async def test_missing_tls_file_is_config_error(self, tmp_path: Path) -> None:
        """A missing CA file is reported by option name at open, not as a raw OSError."""
        context = PluginContext(pipeline="tickets", state_dir=tmp_path, config_dir=tmp_path)
        sink = KafkaSink(
            {
                "bootstrap_servers": "127.0.0.1:1",
                "topic": "t",
                "security_protocol": "SSL",
                "ssl_cafile": "certs/ca.pem",
            },
            context,
        )
        with pytest.raises(ConfigError, match=r"ssl_cafile = '.*/certs/ca.pem'"):
            await sink.open()
        await sink.aclose()
