"""Time in the emulator: expiry, retention, the queue limit, the clock and the admin API."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta

import anthropic
import httpx2
import pytest

from batchd.daemon.emulator import EmulatorThread
from batchd.daemon.emulator.schedule import FINISH_STEPS, finish_step
from tests.fixtures.emulator import SEED, message_requests, sdk_client


class TestExpiry:
    def test_batch_slower_than_ttl_expires_at_ttl(
        self, emulator_factory: Callable[..., EmulatorThread]
    ) -> None:
        """A batch slower than its TTL ends at expires_at; only its unfinished requests expire."""
        emulator = emulator_factory(latency=48 * 3600.0)
        client = sdk_client(emulator.base_url)
        batch = client.messages.batches.create(requests=message_requests(200))
        emulator.advance_clock(23 * 3600)
        running = client.messages.batches.retrieve(batch.id)
        assert running.processing_status == "in_progress"
        assert running.request_counts.processing == 200
        emulator.advance_clock(3600)
        ended = client.messages.batches.retrieve(batch.id)
        assert ended.processing_status == "ended"
        assert ended.ended_at == ended.expires_at
        counts = ended.request_counts
        assert counts.succeeded + counts.expired == 200
        assert 60 < counts.expired < 140  # half the latency had passed
        types = [line.result.type for line in client.messages.batches.results(batch.id)]
        assert types.count("expired") == counts.expired

    def test_custom_ttl(self, emulator_factory: Callable[..., EmulatorThread]) -> None:
        """``ttl`` sets expires_at."""
        emulator = emulator_factory(ttl=3600.0)
        batch = sdk_client(emulator.base_url).messages.batches.create(requests=message_requests(1))
        assert batch.expires_at - batch.created_at == timedelta(hours=1)

    def test_canceling_is_seen_for_the_latency(
        self, emulator_factory: Callable[..., EmulatorThread]
    ) -> None:
        """With a short latency, canceling lasts about that long in real time, then ends."""
        emulator = emulator_factory(latency=0.4)
        client = sdk_client(emulator.base_url)
        batch = client.messages.batches.create(requests=message_requests(50))
        client.messages.batches.cancel(batch.id)
        assert client.messages.batches.retrieve(batch.id).processing_status == "canceling"
        time.sleep(0.45)
        ended = client.messages.batches.retrieve(batch.id)
        counts = ended.request_counts
        assert ended.processing_status == "ended"
        assert counts.canceled + counts.succeeded == 50 and counts.canceled > 0
        assert ended.cancel_initiated_at is not None and ended.ended_at is not None
        assert ended.ended_at > ended.cancel_initiated_at


class TestPartialEnds:
    """Requests finish over the latency: a cancel or the TTL only hits the unfinished ones."""

    def test_cancel_midway_keeps_finished_results(
        self, emulator_factory: Callable[..., EmulatorThread]
    ) -> None:
        emulator = emulator_factory(latency=10_000.0)
        client = sdk_client(emulator.base_url)
        emulator.set_faults(invalid_request=0.2)
        batch = client.messages.batches.create(requests=message_requests(300))
        emulator.advance_clock(4000)  # 40% of the latency (a step is 39 s: real time is noise)
        running = client.messages.batches.retrieve(batch.id)
        assert running.request_counts.processing == 300  # counts stay put until the end
        canceling = client.messages.batches.cancel(batch.id)
        assert canceling.processing_status == "canceling"
        assert canceling.request_counts.processing == 300
        emulator.advance_clock(1)
        ended = client.messages.batches.retrieve(batch.id)
        counts = ended.request_counts
        # Exactly the requests whose finish step lies before the cancel keep their result.
        done_steps = int(0.4 * FINISH_STEPS)
        finished = {f"r{i}" for i in range(300) if finish_step(SEED, f"r{i}") < done_steps}
        assert 80 < len(finished) < 160
        results = {line.custom_id: line.result.type
                   for line in client.messages.batches.results(batch.id)}  # fmt: skip
        assert {k for k, kind in results.items() if kind != "canceled"} == finished
        assert counts.canceled == 300 - len(finished)
        assert counts.succeeded + counts.errored == len(finished) and counts.errored > 0
        assert counts.processing == 0

    def test_expiry_midway_expires_only_the_unfinished(
        self, emulator_factory: Callable[..., EmulatorThread]
    ) -> None:
        emulator = emulator_factory(latency=40 * 3600.0, ttl=10 * 3600.0)
        client = sdk_client(emulator.base_url)
        batch = client.messages.batches.create(requests=message_requests(200))
        emulator.advance_clock(10 * 3600)
        ended = client.messages.batches.retrieve(batch.id)
        assert ended.processing_status == "ended" and ended.ended_at == ended.expires_at
        finished = {f"r{i}" for i in range(200)
                    if finish_step(SEED, f"r{i}") < FINISH_STEPS // 4}  # fmt: skip
        results = {line.custom_id: line.result.type
                   for line in client.messages.batches.results(batch.id)}  # fmt: skip
        assert {k for k, kind in results.items() if kind == "succeeded"} == finished
        assert ended.request_counts.expired == 200 - len(finished) > 0

    def test_queue_counts_only_unfinished_requests(
        self, emulator_factory: Callable[..., EmulatorThread]
    ) -> None:
        """Half-way through a batch, half its requests have left the processing queue."""
        emulator = emulator_factory(latency=1000.0, queue_limit=250)
        client = sdk_client(emulator.base_url)
        client.messages.batches.create(requests=message_requests(200))
        with pytest.raises(anthropic.RateLimitError):
            client.messages.batches.create(requests=message_requests(100, prefix="q"))
        emulator.advance_clock(600)
        left = emulator.stats()["in_progress_requests"]
        assert 50 < left < 120
        client.messages.batches.create(requests=message_requests(100, prefix="q"))
        stats = emulator.stats()
        assert stats["in_progress_requests"] == left + 100
        assert stats["peak_in_progress_requests"] == max(200, left + 100)

    def test_cache_reads_follow_finish_order(
        self, emulator_factory: Callable[..., EmulatorThread]
    ) -> None:
        """Requests are cached at their own finish time: a later batch reads the earlier write."""
        emulator = emulator_factory(latency=100.0)
        client = sdk_client(emulator.base_url)
        marker = {"type": "ephemeral"}
        system = [{"type": "text", "text": "Rules. " * 3000, "cache_control": marker}]
        client.messages.batches.create(requests=message_requests(1, prefix="w", system=system))
        emulator.advance_clock(100)
        client.messages.batches.list()
        second = client.messages.batches.create(
            requests=message_requests(1, prefix="x", system=system)
        )
        emulator.advance_clock(100)
        (line,) = list(client.messages.batches.results(second.id))
        assert line.result.type == "succeeded"
        assert line.result.message.usage.cache_read_input_tokens > 0


class TestRetention:
    def test_results_archived_after_29_days(self, emulator: EmulatorThread) -> None:
        """After created_at + 29 d the batch has archived_at and its results are 404."""
        client = sdk_client(emulator.base_url)
        batch = client.messages.batches.create(requests=message_requests(2))
        assert client.messages.batches.retrieve(batch.id).archived_at is None
        emulator.advance_clock(28 * 86400)
        assert len(list(client.messages.batches.results(batch.id))) == 2
        emulator.advance_clock(86400)
        archived = client.messages.batches.retrieve(batch.id)
        assert archived.archived_at == archived.created_at + timedelta(days=29)
        with pytest.raises(anthropic.NotFoundError) as caught:
            client.get(f"/v1/messages/batches/{batch.id}/results", cast_to=httpx2.Response)
        assert caught.value.response.json()["error"]["type"] == "not_found_error"

    def test_retention_is_a_runtime_setting(self, emulator: EmulatorThread) -> None:
        """``retention_days`` set at runtime applies to batches already made."""
        client = sdk_client(emulator.base_url)
        batch = client.messages.batches.create(requests=message_requests(1))
        client.messages.batches.retrieve(batch.id)
        emulator.set_faults(retention_days=1)
        emulator.advance_clock(86400)
        assert client.messages.batches.retrieve(batch.id).archived_at is not None


class TestQueueLimit:
    def test_create_over_queue_limit_is_429(
        self, emulator_factory: Callable[..., EmulatorThread]
    ) -> None:
        """Requests in progress plus the new batch over the limit: 429 with retry-after."""
        emulator = emulator_factory(latency=60.0, queue_limit=5)
        client = sdk_client(emulator.base_url)
        client.messages.batches.create(requests=message_requests(3))
        with pytest.raises(anthropic.RateLimitError) as caught:
            client.messages.batches.create(requests=message_requests(3, prefix="q"))
        assert caught.value.response.headers["retry-after"] == "1"
        assert caught.value.response.json()["error"]["type"] == "rate_limit_error"
        assert emulator.stats()["received"].get("q0") is None
        emulator.advance_clock(60)
        client.messages.batches.create(requests=message_requests(3, prefix="q"))
        assert emulator.stats()["faults_injected"] == {"queue_limit": 1}


class TestAdmin:
    def test_clock_and_faults_over_http(
        self, emulator_factory: Callable[..., EmulatorThread]
    ) -> None:
        """POST /_emulator/clock advances time; POST/GET /_emulator/faults set and show faults."""
        emulator = emulator_factory(latency=100.0)
        client = sdk_client(emulator.base_url)
        batch = client.messages.batches.create(requests=message_requests(1))
        clock = client.post(
            "/_emulator/clock", cast_to=httpx2.Response, body={"advance_seconds": 100}
        ).json()
        assert clock["offset_seconds"] == 100
        assert client.messages.batches.retrieve(batch.id).processing_status == "ended"
        client.post("/_emulator/faults", cast_to=httpx2.Response, body={"expired": 0.25})
        shown = client.get("/_emulator/faults", cast_to=httpx2.Response).json()
        assert shown["expired"] == 0.25 and shown["retry_after"] == 1.0

    def test_stats_and_reset(self, emulator: EmulatorThread) -> None:
        """Stats count batches, requests per custom_id and HTTP calls; reset forgets them."""
        client = sdk_client(emulator.base_url)
        client.messages.batches.create(requests=message_requests(2))
        client.messages.batches.list()
        stats = client.get("/_emulator/stats", cast_to=httpx2.Response).json()
        assert stats["batches_created"] == 1 and stats["requests_received"] == 2
        assert stats["received"] == {"r0": 1, "r1": 1}
        assert stats["http_requests"]["POST /v1/messages/batches"] == 1
        assert stats["http_requests"]["GET /v1/messages/batches"] == 1
        client.post("/_emulator/reset", cast_to=httpx2.Response)
        assert client.messages.batches.list().data == []
        after = emulator.stats()
        assert after["batches_created"] == 0 and after["received"] == {}
