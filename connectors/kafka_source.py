"""
The ``kafka`` source: JSON messages from one or more topics, read through a
consumer group whose offsets are committed only after the engine says the
records are terminal.

Why each record carries a ``next`` snapshot: the engine commits "everything up
to this record", but a Kafka commit is per partition. The snapshot holds, for
every partition this consumer owned when the record was returned, the next
offset to read, so one ``commit(position)`` moves every partition exactly as
far as the records before it in poll order, and a ``start(resume)`` can seek
every partition past what the engine already sealed into chunks.

Rebalances: records from a partition that was revoked may still be in the
engine. Their offsets are never committed by us (the new owner re-reads from
the group's committed offset, so it may process them again; sinks upsert by
key, which makes that harmless).

Cluster mode reads a topic apart without the group's rebalancing: :meth:`shards`
names every topic-partition, and a source restricted with :meth:`only` is
``assign()``-ed to exactly that partition (no group membership, no rebalance; the
group is still where offsets are committed). Which worker reads which partition is
decided by the cluster store's shard leases, and a new reader resumes after the
highest position sealed from that partition, so nothing sealed is read twice.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import orjson
import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

from batchd.connectors._kafka import build_ssl, client_settings, owner_name, translate_error
from batchd.plugins.contract import PluginContext, Source, SourceSize
from batchd.plugins.errors import ConfigError
from batchd.plugins.hookspecs import hookimpl
from batchd.plugins.options import Options
from batchd.plugins.records import Record

__all__ = ("KafkaSource", "register_sources")

log = structlog.get_logger("batchd.kafka")

#: Consumer-group timings passed to aiokafka as they are (milliseconds).
_GROUP_TIMINGS = ("session_timeout_ms", "heartbeat_interval_ms", "max_poll_interval_ms")
_MESSAGE_KEY = "message_key"


def _tp_name(tp: TopicPartition) -> str:
    return f"{tp.topic}:{tp.partition}"


def _parse_tp(name: str) -> TopicPartition:
    topic, _, partition = name.rpartition(":")
    return TopicPartition(topic, int(partition))


class _BadMessage(Exception):
    """A message that was read but cannot become a record (the reason is the text)."""


class KafkaSource(Source):
    """
    Records from Kafka topics, keyed by message key or a JSON field.

    Args:
        options: the ``[pipeline.source]`` table without ``type``.
        context: where the pipeline runs.

    .. versionadded:: 0.1
    """

    # A stream runs for months: the duplicate-key ledger forgets its keys after 30 days
    # unless the pipeline's ledger_retention says otherwise (docs/operations.md).
    ledger_retention: float | None = 30 * 86400.0
    # A second consumer in the group would take partitions from the running one.
    rereadable = False

    def __init__(self, options: dict[str, Any], context: PluginContext) -> None:
        owner = owner_name("source", context)
        opts = Options(options, context, what=owner)
        self._owner = owner
        self._settings = client_settings(opts, context)
        self._topics: list[str] = opts.strings("topics", single=True, env=True)
        # Offsets are committed to this group.
        self._group_id: str = opts.text("group_id", env=True)
        self._key_field = self._parse_key(opts)
        self._fields: list[str] | None = opts.strings("fields", None, env=True)
        self.max_records = opts.integer("batch", self.max_records, min=1)
        self._drain_idle: float = opts.number("drain_idle", 1.0, min=0)
        self._poll_ms: int = opts.integer("poll_timeout_ms", 500, min=1)
        self._timings = {
            name: opts.integer(name, min=1) for name in _GROUP_TIMINGS if name in opts
        }
        for name in _GROUP_TIMINGS:
            opts.raw(name)  # known even when absent
        opts.finish()

        self._consumer: AIOKafkaConsumer | None = None
        #: Never read below this, whoever committed what: the sealed position from
        #: ``resume``, raised on revoke to what this process already returned.
        self._floor: dict[TopicPartition, int] = {}
        #: Next offset to return, per partition we own now.
        self._next: dict[TopicPartition, int] = {}
        #: The same, keyed "topic:partition": copied into every record's position.
        self._snapshot: dict[str, int] = {}
        #: Where the current ownership of each partition began; older snapshots are stale.
        self._owned_from: dict[TopicPartition, int] = {}
        self._committed: dict[TopicPartition, int] = {}
        self._joined = False
        # A commit that arrives while we hold no assignment (joining, or mid-rebalance)
        # waits here and is sent on the next assignment instead of being dropped.
        self._pending_commit: dict[str, Any] | None = None
        self._idle_since: float | None = None
        #: Set by :meth:`only`: the one partition this source reads, assigned, not subscribed.
        self._assigned: TopicPartition | None = None

    @staticmethod
    def _parse_key(opts: Options) -> str | None:
        """``None`` for the message key, else the JSON field that holds the key."""
        key_field: str | None = opts.text("key_field", None, env=True)
        if key_field is not None:
            if "key" in opts:
                raise opts.error("key", "give either 'key' or 'key_field', not both")
            return key_field
        key = opts.get("key", (str, dict), _MESSAGE_KEY)
        if key == _MESSAGE_KEY:
            return None
        if isinstance(key, dict) and set(key) == {"field"}:
            field = key["field"]
            if isinstance(field, str) and field.strip():
                return field.strip()
        raise opts.error("key", f'must be "message_key" or {{ field = "name" }}, got {key!r}')

    # -- lifecycle ---------------------------------------------------------------

    async def start(self, resume: dict[str, Any] | None) -> None:
        """Join the group; seek past ``resume`` once partitions are assigned."""
        if resume is not None:
            try:
                self._floor = {_parse_tp(k): int(v) for k, v in resume["next"].items()}
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                raise ConfigError(
                    f"{self._owner}: resume position {resume!r} has no valid 'next' map "
                    f"({exc}); was it written by another source type?"
                ) from exc
        consumer = AIOKafkaConsumer(
            group_id=self._group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=self.max_records,
            **self._timings,
            **build_ssl(self._settings, self._owner),
        )
        if self._assigned is None:
            consumer.subscribe(self._topics, listener=_Listener(self))
        else:
            consumer.assign([self._assigned])
        self._consumer = consumer  # the listener may run before start() returns
        try:
            await consumer.start()
            if self._assigned is not None:
                # No group membership: the committed offset (else the earliest), or the
                # sealed floor past it, is where this reader starts.
                await self._on_assigned([self._assigned])
        except BaseException as exc:
            self._consumer = None
            await consumer.stop()
            if isinstance(exc, KafkaError | OSError):
                raise translate_error(exc, self._owner, "connecting") from exc
            raise
        log.info(
            "kafka source started",
            source=self._owner,
            topics=self._topics,
            group_id=self._group_id,
            resume=bool(self._floor),
        )

    async def shards(self) -> list[str]:
        """
        Every partition of the topics, as ``"topic:partition"``: the parts cluster workers
        read apart (one shard lease each). Asked without joining the group.
        """
        from batchd.connectors.kafka_extent import topic_partitions

        return [_tp_name(tp) for tp in await topic_partitions(self._settings, self._owner,
                                                              self._topics)]

    def only(self, shard: str) -> None:
        """Read just this ``"topic:partition"`` (one of :meth:`shards`); call before start()."""
        try:
            tp = _parse_tp(shard)
        except ValueError:
            raise ConfigError(f"{self._owner}: shard {shard!r} is not topic:partition") from None
        if tp.topic not in self._topics:
            raise ConfigError(f"{self._owner}: shard {shard!r} is not of the topics "
                              f"{', '.join(self._topics)}")
        self._assigned = tp

    async def size(self, position: dict[str, Any] | None) -> SourceSize | None:
        """The topics' messages (end minus beginning offsets) and how many precede ``position``."""
        from batchd.connectors.kafka_extent import topic_size

        try:
            return await topic_size(self._settings, self._owner, self._topics,
                                    (position or {}).get("next"))
        except Exception:
            return None

    async def probe(self) -> None:
        """Connect without joining the group and check the topics exist."""
        from batchd.connectors.kafka_extent import probe_topics

        await probe_topics(self._settings, self._owner, self._topics)

    async def poll(self) -> list[Record] | None:
        """Up to ``batch`` records; ``None`` after ``drain_idle`` seconds at zero lag."""
        consumer = self._require()
        try:
            batches = await consumer.getmany(timeout_ms=self._poll_ms, max_records=self.max_records)
        except KafkaError as exc:
            raise translate_error(exc, self._owner, "fetching") from exc
        records: list[Record] = []
        owned = consumer.assignment()
        for tp, messages in batches.items():
            if tp not in owned:
                continue  # revoked while the fetch was in flight
            if tp not in self._next and messages:  # the assignment callback failed
                self._adopt(tp, messages[0].offset)
            name = _tp_name(tp)
            for message in messages:
                if message.offset < self._next[tp]:
                    continue  # fetched before a seek past the sealed floor
                self._next[tp] = self._snapshot[name] = message.offset + 1
                records.append(self._record(message))
        if records:
            self._idle_since = None
            return records
        return None if self._drained() else []

    async def commit(self, position: dict[str, Any]) -> None:
        """Commit ``position["next"]`` for partitions we still own, never backwards."""
        consumer = self._require()
        if not self._joined:
            self._pending_commit = position  # later positions cover earlier ones
            return
        offsets: dict[TopicPartition, int] = {}
        for name, offset in position.get("next", {}).items():
            tp = _parse_tp(name)
            start = self._owned_from.get(tp)
            if start is None or offset < start or offset == self._committed.get(tp):
                continue  # not ours any more, a stale snapshot, or nothing new
            offsets[tp] = offset
        if not offsets:
            return
        try:
            await consumer.commit(offsets)
        except KafkaError as exc:
            # A rebalance between our check and the commit: the next commit covers it.
            raise translate_error(exc, self._owner, "committing offsets") from exc
        self._committed.update(offsets)

    async def aclose(self) -> None:
        """Leave the group (uncommitted records are re-read by whoever owns them next)."""
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await consumer.stop()

    # -- internals ---------------------------------------------------------------

    def _require(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            raise RuntimeError(f"{self._owner}: start() was not called (or aclose() was)")
        return self._consumer

    def _record(self, message: Any) -> Record:
        """One record, or an error record naming topic/partition/offset."""
        where = f"topic {message.topic} partition {message.partition} offset {message.offset}"
        position = {
            "topic": message.topic,
            "partition": message.partition,
            "offset": message.offset,
            "next": self._snapshot.copy(),
        }
        try:
            key, fields = self._decode(message)
        except _BadMessage as exc:
            fallback = f"{message.topic}-{message.partition}-{message.offset}"
            return Record(key=fallback, fields={}, position=position, error=f"{where}: {exc}")
        return Record(key=key, fields=fields, position=position)

    def _decode(self, message: Any) -> tuple[str, dict[str, Any]]:
        if message.value is None:
            raise _BadMessage("message has no value (a tombstone)")
        try:
            value = orjson.loads(message.value)
        except orjson.JSONDecodeError as exc:
            raise _BadMessage(f"value is not JSON ({exc})") from None
        if not isinstance(value, dict):
            raise _BadMessage(f"value is a JSON {type(value).__name__}, not an object")
        if self._key_field is None:
            if message.key is None:
                raise _BadMessage("message has no key (set key_field to key by a JSON field)")
            try:
                key = message.key.decode("utf-8")
            except UnicodeDecodeError:
                raise _BadMessage("message key is not UTF-8") from None
        else:
            if self._key_field not in value:
                raise _BadMessage(f"key field {self._key_field!r} is missing")
            raw = value[self._key_field]
            if raw is None:
                raise _BadMessage(f"key field {self._key_field!r} is null")
            if isinstance(raw, bool) or not isinstance(raw, str | int):
                raise _BadMessage(
                    f"key field {self._key_field!r} is a {type(raw).__name__}, "
                    "not a string or integer"
                )
            key = str(raw)
        if not key:
            raise _BadMessage("key is empty")
        if self._fields is not None:
            value = {name: value[name] for name in self._fields if name in value}
        return key, value

    def _drained(self) -> bool:
        """Zero lag on every owned partition, continuously for ``drain_idle`` seconds."""
        consumer = self._require()
        at_end = self._joined and all(
            (high := consumer.highwater(tp)) is not None and self._next.get(tp, -1) >= high
            for tp in consumer.assignment()
        )
        if not at_end:
            self._idle_since = None
            return False
        now = time.monotonic()
        if self._idle_since is None:
            self._idle_since = now
        return now - self._idle_since >= self._drain_idle

    async def _on_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        consumer = self._require()
        for tp in assigned:
            self._adopt(tp, await consumer.position(tp))
        self._joined = True
        log.info(
            "kafka partitions assigned",
            source=self._owner,
            partitions=dict(self._snapshot),
        )
        pending, self._pending_commit = self._pending_commit, None
        if pending is not None:
            await self.commit(pending)

    def _adopt(self, tp: TopicPartition, offset: int) -> None:
        """Start owning ``tp`` at ``offset``, or at the sealed floor if that is further."""
        floor = self._floor.get(tp)
        if floor is not None and floor > offset:
            self._require().seek(tp, floor)
            offset = floor
        self._next[tp] = self._snapshot[_tp_name(tp)] = offset
        self._owned_from[tp] = offset
        self._committed.pop(tp, None)

    def _on_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        self._joined = False
        self._idle_since = None
        names = []
        for tp in revoked:
            names.append(name := _tp_name(tp))
            self._snapshot.pop(name, None)
            returned = self._next.pop(tp, None)
            if returned is not None:  # this process already holds everything before it
                self._floor[tp] = max(self._floor.get(tp, 0), returned)
            self._owned_from.pop(tp, None)
            self._committed.pop(tp, None)
        if names:
            log.info(
                "kafka partitions revoked; in-flight records from them will not be "
                "committed by this consumer",
                source=self._owner,
                partitions=names,
            )


class _Listener(ConsumerRebalanceListener):
    """Keeps the source's partition bookkeeping in step with the group."""

    def __init__(self, source: KafkaSource) -> None:
        self._source = source

    async def on_partitions_revoked(self, revoked: Any) -> None:
        self._source._on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: Any) -> None:
        await self._source._on_assigned(assigned)


@hookimpl
def register_sources(register: Any) -> None:
    """The ``kafka`` source type."""
    register("kafka", KafkaSource)
