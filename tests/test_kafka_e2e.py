"""
``batchd run`` end to end from a Kafka topic to a Kafka results topic.

A real broker (tansu, or ``BATCHD_TEST_KAFKA``), the real emulator over HTTP
and the daemon as a real subprocess, killed with SIGKILL at crash points and
restarted. The label each ticket must get follows from the emulator's reply
rules and the fate of every request from its seeded fault oracle (a pure
function of seed, custom_id and attempt), so the tests compare the results
topic, the dead-letter topic, the consumer group's committed offsets and the
emulator's counters with what they must hold, key by key.

Delivery is at least once, with keys (docs/kafka.md): a replay after a crash
may publish a batch's rows again. The tests allow a key to appear more than
once in the results topic only when every copy is byte-identical, which is
what a consumer that keeps the last value per key (or a compacted topic)
needs.
"""

from __future__ import annotations

import random
import re
import tomllib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from batchd.daemon.emulator import EmulatorThread
from batchd.daemon.wal.manifest import MANIFEST_NAME
from examples.tickets.generate import DETAILS, SUBJECTS
from tests.fixtures.emulator import SEED
from tests.fixtures.engine import LABELS, RULES_PATH, Workspace, dump_toml, predict_fates
from tests.fixtures.kafka import consume_all, create_topic, produce_json, unique_name

TICKETS = 10_000
PARTITIONS = 3
MAX_REQUESTS = 1000
MAX_ATTEMPTS = 3
INVALID_ONLY: dict[str, float] = {"invalid_request": 0.02}
WITH_RETRIES: dict[str, float] = {"invalid_request": 0.02, "api_error": 0.03}

EmulatorFactory = Callable[..., EmulatorThread]
_RULES = tomllib.loads(RULES_PATH.read_text())
_COMPILED = [(re.compile(rule["pattern"]), rule["reply"]) for rule in _RULES["rules"]]


# -- input and oracle -------------------------------------------------------------


def make_tickets(count: int, seed: int = 7) -> dict[str, str]:
    """``count`` tickets, key → body, with bodies from the demo generator."""
    rng = random.Random(seed)
    labels = list(SUBJECTS)
    return {
        f"K{n:05d}": f"{rng.choice(SUBJECTS[rng.choice(labels)])}. {rng.choice(DETAILS)}".strip()
        for n in range(count)
    }


def rule_label(body: str) -> str:
    """The label the emulator's demo rules give ``body`` (first matching pattern wins)."""
    return next((reply for pattern, reply in _COMPILED if pattern.search(body)), _RULES["default"])


def fates(keys: Iterable[str], faults: Mapping[str, float]) -> dict[str, list[str | None]]:
    """key → the inner error of each attempt the emulator will give it (None: success)."""
    return predict_fates(keys, faults, seed=SEED, max_attempts=MAX_ATTEMPTS)


# -- reading the broker -------------------------------------------------------------


@dataclass
class TopicContents:
    """Every message of a topic: values and positions per key, and each partition's end."""

    values: dict[str, list[bytes]] = field(default_factory=lambda: defaultdict(list))
    where: dict[str, tuple[int, int]] = field(default_factory=dict)  # key → (partition, offset)
    end: dict[int, int] = field(default_factory=dict)  # partition → last offset + 1

    def decoded(self) -> dict[str, dict[str, Any]]:
        """key → the last value, as JSON."""
        return {k: orjson.loads(v[-1]) for k, v in self.values.items()}


def read_topic(bootstrap: str, topic: str) -> TopicContents:
    """
    Read ``topic`` to its high watermark.

    The end offsets come from the messages themselves (last offset + 1, which
    is the high watermark of a topic without transactions): tansu's
    ``ListOffsets`` for the latest offset is inaccurate (docs/kafka.md).
    """

    async def go() -> TopicContents:
        out = TopicContents()
        async for message in consume_all(bootstrap, topic):
            key = message.key.decode() if message.key is not None else ""
            out.values[key].append(message.value)
            out.where[key] = (message.partition, message.offset)
            out.end[message.partition] = max(out.end.get(message.partition, 0),
                                             message.offset + 1)
        return out

    return anyio.run(go)


def committed_offsets(bootstrap: str, group: str, topic: str) -> dict[int, int | None]:
    """partition → the group's committed offset (None: nothing committed)."""

    async def go() -> dict[int, int | None]:
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group,
                                    enable_auto_commit=False)
        await consumer.start()
        try:
            await consumer.topics()
            partitions = sorted(consumer.partitions_for_topic(topic) or ())
            return {p: await consumer.committed(TopicPartition(topic, p)) for p in partitions}
        finally:
            await consumer.stop()

    return anyio.run(go)


# -- the workspace ------------------------------------------------------------------


class KafkaWorkspace(Workspace):
    """A `Workspace` whose pipeline reads one topic and writes two (results, dead letters)."""

    def __init__(self, root: Path, base_url: str, bootstrap: str) -> None:
        super().__init__(root, base_url)
        self.bootstrap = bootstrap
        self.input = unique_name("tickets")
        self.results = unique_name("labels")
        self.dead = unique_name("dead")
        self.group = unique_name("batchd")

    def env(self, crash_at: str | None = None, compact_bytes: int | None = None) -> dict[str, str]:
        env = super().env(crash_at, compact_bytes)
        env["KAFKA_BOOTSTRAP"] = self.bootstrap
        return env

    def create_topics(self) -> None:
        async def go() -> None:
            await create_topic(self.bootstrap, self.input, PARTITIONS)
            await create_topic(self.bootstrap, self.results, PARTITIONS)
            await create_topic(self.bootstrap, self.dead, 1)

        anyio.run(go)

    def produce(self, messages: Iterable[tuple[bytes, Any]]) -> None:
        """Send ``(key, value)`` pairs to the input topic; the keys spread them over partitions."""
        anyio.run(produce_json, self.bootstrap, self.input, list(messages))

    def write_kafka_config(self, *, max_in_flight: int = 4, session_timeout_ms: int = 2000) -> Path:
        """
        Kafka in, Kafka out. ``linger`` is long so chunks close only when full or
        when the source is drained: the root chunks are then exactly
        ``ceil(records / max_requests)``. A short session timeout lets a restart
        rejoin the group soon after the killed member's session expires.
        """
        client = {"type": "kafka", "bootstrap_servers": "env:KAFKA_BOOTSTRAP"}
        data = {
            "state_dir": "state",
            "api": {"poll_interval": "0.1s", "poll_jitter": 0.1},
            "pipeline": [{
                "name": "tickets",
                "max_attempts": MAX_ATTEMPTS,
                "custom_id": "t-{ticket_id}",
                "source": {**client, "topics": [self.input], "group_id": self.group,
                           "key_field": "ticket_id", "fields": ["ticket_id", "body"],
                           "drain_idle": 0.5, "poll_timeout_ms": 200,
                           "session_timeout_ms": session_timeout_ms,
                           "heartbeat_interval_ms": 300},
                "request": {"model": "claude-haiku-4-5", "max_tokens": 8, "user": "{body}"},
                "output": {"allowed": list(LABELS), "lowercase": True},
                "batching": {"max_requests": MAX_REQUESTS, "linger": "60s",
                             "max_in_flight": max_in_flight},
                "sink": [{**client, "topic": self.results,
                          "fields": ["key", "output", "status", "custom_id", "batch_id",
                                     "attempt"]}],
                "dead_letter": {**client, "topic": self.dead},
            }],
        }
        return self.write_raw(dump_toml(data))

    def committed(self) -> dict[int, int | None]:
        return committed_offsets(self.bootstrap, self.group, self.input)

    def manifest_records(self) -> Iterator[dict[str, Any]]:
        """Every manifest record, in order (``checksum SP json`` lines)."""
        with (self.state_dir / MANIFEST_NAME).open("rb") as f:
            for line in f:
                record: dict[str, Any] = orjson.loads(line.split(b" ", 1)[1])
                yield record

    def submissions(self) -> Counter[str]:
        """chunk id → how often the manifest recorded it submitted (root and retry chunks)."""
        return Counter(r["chunk"] for r in self.manifest_records() if r["kind"] == "submitted")


@pytest.fixture
def kafka_ws(tmp_path: Path, kafka_bootstrap: str) -> Callable[[str], KafkaWorkspace]:
    """``kafka_ws(base_url)``: a fresh `KafkaWorkspace` with its own topics and group."""

    def make(base_url: str) -> KafkaWorkspace:
        ws = KafkaWorkspace(tmp_path / "ws", base_url, kafka_bootstrap)
        ws.create_topics()
        return ws

    return make


def ticket_messages(tickets: Mapping[str, str]) -> list[tuple[bytes, Any]]:
    return [(k.encode(), {"ticket_id": k, "body": b}) for k, b in tickets.items()]


def start_emulator(
    factory: EmulatorFactory, faults: Mapping[str, float], latency: float = 0.0
) -> EmulatorThread:
    """An emulator answering with the demo rules, its faults switched on at runtime."""
    emulator = factory(rules=RULES_PATH, latency=latency)
    emulator.set_faults(**faults)
    return emulator


# -- checks ---------------------------------------------------------------------------


def assert_one_outcome_per_key(
    ws: KafkaWorkspace, tickets: Mapping[str, str], fate: Mapping[str, list[str | None]],
    extra_dead: Iterable[str] = (),
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """
    Results hold each surviving key with its rule label (copies of a key only as
    identical re-writes), the dead letters exactly the failed keys plus ``extra_dead``.
    """
    results = read_topic(ws.bootstrap, ws.results)
    dead = read_topic(ws.bootstrap, ws.dead)
    expected_dead = {k for k, f in fate.items() if f[-1] is not None}
    assert expected_dead, "the fault fraction should fail some tickets"
    for key, copies in results.values.items():
        assert len(set(copies)) == 1, f"{key}: differing copies {copies}"
    rows = results.decoded()
    labels = {k: v["output"] for k, v in rows.items()}
    assert len(labels) == len(tickets) - len(expected_dead)
    assert labels == {k: rule_label(b) for k, b in tickets.items() if k not in expected_dead}
    for key, row in rows.items():
        assert (row["key"], row["custom_id"], row["status"]) == (key, f"t-{key}", "succeeded")
        assert row["attempt"] == len(fate[key]), row
    for key, copies in dead.values.items():
        assert len(set(copies)) == 1, f"{key}: differing dead letters {copies}"
    dead_values = dead.decoded()
    assert set(dead_values) == expected_dead | set(extra_dead)
    source = read_topic(ws.bootstrap, ws.input).where
    for key in expected_dead:
        line = dead_values[key]
        assert line["error_type"] == fate[key][-1], line
        assert line["attempts"] == len(fate[key]), line
        assert (line["source"]["partition"], line["source"]["offset"]) == source[key], line
    return rows, dead_values


def assert_committed_to_end(ws: KafkaWorkspace) -> None:
    """The group's committed offset of every input partition is its end offset."""
    end = read_topic(ws.bootstrap, ws.input).end
    assert len(end) == PARTITIONS, end
    assert ws.committed() == end


def assert_sent_once(ws: KafkaWorkspace, emulator: EmulatorThread,
                     fate: Mapping[str, list[str | None]]) -> None:
    """Each request sent as often as its fate needs; one batch per chunk the manifest knows."""
    stats = emulator.stats()
    assert max(stats["received"].values()) <= MAX_ATTEMPTS
    assert stats["received"] == {f"t-{k}": len(f) for k, f in fate.items()}
    submitted = ws.submissions()
    assert set(submitted.values()) == {1}, submitted
    assert stats["batches_created"] == len(submitted)


# -- tests ----------------------------------------------------------------------------


class TestDrainedRun:
    def test_every_key_published_once_and_offsets_committed(
        self, emulator_factory: EmulatorFactory, kafka_ws: Callable[[str], KafkaWorkspace]
    ) -> None:
        """10k tickets on 3 partitions: a labelled result per key, failures dead, offsets at end."""
        emulator = start_emulator(emulator_factory, INVALID_ONLY)
        ws = kafka_ws(emulator.base_url)
        tickets = make_tickets(TICKETS)
        ws.produce(ticket_messages(tickets))
        ws.write_kafka_config()
        ws.run_ok()

        fate = fates(tickets, INVALID_ONLY)
        assert_one_outcome_per_key(ws, tickets, fate)
        assert_committed_to_end(ws)
        assert_sent_once(ws, emulator, fate)
        assert emulator.stats()["batches_created"] == TICKETS // MAX_REQUESTS


CRASHES = ("mid_results", "after_flush:2", "after_source_commit:2")


class TestKillNine:
    def test_restarts_after_sigkill_publish_every_key(
        self, emulator_factory: EmulatorFactory, kafka_ws: Callable[[str], KafkaWorkspace]
    ) -> None:
        """
        SIGKILLed at three crash points in turn, restarts end with one result per key.

        Duplicates of a key in the results topic are allowed only as identical
        re-writes (a replayed group publishes the same rows again); downstream
        dedupes by key. Each row names the attempt that succeeded, nothing is
        sent to the API more than its fate needs, no chunk is created twice,
        and the offsets end committed at the end.
        """
        emulator = start_emulator(emulator_factory, WITH_RETRIES)
        ws = kafka_ws(emulator.base_url)
        tickets = make_tickets(TICKETS, seed=8)
        ws.produce(ticket_messages(tickets))
        ws.write_kafka_config()
        fate = fates(tickets, WITH_RETRIES)
        assert {len(f) for f in fate.values() if f[-1] is None} == {1, 2, 3}, "retries needed"

        for point in CRASHES:
            ws.crash(point)  # asserts death by SIGKILL (returncode -9)
        created = emulator.stats()["batches_created"]
        ws.run_ok()

        copies = read_topic(ws.bootstrap, ws.results).values.values()
        assert max(map(len, copies)) > 1, "no replay was exercised"
        assert_one_outcome_per_key(ws, tickets, fate)
        assert_committed_to_end(ws)
        assert_sent_once(ws, emulator, fate)
        assert created < emulator.stats()["batches_created"], "the crashes came too late"


class TestBadMessages:
    def test_unusable_messages_are_dead_lettered_with_coordinates(
        self, emulator_factory: EmulatorFactory, kafka_ws: Callable[[str], KafkaWorkspace]
    ) -> None:
        """Non-JSON and key-less values go to the dead letters naming topic/partition/offset."""
        emulator = start_emulator(emulator_factory, INVALID_ONLY)
        ws = kafka_ws(emulator.base_url)
        tickets = make_tickets(600, seed=9)
        good = ticket_messages(tickets)
        bad: list[tuple[bytes, Any]] = [
            (b"bad-json", b'{"ticket_id": "X1", "body": '),
            (b"bad-key", {"body": "I was charged twice"}),
        ]
        # One in the middle of the stream, one at the very end of its partition.
        ws.produce([*good[:300], bad[0], *good[300:], bad[1]])
        ws.write_kafka_config()
        proc = ws.run_ok()

        where = read_topic(ws.bootstrap, ws.input).where
        expected = {f"{ws.input}-{p}-{o}": (p, o) for p, o in (where[k.decode()] for k, _ in bad)}
        _, dead = assert_one_outcome_per_key(
            ws, tickets, fates(tickets, INVALID_ONLY), extra_dead=expected
        )
        reasons = {"value is not JSON", "key field 'ticket_id' is missing"}
        for key, (partition, offset) in expected.items():
            line = dead[key]
            assert line["error_type"] == "bad_record", line
            assert line["source"]["topic"] == ws.input, line
            assert (line["source"]["partition"], line["source"]["offset"]) == (partition, offset)
            message = line["error_message"]
            assert f"topic {ws.input} partition {partition} offset {offset}" in message, line
            reasons -= {r for r in reasons if r in message}
        assert reasons == set(), f"reasons never given: {reasons}"
        assert_committed_to_end(ws)
        assert "results committed" in proc.stdout


class TestCommitBeforeAssignment:
    def test_chunks_recovered_on_restart_get_committed(
        self, emulator_factory: EmulatorFactory, kafka_ws: Callable[[str], KafkaWorkspace]
    ) -> None:
        """Killed with every chunk sealed, the restart that ends them commits their offsets."""
        # A batch takes 1 s, so all three chunks are sealed before the first ends; the
        # restart only recovers them. Whether they end before its consumer has joined
        # depends on the start-up order (and the killed member's 6 s session).
        emulator = start_emulator(emulator_factory, INVALID_ONLY, latency=1.0)
        ws = kafka_ws(emulator.base_url)
        tickets = make_tickets(3 * MAX_REQUESTS, seed=10)
        ws.produce(ticket_messages(tickets))
        ws.write_kafka_config(max_in_flight=4, session_timeout_ms=6000)
        ws.crash("after_source_commit:1")
        restart = ws.run_ok()

        assert "chunk sealed" not in restart.stdout, "every chunk should be sealed before the kill"
        assert_one_outcome_per_key(ws, tickets, fates(tickets, INVALID_ONLY))
        # A position that arrives before the restarted consumer is assigned its partitions
        # waits in KafkaSource and is committed on assignment, never dropped.
        assert ws.committed() == read_topic(ws.bootstrap, ws.input).end
