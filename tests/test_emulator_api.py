"""The emulator's endpoints, driven through the real anthropic SDK over HTTP."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import anthropic
import orjson
import pytest
from anthropic.types import Message, TextBlock

from batchd.daemon.emulator import EmulatorConfig, EmulatorThread, run_emulator
from tests.fixtures.emulator import message_requests, sdk_client


def _text(message: Message) -> str:
    """The text of a reply's single text block."""
    block = message.content[0]
    assert isinstance(block, TextBlock)
    return block.text


class TestCreateAndRetrieve:
    def test_create_returns_in_progress_batch(self, emulator: EmulatorThread) -> None:
        """A new batch is in_progress with every request processing and a 24 h expiry."""
        batch = sdk_client(emulator.base_url).messages.batches.create(requests=message_requests(3))
        assert batch.id.startswith("msgbatch_")
        assert batch.type == "message_batch"
        assert batch.processing_status == "in_progress"
        assert batch.request_counts.processing == 3
        assert batch.request_counts.succeeded == 0
        assert batch.expires_at - batch.created_at == timedelta(hours=24)
        assert batch.results_url is None and batch.ended_at is None

    def test_latency_zero_ends_at_first_read(self, emulator: EmulatorThread) -> None:
        """With latency 0 the first retrieve sees the batch ended with terminal counts."""
        client = sdk_client(emulator.base_url)
        created = client.messages.batches.create(requests=message_requests(4))
        batch = client.messages.batches.retrieve(created.id)
        assert batch.processing_status == "ended"
        assert batch.request_counts.succeeded == 4
        assert batch.request_counts.processing == 0
        assert batch.ended_at is not None
        assert batch.results_url == f"{emulator.base_url}/v1/messages/batches/{batch.id}/results"

    def test_latency_keeps_batch_in_progress(
        self, emulator_factory: Callable[..., EmulatorThread]
    ) -> None:
        """A batch with latency stays in_progress, all processing, until the latency has passed."""
        emulator = emulator_factory(latency=3600.0)
        client = sdk_client(emulator.base_url)
        created = client.messages.batches.create(requests=message_requests(2))
        assert client.messages.batches.retrieve(created.id).processing_status == "in_progress"
        emulator.advance_clock(3600)
        batch = client.messages.batches.retrieve(created.id)
        assert batch.processing_status == "ended"
        assert batch.request_counts.succeeded == 2

    def test_every_response_has_request_id(self, emulator: EmulatorThread) -> None:
        """Successes and errors alike carry a request-id header."""
        client = sdk_client(emulator.base_url)
        raw = client.messages.batches.with_raw_response.create(requests=message_requests(1))
        assert raw.headers["request-id"].startswith("req_")
        with pytest.raises(anthropic.NotFoundError) as caught:
            client.messages.batches.retrieve("msgbatch_missing")
        assert caught.value.response.headers["request-id"] == caught.value.body["request_id"]  # type: ignore[index]


class TestResults:
    def test_one_line_per_request_not_in_request_order(self, emulator: EmulatorThread) -> None:
        """Every custom_id comes back exactly once, and not in the order sent."""
        client = sdk_client(emulator.base_url)
        batch = client.messages.batches.create(requests=message_requests(50))
        client.messages.batches.retrieve(batch.id)
        ids = [line.custom_id for line in client.messages.batches.results(batch.id)]
        assert sorted(ids) == sorted(f"r{i}" for i in range(50))
        assert ids != [f"r{i}" for i in range(50)]

    def test_succeeded_message_has_api_shape(self, emulator: EmulatorThread) -> None:
        """A succeeded line carries a full assistant message with usage and stop fields."""
        client = sdk_client(emulator.base_url)
        requests = message_requests(1, model="claude-sonnet-4-6")
        batch = client.messages.batches.create(requests=requests)
        client.messages.batches.retrieve(batch.id)
        (line,) = list(client.messages.batches.results(batch.id))
        assert line.result.type == "succeeded"
        message = line.result.message
        assert message.id.startswith("msg_") and message.type == "message"
        assert message.role == "assistant" and message.model == "claude-sonnet-4-6"
        assert "printer is on fire" in _text(message)
        assert message.stop_reason == "end_turn" and message.stop_sequence is None
        assert message.stop_details is None and message.container is None
        usage = message.usage
        text = "ticket 0: printer is on fire"
        assert usage.input_tokens == -(-len(text) // 4)
        assert usage.output_tokens == -(-len(_text(message)) // 4)
        assert usage.cache_creation_input_tokens == 0 and usage.cache_read_input_tokens == 0
        assert usage.output_tokens_details is not None
        assert usage.output_tokens_details.thinking_tokens == 0
        assert usage.service_tier == "batch"
        unset = [name for name in type(usage).model_fields if getattr(usage, name) is None]
        assert unset == [], f"every Usage field is sent: {unset}"

    def test_max_tokens_truncates_reply(self, emulator: EmulatorThread) -> None:
        """A reply longer than max_tokens is cut to it with stop_reason max_tokens."""
        client = sdk_client(emulator.base_url)
        batch = client.messages.batches.create(requests=message_requests(1, max_tokens=2))
        client.messages.batches.retrieve(batch.id)
        (line,) = list(client.messages.batches.results(batch.id))
        assert line.result.type == "succeeded"
        assert line.result.message.stop_reason == "max_tokens"
        assert line.result.message.usage.output_tokens == 2
        assert len(_text(line.result.message)) <= 8

    def test_content_blocks_and_system_count_as_input(self, emulator: EmulatorThread) -> None:
        """Block content is read for the reply and system text adds to input tokens."""
        client = sdk_client(emulator.base_url)
        messages = [{"role": "user", "content": [{"type": "text", "text": "x" * 40}]}]
        requests = message_requests(1, messages=messages, system="s" * 40)
        batch = client.messages.batches.create(requests=requests)
        client.messages.batches.retrieve(batch.id)
        (line,) = list(client.messages.batches.results(batch.id))
        assert line.result.type == "succeeded"
        assert line.result.message.usage.input_tokens == 20
        assert "xxxx" in _text(line.result.message)

    @pytest.mark.parametrize("suffix", [".toml", ".json"])
    def test_rules_file_picks_reply(
        self, emulator_factory: Callable[..., EmulatorThread], tmp_path: Path, suffix: str
    ) -> None:
        """The first matching rule gives the reply; no match falls back to the default."""
        rules = tmp_path / f"rules{suffix}"
        if suffix == ".toml":
            rules.write_text(
                'default = "other"\n'
                '[[rules]]\npattern = "(?i)fire"\nreply = "urgent"\n'
                '[[rules]]\npattern = "printer"\nreply = "hardware"\n'
            )
        else:
            rules.write_text(
                json.dumps(
                    {
                        "default": "other",
                        "rules": [
                            {"pattern": "(?i)fire", "reply": "urgent"},
                            {"pattern": "printer", "reply": "hardware"},
                        ],
                    }
                )
            )
        emulator = emulator_factory(rules=rules)
        client = sdk_client(emulator.base_url)
        texts = {"a": "FIRE in the printer", "b": "printer jam", "c": "hello"}
        requests: list[Any] = [
            {
                "custom_id": key,
                "params": {
                    "model": "claude-haiku-4-5",
                    "max_tokens": 10,
                    "messages": [{"role": "user", "content": text}],
                },
            }
            for key, text in texts.items()
        ]
        batch = client.messages.batches.create(requests=requests)
        client.messages.batches.retrieve(batch.id)
        replies = {
            line.custom_id: _text(line.result.message)  # type: ignore[union-attr]
            for line in client.messages.batches.results(batch.id)
        }
        assert replies == {"a": "urgent", "b": "hardware", "c": "other"}

    def test_raw_stream_parses_with_orjson(self, emulator: EmulatorThread) -> None:
        """The streamed JSONL body parses line by line with orjson."""
        client = sdk_client(emulator.base_url)
        batch = client.messages.batches.create(requests=message_requests(30))
        client.messages.batches.retrieve(batch.id)
        with client.messages.batches.with_streaming_response.results(batch.id) as response:
            lines = [orjson.loads(line) for line in response.iter_lines() if line]
        assert len(lines) == 30
        assert all(line["result"]["type"] == "succeeded" for line in lines)

    @pytest.mark.anyio
    async def test_async_client_reads_results(self, emulator: EmulatorThread) -> None:
        """AsyncAnthropic creates, retrieves and streams results the same way."""
        client = anthropic.AsyncAnthropic(
            base_url=emulator.base_url, api_key="test", _strict_response_validation=True
        )
        batch = await client.messages.batches.create(requests=message_requests(5))
        assert (await client.messages.batches.retrieve(batch.id)).processing_status == "ended"
        ids = [line.custom_id async for line in await client.messages.batches.results(batch.id)]
        assert sorted(ids) == [f"r{i}" for i in range(5)]
        await client.close()


class TestList:
    def _create(self, emulator: EmulatorThread, count: int) -> list[str]:
        client = sdk_client(emulator.base_url)
        return [
            client.messages.batches.create(requests=message_requests(1, prefix=f"b{i}x")).id
            for i in range(count)
        ]

    def test_pages_newest_first_with_cursors(self, emulator: EmulatorThread) -> None:
        """after_id pages to older batches, before_id back to newer, with has_more and ids."""
        created = self._create(emulator, 25)
        newest_first = created[::-1]
        batches = sdk_client(emulator.base_url).messages.batches
        first = batches.list(limit=10)
        assert [b.id for b in first.data] == newest_first[:10]
        assert first.has_more and first.first_id == newest_first[0]
        assert first.last_id == newest_first[9]
        assert first.last_id is not None
        second = batches.list(limit=10, after_id=first.last_id)
        assert [b.id for b in second.data] == newest_first[10:20] and second.has_more
        assert second.last_id is not None
        third = batches.list(limit=10, after_id=second.last_id)
        assert [b.id for b in third.data] == newest_first[20:] and not third.has_more
        assert third.first_id is not None
        back = batches.list(limit=10, before_id=third.first_id)
        assert [b.id for b in back.data] == newest_first[10:20] and back.has_more
        top = batches.list(limit=10, before_id=newest_first[5])
        assert [b.id for b in top.data] == newest_first[:5] and not top.has_more
        assert batches.list().data == batches.list(limit=20).data

    def test_sdk_auto_paging_sees_every_batch(self, emulator: EmulatorThread) -> None:
        """Iterating the SDK's page object walks all pages, newest first."""
        created = self._create(emulator, 23)
        listed = [b.id for b in sdk_client(emulator.base_url).messages.batches.list(limit=7)]
        assert listed == created[::-1]

    @pytest.mark.anyio
    async def test_async_auto_paging(self, emulator: EmulatorThread) -> None:
        """AsyncAnthropic's paginator walks all pages too."""
        created = self._create(emulator, 12)
        client = anthropic.AsyncAnthropic(
            base_url=emulator.base_url, api_key="test", _strict_response_validation=True
        )
        listed = [b.id async for b in client.messages.batches.list(limit=5)]
        assert listed == created[::-1]
        await client.close()

    def test_empty_list(self, emulator: EmulatorThread) -> None:
        """No batches: an empty page with null cursors."""
        page = sdk_client(emulator.base_url).messages.batches.list()
        assert page.data == [] and page.has_more is False and page.first_id is None

    @pytest.mark.parametrize("limit", [0, 1001])
    def test_limit_out_of_range(self, emulator: EmulatorThread, limit: int) -> None:
        """A limit outside 1..1000 is a 400 invalid_request_error."""
        with pytest.raises(anthropic.BadRequestError) as caught:
            sdk_client(emulator.base_url).messages.batches.list(limit=limit)
        assert caught.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
        assert "limit" in caught.value.body["error"]["message"]  # type: ignore[index]


    def test_bad_cursors_are_400(self, emulator: EmulatorThread) -> None:
        """An unknown cursor id, or both cursors at once, is a 400 naming the parameter."""
        (only,) = self._create(emulator, 1)
        batches = sdk_client(emulator.base_url).messages.batches
        with pytest.raises(anthropic.BadRequestError, match="after_id"):
            batches.list(after_id="msgbatch_01unknown")
        with pytest.raises(anthropic.BadRequestError, match="before_id and after_id"):
            batches.list(after_id=only, before_id=only)


class TestCancelAndDelete:
    def test_cancel_before_latency_cancels_everything(
        self, emulator_factory: Callable[..., EmulatorThread]
    ) -> None:
        """Cancel shows canceling, then the batch ends with every request canceled."""
        emulator = emulator_factory(latency=3600.0)
        client = sdk_client(emulator.base_url)
        batch = client.messages.batches.create(requests=message_requests(6))
        canceling = client.messages.batches.cancel(batch.id)
        assert canceling.processing_status == "canceling"
        assert canceling.cancel_initiated_at is not None
        assert canceling.request_counts.processing == 6
        emulator.advance_clock(1.0)
        ended = client.messages.batches.retrieve(batch.id)
        assert ended.processing_status == "ended"
        assert ended.request_counts.canceled == 6 and ended.request_counts.processing == 0
        types = {line.result.type for line in client.messages.batches.results(batch.id)}
        assert types == {"canceled"}

    def test_cancel_with_zero_latency_ends_at_next_read(self, emulator: EmulatorThread) -> None:
        """With latency 0 a cancel right after create is canceling, and ended at the next read."""
        client = sdk_client(emulator.base_url)
        batch = client.messages.batches.create(requests=message_requests(2))
        assert client.messages.batches.cancel(batch.id).processing_status == "canceling"
        assert client.messages.batches.retrieve(batch.id).request_counts.canceled == 2

    def test_cancel_of_ended_batch_changes_nothing(self, emulator: EmulatorThread) -> None:
        """Cancelling a batch that has ended returns it unchanged."""
        client = sdk_client(emulator.base_url)
        batch = client.messages.batches.create(requests=message_requests(2))
        ended = client.messages.batches.retrieve(batch.id)
        after = client.messages.batches.cancel(batch.id)
        assert after.cancel_initiated_at is None and after.request_counts == ended.request_counts

    def test_delete_ended_batch(self, emulator: EmulatorThread) -> None:
        """An ended batch is deleted; afterwards it is 404 and gone from the list."""
        client = sdk_client(emulator.base_url)
        batch = client.messages.batches.create(requests=message_requests(2))
        client.messages.batches.retrieve(batch.id)
        deleted = client.messages.batches.delete(batch.id)
        assert deleted.id == batch.id and deleted.type == "message_batch_deleted"
        with pytest.raises(anthropic.NotFoundError):
            client.messages.batches.retrieve(batch.id)
        assert client.messages.batches.list().data == []

    def test_delete_running_batch_is_400(
        self, emulator_factory: Callable[..., EmulatorThread]
    ) -> None:
        """Deleting a batch still in progress is a 400 invalid_request_error."""
        emulator = emulator_factory(latency=60.0)
        client = sdk_client(emulator.base_url)
        batch = client.messages.batches.create(requests=message_requests(1))
        with pytest.raises(anthropic.BadRequestError) as caught:
            client.messages.batches.delete(batch.id)
        assert caught.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
        assert client.messages.batches.retrieve(batch.id).processing_status == "in_progress"


class TestInProcess:
    @pytest.mark.anyio
    async def test_run_emulator_in_the_callers_loop(self) -> None:
        """run_emulator serves inside an anyio/asyncio program and exposes its handle."""
        async with run_emulator(EmulatorConfig(seed=5)) as emulator:
            client = anthropic.AsyncAnthropic(
                base_url=emulator.base_url, api_key="test", _strict_response_validation=True
            )
            emulator.set_faults(expired=1.0)
            batch = await client.messages.batches.create(requests=message_requests(3))
            ended = await client.messages.batches.retrieve(batch.id)
            assert ended.request_counts.expired == 3
            stats = emulator.stats()
            assert stats["received"] == {"r0": 1, "r1": 1, "r2": 1}
            assert stats["http_requests"] == {
                "POST /v1/messages/batches": 1,
                "GET /v1/messages/batches/{batch_id}": 1,
            }
            await emulator.reset()
            assert emulator.stats()["batches_created"] == 0
            await client.close()
