"""Every fault the emulator injects, seen through the real SDK."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import anthropic
import httpx2
import orjson
import pytest

from batchd.daemon.emulator import EmulatorThread
from tests.fixtures.emulator import message_requests, sdk_client


def _ended_results(emulator: EmulatorThread, requests: Sequence[Any]) -> dict[str, Any]:
    """Create a batch, read it to its end and return ``{custom_id: result}``."""
    client = sdk_client(emulator.base_url)
    batch = client.messages.batches.create(requests=requests)
    assert client.messages.batches.retrieve(batch.id).processing_status == "ended"
    with client.messages.batches.with_streaming_response.results(batch.id) as response:
        lines = [orjson.loads(line) for line in response.iter_lines() if line]
    return {line["custom_id"]: line["result"] for line in lines}


class TestPerRequestFaults:
    @pytest.mark.parametrize(
        ("fault", "result_type", "error_type"),
        [
            ("api_error", "errored", "api_error"),
            ("overloaded_error", "errored", "overloaded_error"),
            ("invalid_request", "errored", "invalid_request_error"),
            ("expired", "expired", None),
        ],
    )
    def test_fault_kind_sets_result(
        self,
        emulator: EmulatorThread,
        fault: str,
        result_type: str,
        error_type: str | None,
    ) -> None:
        """A fraction of 1 gives every request that result, and the counts agree."""
        emulator.set_faults(**{fault: 1.0})
        results = _ended_results(emulator, message_requests(5))
        assert {r["type"] for r in results.values()} == {result_type}
        if error_type is not None:
            assert {r["error"]["error"]["type"] for r in results.values()} == {error_type}
        assert emulator.stats()["faults_injected"] == {fault: 5}

    def test_counts_match_results(self, emulator: EmulatorThread) -> None:
        """Mixed faults: request_counts equal the tally of result lines."""
        emulator.set_faults(api_error=0.2, expired=0.2, invalid_request=0.2)
        client = sdk_client(emulator.base_url)
        batch = client.messages.batches.create(requests=message_requests(200))
        counts = client.messages.batches.retrieve(batch.id).request_counts
        tally: dict[str, int] = {}
        for line in client.messages.batches.results(batch.id):
            tally[line.result.type] = tally.get(line.result.type, 0) + 1
        assert tally == {
            key: value
            for key, value in counts.model_dump().items()
            if value and key != "processing"
        }
        assert 0 < counts.succeeded < 200 and counts.errored > 0 and counts.expired > 0

    def test_faults_are_reproducible_and_retries_can_succeed(
        self, emulator_factory: Callable[..., EmulatorThread]
    ) -> None:
        """Same seed, same faults; a resent custom_id gets a fresh draw on its next attempt."""
        first, second = emulator_factory(), emulator_factory()
        for emulator in (first, second):
            emulator.set_faults(api_error=0.5)
        requests = message_requests(40)
        one = {k for k, r in _ended_results(first, requests).items() if r["type"] == "errored"}
        two = {k for k, r in _ended_results(second, requests).items() if r["type"] == "errored"}
        assert one == two and 0 < len(one) < 40
        retried = [r for r in requests if r["custom_id"] in one]
        again = _ended_results(first, retried)
        assert any(result["type"] == "succeeded" for result in again.values())
        received = first.stats()["received"]
        assert all(received[key] == 2 for key in one)
        assert all(received[r["custom_id"]] == 1 for r in requests if r["custom_id"] not in one)


class TestHttpFaults:
    @pytest.mark.parametrize(
        ("fault", "status", "error_type"),
        [
            ("http429", 429, "rate_limit_error"),
            ("http500", 500, "api_error"),
            ("http529", 529, "overloaded_error"),
        ],
    )
    def test_http_fault_answers_error(
        self, emulator: EmulatorThread, fault: str, status: int, error_type: str
    ) -> None:
        """The fault answers any /v1 call with its status and error type."""
        emulator.set_faults(**{fault: 1.0})
        with pytest.raises(anthropic.APIStatusError) as caught:
            sdk_client(emulator.base_url).messages.batches.list()
        assert caught.value.status_code == status
        assert caught.value.response.json()["error"]["type"] == error_type
        if status == 429:
            assert caught.value.response.headers["retry-after"] == "1"
        assert emulator.stats()["faults_injected"] == {fault: 1}

    def test_sdk_retries_through_429_honouring_retry_after(self, emulator: EmulatorThread) -> None:
        """With retries on, the SDK gets through a 50% 429 rate after short waits."""
        emulator.set_faults(http429=0.5, retry_after=0.05)
        client = sdk_client(emulator.base_url, max_retries=8)
        for _ in range(6):
            client.messages.batches.list()
        stats = emulator.stats()
        assert stats["faults_injected"]["http429"] > 0
        assert (
            stats["http_requests"]["GET /v1/messages/batches"]
            == 6 + stats["faults_injected"]["http429"]
        )

    def test_admin_endpoints_ignore_faults(self, emulator: EmulatorThread) -> None:
        """Faults on /v1 never block the admin endpoints (a test can always turn them off)."""
        emulator.set_faults(http500=1.0)
        client = sdk_client(emulator.base_url)
        current = client.get("/_emulator/faults", cast_to=httpx2.Response).json()
        assert current["http500"] == 1.0
        client.post("/_emulator/faults", cast_to=httpx2.Response, body={"http500": 0})
        assert client.messages.batches.list().data == []

    def test_slow_delays_responses(self, emulator: EmulatorThread) -> None:
        """``slow`` adds its delay to each /v1 response."""
        emulator.set_faults(slow="300ms")
        started = time.monotonic()
        sdk_client(emulator.base_url).messages.batches.list()
        assert time.monotonic() - started >= 0.3


class TestStreamAndCreateFaults:
    def test_cut_results_then_whole_stream(self, emulator: EmulatorThread) -> None:
        """The first fetches stop after N whole lines with a broken body; the next is complete."""
        emulator.set_faults(cut_results_after=3, cut_results_times=2)
        client = sdk_client(emulator.base_url)
        batch = client.messages.batches.create(requests=message_requests(20))
        client.messages.batches.retrieve(batch.id)
        for _ in range(2):
            got: list[str] = []
            with pytest.raises(httpx2.RemoteProtocolError):
                with client.messages.batches.with_streaming_response.results(batch.id) as resp:
                    for line in resp.iter_lines():
                        got.append(line)
            assert len(got) == 3 and all(orjson.loads(line)["custom_id"] for line in got)
        assert len(list(client.messages.batches.results(batch.id))) == 20
        assert emulator.stats()["faults_injected"]["cut_results"] == 2

    def test_drop_after_create_loses_the_answer_not_the_batch(
        self, emulator: EmulatorThread
    ) -> None:
        """The batch exists but the client hears nothing; only the next N creates are dropped."""
        emulator.set_faults(drop_after_create=1)
        client = sdk_client(emulator.base_url)
        with pytest.raises(anthropic.APIConnectionError):
            client.messages.batches.create(requests=message_requests(3))
        (orphan,) = client.messages.batches.list().data
        assert orphan.request_counts.succeeded + orphan.request_counts.processing == 3
        answered = client.messages.batches.create(requests=message_requests(3, prefix="n"))
        assert answered.id != orphan.id
        stats = emulator.stats()
        assert stats["batches_created"] == 2 and stats["faults_injected"]["drop_after_create"] == 1

    def test_drop_after_create_fraction_is_seeded(self, emulator: EmulatorThread) -> None:
        """A fraction drops some answers, reproducibly; every batch is still made."""
        emulator.set_faults(drop_after_create=0.5)
        client = sdk_client(emulator.base_url)
        dropped = []
        for index in range(12):
            try:
                client.messages.batches.create(requests=message_requests(1, prefix=f"d{index}x"))
            except anthropic.APIConnectionError:
                dropped.append(index)
        assert 0 < len(dropped) < 12
        stats = emulator.stats()
        assert stats["batches_created"] == 12
        assert stats["faults_injected"]["drop_after_create"] == len(dropped)

    def test_transient_404_after_create_and_after_end(
        self, emulator_factory: Callable[..., EmulatorThread]
    ) -> None:
        """Retrieve and results 404 for a window after create and after end, then work."""
        emulator = emulator_factory(latency=10.0)
        emulator.set_faults(transient_404_seconds=2)
        client = sdk_client(emulator.base_url)
        batch = client.messages.batches.create(requests=message_requests(2))
        with pytest.raises(anthropic.NotFoundError):
            client.messages.batches.retrieve(batch.id)
        assert [b.id for b in client.messages.batches.list().data] == [batch.id]
        emulator.advance_clock(3)
        assert client.messages.batches.retrieve(batch.id).processing_status == "in_progress"
        emulator.advance_clock(8)
        with pytest.raises(anthropic.NotFoundError):
            client.messages.batches.retrieve(batch.id)
        results_url = f"/v1/messages/batches/{batch.id}/results"
        with pytest.raises(anthropic.NotFoundError):
            client.get(results_url, cast_to=httpx2.Response)
        emulator.advance_clock(2)
        assert len(list(client.messages.batches.results(batch.id))) == 2
        assert emulator.stats()["faults_injected"]["transient_404"] == 3
