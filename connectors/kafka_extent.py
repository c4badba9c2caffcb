"""
How far a Kafka source has to go: its topics' offsets, read without a group.

A consumer without ``group_id`` joins no group, so asking for offsets never
triggers a rebalance of the daemon's own consumer group; it is what
``batchd validate --connect`` and the progress display use.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import anyio
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from batchd.connectors._kafka import build_ssl, translate_error
from batchd.plugins.contract import SourceSize
from batchd.plugins.errors import ConfigError

__all__ = ("probe_topics", "topic_partitions", "topic_size")


async def _consumer(settings: dict[str, Any], owner: str, timeout_ms: int) -> AIOKafkaConsumer:
    consumer = AIOKafkaConsumer(
        group_id=None, enable_auto_commit=False, request_timeout_ms=timeout_ms,
        **build_ssl(settings, owner),
    )
    try:
        await consumer.start()
    except BaseException as exc:
        await consumer.stop()
        if isinstance(exc, KafkaError | OSError):
            raise translate_error(exc, owner, "connecting") from exc
        raise
    return consumer


_PROBE_SECONDS = 10.0
_SIZE_SECONDS = 5.0


async def probe_topics(settings: dict[str, Any], owner: str, topics: Sequence[str]) -> None:
    """Connect and authenticate; a topic the broker does not have is a ConfigError."""
    with anyio.fail_after(_PROBE_SECONDS):
        consumer = await _consumer(settings, owner, int(_PROBE_SECONDS * 1000))
        try:
            known = await consumer.topics()
        finally:
            await consumer.stop()
    missing = [t for t in topics if t not in known]
    if missing:
        raise ConfigError(f"{owner}: topic(s) {', '.join(map(repr, missing))} do not exist "
                          "on the broker")


async def topic_partitions(
    settings: dict[str, Any], owner: str, topics: Sequence[str]
) -> list[TopicPartition]:
    """Every partition of *topics*, in order; a topic the broker does not have is a ConfigError."""
    with anyio.fail_after(_PROBE_SECONDS):
        consumer = await _consumer(settings, owner, int(_PROBE_SECONDS * 1000))
        try:
            known = await consumer.topics()
            missing = [t for t in topics if t not in known]
            if missing:
                raise ConfigError(f"{owner}: topic(s) {', '.join(map(repr, missing))} do not "
                                  "exist on the broker")
            return [TopicPartition(t, p) for t in topics
                    for p in sorted(consumer.partitions_for_topic(t) or ())]
        finally:
            await consumer.stop()


async def topic_size(
    settings: dict[str, Any],
    owner: str,
    topics: Sequence[str],
    next_offsets: Mapping[str, int] | None,
) -> SourceSize | None:
    """Messages between each partition's beginning and end; done up to ``next_offsets``."""
    with anyio.move_on_after(_SIZE_SECONDS):
        consumer = await _consumer(settings, owner, int(_SIZE_SECONDS * 1000))
        try:
            parts = [TopicPartition(t, p) for t in topics
                     for p in sorted(consumer.partitions_for_topic(t) or ())]
            if not parts:
                return None
            begin = await consumer.beginning_offsets(parts)
            end = await consumer.end_offsets(parts)
        finally:
            await consumer.stop()
        total = done = 0
        for tp in parts:
            low, high = begin[tp], end[tp]
            total += max(high - low, 0)
            reached = (next_offsets or {}).get(f"{tp.topic}:{tp.partition}")
            if reached is not None:
                done += min(max(int(reached) - low, 0), max(high - low, 0))
        return SourceSize(total=total, unit="messages", done=done)
    return None
