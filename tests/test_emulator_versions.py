"""API versions and credentials: each batch is judged by the version it was created with."""

from __future__ import annotations

from typing import Any

import anthropic
import httpx2
import pytest

from batchd.daemon.emulator import EmulatorThread
from tests.fixtures.emulator import ended_results, old_api_client, sdk_client

_BATCHES = "/v1/messages/batches"


def _row(custom_id: str, **params: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "claude-haiku-4-5",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": "hello"}],
    }
    body.update(params)
    return {"custom_id": custom_id, "params": body}


def _error(result: dict[str, Any]) -> tuple[str, str]:
    assert result["type"] == "errored", result
    error = result["error"]["error"]
    return error["type"], error["message"]


class TestHeaders:
    def test_missing_version_is_400(self, emulator: EmulatorThread) -> None:
        """A call without anthropic-version is refused as the API refuses it."""
        client = sdk_client(emulator.base_url)
        with pytest.raises(anthropic.BadRequestError) as caught:
            client.messages.batches.list(extra_headers={"anthropic-version": anthropic.omit})
        assert caught.value.api_message == "anthropic-version: header is required"

    def test_unknown_version_is_400_naming_it(self, emulator: EmulatorThread) -> None:
        client = sdk_client(emulator.base_url, default_headers={"anthropic-version": "2024-13-01"})
        with pytest.raises(anthropic.BadRequestError) as caught:
            client.messages.batches.list()
        assert caught.value.api_message is not None
        assert "'2024-13-01'" in caught.value.api_message
        assert emulator.stats()["http_errors"] == {"400:invalid_request_error": 1}

    def test_bearer_and_x_api_key_both_work(self, emulator: EmulatorThread) -> None:
        """SDK 2.x sends Authorization: Bearer; older clients send X-Api-Key."""
        client = sdk_client(emulator.base_url)
        client.messages.batches.list()
        raw = httpx2.get(
            f"{emulator.base_url}{_BATCHES}",
            headers={"x-api-key": "k", "anthropic-version": "2023-06-01"},
        )
        assert raw.status_code == 200
        stats = emulator.stats()
        assert stats["auth_schemes"] == {"bearer": 1, "x-api-key": 1}
        assert stats["api_versions"] == {"2026-10-21": 1, "2023-06-01": 1}

    @pytest.mark.parametrize(
        "headers",
        [{}, {"authorization": "Basic abc"}, {"authorization": "Bearer"}, {"x-api-key": ""}],
    )
    def test_missing_or_malformed_key_is_401(
        self, emulator: EmulatorThread, headers: dict[str, str]
    ) -> None:
        raw = httpx2.get(
            f"{emulator.base_url}{_BATCHES}", headers={"anthropic-version": "2026-10-21", **headers}
        )
        assert raw.status_code == 401
        assert raw.json()["error"]["type"] == "authentication_error"


class TestVersion20261021:
    @pytest.mark.parametrize(
        ("field", "value"), [("temperature", 1.0), ("temperature", 0), ("top_p", 1.0), ("top_k", 5)]
    )
    def test_sampling_params_error_even_at_defaults(
        self, emulator: EmulatorThread, field: str, value: float
    ) -> None:
        """The row errors naming the field; the rest of the batch is unaffected."""
        rows = [_row("bad", **{field: value}), _row("good")]
        results = ended_results(sdk_client(emulator.base_url), rows)
        error_type, message = _error(results["bad"])
        assert error_type == "invalid_request_error"
        assert message.startswith(f"{field}:") and "2026-10-21" in message
        assert results["good"]["type"] == "succeeded"

    def test_document_in_assistant_turn_errors(self, emulator: EmulatorThread) -> None:
        document = {"type": "document", "source": {"type": "text", "media_type": "text/plain",
                                                    "data": "x"}}  # fmt: skip
        messages = [
            {"role": "user", "content": "summarise"},
            {"role": "assistant", "content": [document]},
            {"role": "user", "content": "again"},
        ]
        results = ended_results(sdk_client(emulator.base_url), [_row("d", messages=messages)])
        assert "messages.1.content.0" in _error(results["d"])[1]

    def test_citations_on_user_text_error_only_when_non_empty(
        self, emulator: EmulatorThread
    ) -> None:
        cited = {"type": "char_location", "cited_text": "x", "document_index": 0,
                 "document_title": None, "start_char_index": 0, "end_char_index": 1}  # fmt: skip
        rows = [
            _row("cited", messages=[{"role": "user", "content": [
                {"type": "text", "text": "hi", "citations": [cited]}]}]),
            _row("empty", messages=[{"role": "user", "content": [
                {"type": "text", "text": "hi", "citations": []}]}]),
        ]  # fmt: skip
        results = ended_results(sdk_client(emulator.base_url), rows)
        assert "citations" in _error(results["cited"])[1]
        assert results["empty"]["type"] == "succeeded"

    def test_output_format_is_an_unknown_field(self, emulator: EmulatorThread) -> None:
        """The engine's old top-level output_format: 'Extra inputs are not permitted'."""
        fmt = {"type": "json_schema", "schema": {"type": "object"}}
        results = ended_results(sdk_client(emulator.base_url), [_row("f", output_format=fmt)])
        assert _error(results["f"]) == (
            "invalid_request_error", "output_format: Extra inputs are not permitted"
        )


class TestVersion20230601:
    @pytest.mark.parametrize(
        ("model", "params", "ok"),
        [
            # <= 4.6: sampling is free without thinking, limited with it.
            ("claude-haiku-4-5", {"temperature": 0.2}, True),
            ("claude-haiku-4-5", {"top_k": 5, "top_p": 0.5}, True),
            ("claude-haiku-4-5", {"temperature": 0.2, "thinking": {"type": "enabled",
                                                                   "budget_tokens": 1024}}, False),
            ("claude-haiku-4-5", {"temperature": 1, "thinking": {"type": "enabled",
                                                                 "budget_tokens": 1024}}, True),
            ("claude-sonnet-4-6", {"top_p": 0.9, "thinking": {"type": "adaptive"}}, False),
            ("claude-sonnet-4-6", {"top_p": 0.95, "thinking": {"type": "adaptive"}}, True),
            ("claude-sonnet-4-6", {"top_k": 1, "thinking": {"type": "adaptive"}}, False),
            # 4.7+ and 5.x: only the default value passes, never temperature with top_p.
            ("claude-opus-4-8", {"temperature": 1}, True),
            ("claude-opus-4-8", {"temperature": 0.5}, False),
            ("claude-opus-5-5", {"temperature": 1, "top_p": 1}, False),
            ("claude-sonnet-5", {"top_k": 10}, False),
            ("claude-haiku-5-5", {"temperature": 2}, False),
        ],
    )  # fmt: skip
    def test_sampling_is_judged_per_model(
        self, emulator: EmulatorThread, model: str, params: dict[str, Any], ok: bool
    ) -> None:
        rows = [_row("r", model=model, max_tokens=4096, **params)]
        result = ended_results(old_api_client(emulator.base_url), rows)["r"]
        if ok:
            assert result["type"] == "succeeded", result
        else:
            error_type, message = _error(result)
            assert error_type == "invalid_request_error"
            assert any(name in message for name in params if name != "thinking"), message

    def test_old_version_keeps_documents_citations_and_output_format(
        self, emulator: EmulatorThread
    ) -> None:
        """What 2026-10-21 rejects still passes under 2023-06-01 (output_format: a choice)."""
        schema = {"type": "object", "properties": {"label": {"type": "string"}},
                  "required": ["label"], "additionalProperties": False}  # fmt: skip
        rows = [
            _row("f", output_format={"type": "json_schema", "schema": schema}),
            _row("c", messages=[{"role": "user", "content": [{"type": "text", "text": "hi",
                 "citations": [{"type": "char_location", "cited_text": "x", "document_index": 0,
                                "start_char_index": 0, "end_char_index": 1}]}]}]),
        ]  # fmt: skip
        results = ended_results(old_api_client(emulator.base_url), rows)
        assert results["c"]["type"] == "succeeded"
        message = results["f"]["message"]
        assert '"label"' in message["content"][0]["text"]


class TestBatchKeepsItsVersion:
    def test_both_versions_at_once(self, emulator_factory: Any) -> None:
        """Two batches with the same rows, in flight together, each judged by its own version."""
        emulator = emulator_factory(latency=60.0)
        new, old = sdk_client(emulator.base_url), old_api_client(emulator.base_url)
        rows = [_row("t", temperature=0.5), _row("plain")]
        new_batch = new.messages.batches.create(requests=rows)
        old_batch = old.messages.batches.create(requests=rows)
        emulator.advance_clock(60)
        # Read each batch with the *other* client: the create version decides.
        new_counts = old.messages.batches.retrieve(new_batch.id).request_counts
        old_counts = new.messages.batches.retrieve(old_batch.id).request_counts
        assert (new_counts.errored, new_counts.succeeded) == (1, 1)
        assert (old_counts.errored, old_counts.succeeded) == (0, 2)
