"""
The ``kafka`` sink: one message per result row, keyed by the row's key, so a
log-compacted topic (or any consumer that keeps the last value per key) sees
each outcome once however often a group is replayed.

``put`` only hands messages to the producer; ``flush`` is the point of
durability: it returns once the broker has acknowledged every message of the
group (``acks = "all"`` by default). Delivery results are tracked by counters
and a done-callback per message rather than a list of futures, so memory
stays flat however large a group is; the producer's own buffer gives
backpressure.

Idempotence: on by default (no duplicates from the producer's own retries).
A broker that refuses ``InitProducerId`` (some Kafka-compatible brokers, such
as tansu with memory storage) gets a logged warning and a plain producer:
that costs nothing in correctness, because a replay already writes the same
keys again and consumers must dedupe by key anyway.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import structlog
from aiokafka import AIOKafkaProducer, codec
from aiokafka.errors import KafkaConnectionError, KafkaError
from aiokafka.partitioner import murmur2

from batchd.connectors._kafka import build_ssl, client_settings, owner_name, translate_error
from batchd.plugins.contract import PluginContext, Sink
from batchd.plugins.errors import FatalError, RetriableError
from batchd.plugins.hookspecs import hookimpl
from batchd.plugins.options import Options
from batchd.plugins.records import ResultRow

__all__ = ("HEADER_CUSTOM_ID", "KafkaSink", "register_sinks")

log = structlog.get_logger("batchd.kafka")

#: Message header carrying the row's custom_id (the key is the message key).
HEADER_CUSTOM_ID = "batchd-custom-id"

_CODECS = {
    "gzip": codec.has_gzip,
    "snappy": codec.has_snappy,
    "lz4": codec.has_lz4,
    "zstd": codec.has_zstd,
}
_COMPRESSION = tuple(_CODECS)
#: Every key either shape of ``ResultRow.to_dict()`` can produce.
_ROW_FIELDS = frozenset(
    ResultRow(key="", custom_id="", status="succeeded", pipeline="", message={}).to_dict()
) | frozenset(ResultRow(key="", custom_id="", status="dead_letter", pipeline="").to_dict())


@dataclass(slots=True)
class _Delivery:
    """Outstanding messages of one group and the first failure among them."""

    pending: int = 0
    failed: int = 0
    first_error: BaseException | None = None
    settled: asyncio.Event = field(default_factory=asyncio.Event)


class KafkaSink(Sink):
    """
    Result (or dead-letter) rows as JSON messages keyed by ``row.key``.

    Args:
        options: the ``[[pipeline.sink]]`` table without ``type``.
        context: where the pipeline runs.

    .. versionadded:: 0.1
    """

    def __init__(self, options: dict[str, Any], context: PluginContext) -> None:
        owner = owner_name("sink", context)
        opts = Options(options, context, what=owner)
        self._owner = owner
        self._settings = client_settings(opts, context)
        self._topic: str = opts.text("topic", env=True)
        acks = opts.choice("acks", ("all", -1, 0, 1), "all")
        self._acks: str | int = "all" if acks == -1 else acks
        self._idempotent: bool = opts.flag("idempotent", True)
        if self._idempotent and self._acks != "all":
            raise opts.error("idempotent", 'idempotent = true needs acks = "all" '
                                           f"(got acks = {acks!r}); set idempotent = false to "
                                           "use it")
        compression: str | None = opts.choice("compression", _COMPRESSION, None)
        if compression is not None and not _CODECS[compression]():
            raise opts.error("compression", f"{compression!r} needs the cramjam package "
                                            "(pip install cramjam), which is not installed")
        self._compression = compression
        self._fields: list[str] | None = opts.strings("fields", None, choices=sorted(_ROW_FIELDS))
        self._linger_ms: int = opts.integer("linger_ms", 5, min=0)
        self._max_request_size: int = opts.integer("max_request_size", 1_048_576, min=1024)
        self._max_batch_size: int = opts.integer("max_batch_size", 262_144, min=1024)
        self._request_timeout_ms: int = opts.integer("request_timeout_ms", 40_000, min=100)
        opts.finish()
        self._producer: AIOKafkaProducer | None = None
        self._groups: dict[str, _Delivery] = {}

    async def open(self) -> None:
        """Connect; fall back to a plain producer if the broker refuses idempotence."""
        try:
            self._producer = await self._start(self._idempotent)
        except KafkaError as exc:
            if not self._idempotent or exc.retriable or isinstance(exc, KafkaConnectionError):
                raise translate_error(exc, self._owner, "connecting") from exc
            log.warning(
                "kafka broker refused an idempotent producer; sending without "
                "idempotence (replays and retries may duplicate messages by key)",
                sink=self._owner,
                error=f"{type(exc).__name__}: {exc}",
            )
            try:
                self._producer = await self._start(False)
            except KafkaError as again:
                raise translate_error(again, self._owner, "connecting") from again

    async def probe(self) -> None:
        """Connect and authenticate without producing anything."""
        from batchd.connectors.kafka_extent import probe_topics

        await probe_topics(self._settings, self._owner, [])

    async def _start(self, idempotent: bool) -> AIOKafkaProducer:
        producer = AIOKafkaProducer(
            acks=self._acks,
            enable_idempotence=idempotent,
            compression_type=self._compression,
            linger_ms=self._linger_ms,
            max_batch_size=self._max_batch_size,
            max_request_size=self._max_request_size,
            request_timeout_ms=self._request_timeout_ms,
            **build_ssl(self._settings, self._owner),
        )
        try:
            await producer.start()
        except BaseException:
            await producer.stop()
            raise
        return producer

    async def put(self, group: str, rows: Sequence[ResultRow]) -> None:
        """
        Hand one message per row to the producer, packed into one record batch
        per partition (waits only when the producer's queue is full).

        Building the batches here rather than calling ``send()`` per row
        halves the CPU per message; partitions are chosen by Kafka's default
        murmur2 partitioner, exactly as ``send()`` and the Java client would.
        """
        producer = self._require()
        delivery = self._groups.setdefault(group, _Delivery())
        try:
            partitions = sorted(await producer.partitions_for(self._topic))
        except KafkaError as exc:
            raise translate_error(exc, self._owner, f"looking up topic {self._topic!r}") from exc
        builders: dict[int, Any] = {}
        header, dumps, fields, limit = (
            HEADER_CUSTOM_ID,
            orjson.dumps,
            self._fields,
            self._max_request_size,
        )
        count = len(partitions)
        for row in rows:
            doc = row.to_dict()
            if fields is not None:
                doc = {name: doc[name] for name in fields if name in doc}
            key = row.key.encode("utf-8")
            value = dumps(doc)
            if (size := len(key) + len(value)) > limit:
                raise FatalError(
                    f"{self._owner}: the message for key {row.key!r} is {size} bytes, "
                    f"larger than max_request_size ({limit})"
                )
            headers = [(header, row.custom_id.encode("utf-8"))]
            # Kafka's default partitioner (Java client, aiokafka's send()): murmur2 of the key.
            partition = (
                partitions[(murmur2(key) & 0x7FFFFFFF) % count] if count > 1 else partitions[0]
            )
            builder = builders.get(partition)
            if builder is None:
                builder = builders[partition] = producer.create_batch()
            if builder.append(timestamp=None, key=key, value=value, headers=headers) is None:
                await self._send(producer, delivery, builder, partition)
                builder = builders[partition] = producer.create_batch()
                builder.append(timestamp=None, key=key, value=value, headers=headers)
        for partition, builder in builders.items():
            await self._send(producer, delivery, builder, partition)

    async def _send(
        self, producer: AIOKafkaProducer, delivery: _Delivery, builder: Any, partition: int
    ) -> None:
        count = builder.record_count()
        if not count:
            return
        builder.close()  # complete: nothing else may be appended to it
        try:
            future = await producer.send_batch(builder, self._topic, partition=partition)
        except KafkaError as exc:
            raise translate_error(exc, self._owner, f"sending to {self._topic!r}") from exc
        delivery.pending += count
        delivery.settled.clear()
        future.add_done_callback(lambda f: self._delivered(delivery, count, f))

    @staticmethod
    def _delivered(delivery: _Delivery, count: int, future: asyncio.Future[Any]) -> None:
        delivery.pending -= count
        error = future.exception() if not future.cancelled() else asyncio.CancelledError()
        if error is not None:
            delivery.failed += count
            delivery.first_error = delivery.first_error or error
        if delivery.pending == 0:
            delivery.settled.set()

    async def flush(self, group: str) -> None:
        """Return once the broker has acknowledged every message put for ``group``."""
        producer = self._require()
        delivery = self._groups.get(group)
        if delivery is None:
            return
        await producer.flush()
        if delivery.pending:
            await delivery.settled.wait()
        del self._groups[group]
        if delivery.failed:
            error = delivery.first_error
            raise RetriableError(
                f"{self._owner}: {delivery.failed} message(s) of group "
                f"{group!r} were not acknowledged: {type(error).__name__}: "
                f"{error}; the group will be sent again"
            )

    async def aclose(self) -> None:
        """Send what is buffered and disconnect."""
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()

    def _require(self) -> AIOKafkaProducer:
        if self._producer is None:
            raise RuntimeError(f"{self._owner}: open() was not called (or aclose() was)")
        return self._producer


@hookimpl
def register_sinks(register: Any) -> None:
    """The ``kafka`` sink type."""
    register("kafka", KafkaSink)
