"""What the emulator rejects, and how: create-time 400/413, per-request errors, bad input."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import anthropic
import httpx2
import orjson
import pytest

from batchd.daemon.emulator import EmulatorThread
from tests.fixtures.emulator import message_requests, sdk_client

_BATCHES = "/v1/messages/batches"


def _error(exc: anthropic.APIStatusError) -> dict[str, Any]:
    """The API error object of a failed call, checked for the API's shape."""
    body = exc.response.json()
    assert body["type"] == "error"
    assert body["request_id"] == exc.response.headers["request-id"]
    assert set(body["error"]) == {"type", "message"}
    error: dict[str, Any] = body["error"]
    return error


def _post_raw(emulator: EmulatorThread, content: Any, **headers: str) -> httpx2.Response:
    client = sdk_client(emulator.base_url)
    return client.post(
        _BATCHES,
        cast_to=httpx2.Response,
        content=content,
        options={"headers": {"Content-Type": "application/json", **headers}},
    )


class TestCreateRejects:
    @pytest.mark.parametrize(
        ("requests", "needle"),
        [
            ([], "non-empty"),
            ([{"custom_id": "", "params": {}}], "requests.0.custom_id"),
            ([{"custom_id": "has space", "params": {}}], "'has space'"),
            ([{"custom_id": "x" * 65, "params": {}}], "requests.0.custom_id"),
            ([{"custom_id": "ok", "params": {}}, {"custom_id": "é", "params": {}}], "requests.1"),
            ([{"custom_id": 7, "params": {}}], "requests.0.custom_id"),
            ([{"params": {}}], "requests.0.custom_id: Field required"),
            ([{"custom_id": "a"}], "requests.0.params: Field required"),
            ([{"custom_id": "a", "params": []}], "requests.0.params"),
            (["not an object"], "requests.0"),
            (
                [{"custom_id": "a", "params": {}}, {"custom_id": "a", "params": {}}],
                "duplicate custom_id 'a'",
            ),
        ],
    )
    def test_invalid_requests_are_400(
        self, emulator: EmulatorThread, requests: list[Any], needle: str
    ) -> None:
        """Each create-time problem is a 400 invalid_request_error naming the request."""
        with pytest.raises(anthropic.BadRequestError) as caught:
            sdk_client(emulator.base_url).messages.batches.create(requests=requests)
        error = _error(caught.value)
        assert error["type"] == "invalid_request_error"
        assert needle in error["message"]
        assert emulator.stats()["batches_created"] == 0
        assert emulator.stats()["received"] == {}

    def test_more_than_100000_requests_is_400(self, emulator: EmulatorThread) -> None:
        """100,001 requests is one too many."""
        body = (
            b'{"requests":['
            + b",".join(b'{"custom_id":"c%d","params":{}}' % i for i in range(100_001))
            + b"]}"
        )
        with pytest.raises(anthropic.BadRequestError) as caught:
            _post_raw(emulator, body)
        assert "at most 100000" in _error(caught.value)["message"]

    @pytest.mark.parametrize(
        "body",
        [b'{"requests": [', b"not json", b'{"requests": [{"custom_id": "a",}]}', b"[1, 2]", b""],
    )
    def test_malformed_body_is_400(self, emulator: EmulatorThread, body: bytes) -> None:
        """Broken or wrongly shaped JSON is a 400 invalid_request_error, and the server lives on."""
        with pytest.raises(anthropic.BadRequestError) as caught:
            _post_raw(emulator, body)
        assert _error(caught.value)["type"] == "invalid_request_error"
        sdk_client(emulator.base_url).messages.batches.create(requests=message_requests(1))

    def test_wrong_content_type_is_400(self, emulator: EmulatorThread) -> None:
        """A body declared as text/plain is refused with the content type named."""
        body = orjson.dumps({"requests": message_requests(1)})
        with pytest.raises(anthropic.BadRequestError) as caught:
            _post_raw(emulator, body, **{"Content-Type": "text/plain"})
        assert "text/plain" in _error(caught.value)["message"]

    def test_body_over_limit_by_content_length_is_413(
        self, emulator_factory: Callable[..., EmulatorThread]
    ) -> None:
        """A Content-Length over the limit is a 413 request_too_large."""
        emulator = emulator_factory(max_body_bytes=100_000)
        body = orjson.dumps({"requests": message_requests(2000)})
        assert len(body) > 100_000
        with pytest.raises(anthropic.APIStatusError) as caught:
            _post_raw(emulator, body)
        assert caught.value.status_code == 413
        assert _error(caught.value)["type"] == "request_too_large"

    def test_streamed_body_over_limit_is_413(
        self, emulator_factory: Callable[..., EmulatorThread]
    ) -> None:
        """A chunked body without Content-Length is cut off at the limit with a 413."""
        emulator = emulator_factory(max_body_bytes=100_000)

        def chunks() -> Iterator[bytes]:
            yield b'{"requests":['
            for index in range(2000):
                yield orjson.dumps(message_requests(1, prefix=f"s{index}x")[0]) + b","
            yield b'{"custom_id":"last","params":{}}]}'

        with pytest.raises(anthropic.APIStatusError) as caught:
            _post_raw(emulator, chunks())
        assert caught.value.status_code == 413
        assert _error(caught.value)["type"] == "request_too_large"
        assert emulator.stats()["received"] == {}

    def test_streamed_body_within_limit_is_accepted(self, emulator: EmulatorThread) -> None:
        """A chunked body (the way batchd streams a spool file) makes a batch."""

        def chunks() -> Iterator[bytes]:
            yield b'{"requests":['
            yield b",".join(orjson.dumps(r) for r in message_requests(10))
            yield b"]}"

        response = _post_raw(emulator, chunks())
        assert response.json()["request_counts"]["processing"] == 10


def _one(params: dict[str, Any]) -> list[Any]:
    return [{"custom_id": "only", "params": params}]


_GOOD: dict[str, Any] = {
    "model": "claude-haiku-4-5",
    "max_tokens": 10,
    "messages": [{"role": "user", "content": "hi"}],
}


def _without(key: str) -> dict[str, Any]:
    return {k: v for k, v in _GOOD.items() if k != key}


class TestPerRequestErrors:
    @pytest.mark.parametrize(
        ("params", "error_type", "needle"),
        [
            ({**_GOOD, "temperature": 1.5}, "invalid_request_error", "temperature"),
            ({**_GOOD, "temperature": -0.1}, "invalid_request_error", "temperature"),
            ({**_GOOD, "max_tokens": 0}, "invalid_request_error", "max_tokens"),
            (_without("max_tokens"), "invalid_request_error", "max_tokens"),
            ({**_GOOD, "max_tokens": "10"}, "invalid_request_error", "max_tokens"),
            (_without("messages"), "invalid_request_error", "messages"),
            ({**_GOOD, "messages": []}, "invalid_request_error", "messages"),
            (
                {**_GOOD, "messages": [{"role": "assistant", "content": "hi"}]},
                "invalid_request_error",
                "user",
            ),
            ({**_GOOD, "messages": [{"role": "user", "content": ""}]},
             "invalid_request_error", "non-empty content"),
            ({**_GOOD, "messages": [{"role": "user", "content": " \n"}]},
             "invalid_request_error", "non-empty content"),
            (_without("model"), "invalid_request_error", "model"),
            ({**_GOOD, "model": "gpt-4o"}, "not_found_error", "gpt-4o"),
        ],
    )
    def test_bad_params_error_only_that_request(
        self, emulator: EmulatorThread, params: dict[str, Any], error_type: str, needle: str
    ) -> None:
        """The batch is created; the bad request ends errored with the API's error shape."""
        client = sdk_client(emulator.base_url)
        requests = _one(params) + message_requests(2)
        batch = client.messages.batches.create(requests=requests)
        counts = client.messages.batches.retrieve(batch.id).request_counts
        assert (counts.errored, counts.succeeded) == (1, 2)
        with client.messages.batches.with_streaming_response.results(batch.id) as response:
            lines = {line["custom_id"]: line for line in map(orjson.loads, response.iter_lines())}
        result = lines["only"]["result"]
        assert result["type"] == "errored"
        assert result["error"]["type"] == "error"
        assert result["error"]["request_id"].startswith("req_")
        assert result["error"]["error"]["type"] == error_type
        assert needle in result["error"]["error"]["message"]

    def test_empty_final_assistant_message_is_allowed(self, emulator: EmulatorThread) -> None:
        """Only a final assistant turn (a prefill) may be empty, as with the real API."""
        client = sdk_client(emulator.base_url)
        messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]
        batch = client.messages.batches.create(requests=_one({**_GOOD, "messages": messages}))
        assert client.messages.batches.retrieve(batch.id).request_counts.succeeded == 1

    @pytest.mark.parametrize(
        ("model", "result"),
        [
            ("claude-haiku-4-5", "succeeded"),
            ("claude-sonnet-4-6", "succeeded"),
            ("claude-opus-4-5-20251101", "succeeded"),
            ("claude-sonnet-4-5", "errored"),
            ("claude-opus-4-1", "errored"),
            ("claude-3-5-haiku-latest", "errored"),
            ("claude-nonexistent-9", "errored"),
        ],
    )
    def test_catalog_decides_which_models_answer(
        self, emulator: EmulatorThread, model: str, result: str
    ) -> None:
        """Current models succeed; retired and unknown ones end not_found_error naming them."""
        client = sdk_client(emulator.base_url)
        batch = client.messages.batches.create(requests=_one({**_GOOD, "model": model}))
        client.messages.batches.retrieve(batch.id)
        (line,) = list(client.messages.batches.results(batch.id))
        assert line.result.type == result
        if line.result.type == "errored":
            error = line.result.error.error
            assert error.type == "not_found_error" and model in error.message


class TestBadCalls:
    @pytest.mark.parametrize("call", ["retrieve", "cancel", "delete", "results"])
    def test_unknown_batch_is_404(self, emulator: EmulatorThread, call: str) -> None:
        """Every per-batch call on an unknown id is a 404 not_found_error."""
        batches = sdk_client(emulator.base_url).messages.batches
        with pytest.raises(anthropic.NotFoundError) as caught:
            getattr(batches, call)("msgbatch_01doesnotexist")
        assert _error(caught.value)["type"] == "not_found_error"

    def test_results_of_unfinished_batch_is_400(
        self, emulator_factory: Callable[..., EmulatorThread]
    ) -> None:
        """Fetching results before the end is a 400 (the SDK itself refuses earlier)."""
        emulator = emulator_factory(latency=60.0)
        client = sdk_client(emulator.base_url)
        batch = client.messages.batches.create(requests=message_requests(1))
        with pytest.raises(anthropic.BadRequestError) as caught:
            client.get(f"{_BATCHES}/{batch.id}/results", cast_to=httpx2.Response)
        assert "not finished" in _error(caught.value)["message"]
        with pytest.raises(anthropic.AnthropicError, match="results_url"):
            client.messages.batches.results(batch.id)

    def test_unknown_route_is_404_in_api_shape(self, emulator: EmulatorThread) -> None:
        """A path the API does not have answers 404 not_found_error in the error shape."""
        with pytest.raises(anthropic.NotFoundError) as caught:
            sdk_client(emulator.base_url).get("/v1/nothing/here", cast_to=httpx2.Response)
        assert _error(caught.value)["type"] == "not_found_error"

    def test_wrong_method_is_error_shape(self, emulator: EmulatorThread) -> None:
        """A method the route does not take still answers in the error shape."""
        with pytest.raises(anthropic.APIStatusError) as caught:
            sdk_client(emulator.base_url).put(_BATCHES, cast_to=httpx2.Response, body={})
        assert caught.value.status_code == 405
        assert _error(caught.value)["type"] == "not_found_error"

    def test_bad_fault_setting_is_rejected(self, emulator: EmulatorThread) -> None:
        """An unknown or out-of-range fault setting is refused, naming it, and changes nothing."""
        with pytest.raises(ValueError, match="nonsense"):
            emulator.set_faults(nonsense=1)
        with pytest.raises(ValueError, match="api_error"):
            emulator.set_faults(api_error=2)
        client = sdk_client(emulator.base_url)
        with pytest.raises(anthropic.BadRequestError) as caught:
            client.post("/_emulator/faults", cast_to=httpx2.Response, body={"http429": -1})
        assert "http429" in _error(caught.value)["message"]
        assert emulator.faults()["api_error"] == 0.0

    def test_abandoned_upload_leaves_no_trace(self, emulator: EmulatorThread) -> None:
        """A client dying mid-body makes no batch; its requests' next receipt is attempt 1."""

        class Gone(Exception):
            pass

        def dying() -> Iterator[bytes]:
            yield b'{"requests":['
            yield b",".join(orjson.dumps(r) for r in message_requests(50))
            raise Gone

        with pytest.raises((Gone, anthropic.APIConnectionError)):
            _post_raw(emulator, dying())
        client = sdk_client(emulator.base_url)
        assert client.messages.batches.list().data == []
        assert emulator.stats()["received"] == {}
        emulator.set_faults(api_error=1.0)
        batch = client.messages.batches.create(requests=message_requests(1))
        client.messages.batches.retrieve(batch.id)
        (line,) = list(client.messages.batches.results(batch.id))
        assert line.result.type == "errored"
        assert "(attempt 1)" in line.result.error.error.message
