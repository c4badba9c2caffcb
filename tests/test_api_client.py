"""
batchd's own Message Batches client (daemon/batches/api.py) beside the SDK it replaced.

The engine no longer imports ``anthropic`` (90 MB, 2 s), so the SDK is kept as the ground
truth here: the same headers, the same error classes and fields for the same answers, the
same batch fields, the same retries, and a create body that fits the SDK's request types.
Both talk to the same emulator over real HTTP.
"""

from __future__ import annotations

import socket
import typing
from pathlib import Path
from typing import Any

import anthropic
import anyio
import httpx2
import orjson
import pydantic
import pytest
from anthropic._error_classes import make_status_error
from anthropic.types.message_create_params import MessageCreateParamsNonStreaming
from anthropic.types.messages.batch_create_params import BatchCreateParams, Request

from batchd.daemon.batches import api_errors
from batchd.daemon.batches.api import BatchesApi, StreamCut, api_headers
from batchd.daemon.batches.error_codes import retry_after_of
from batchd.daemon.config import ApiConfig
from batchd.daemon.emulator import EmulatorThread
from batchd.daemon.intake.packer import request_line
from batchd.daemon.intake.request_options import SDK_API_VERSION
from batchd.daemon.intake.spool import SpoolWriter, stream_body
from tests.fixtures.emulator import message_requests, sdk_client

# Each SDK class and batchd's class for the same answers.
_CLASSES: list[tuple[type[anthropic.APIStatusError], type[api_errors.ApiStatusError]]] = [
    (anthropic.BadRequestError, api_errors.BadRequestError),
    (anthropic.AuthenticationError, api_errors.AuthenticationError),
    (anthropic.PaymentRequiredError, api_errors.PaymentRequiredError),
    (anthropic.PermissionDeniedError, api_errors.PermissionDeniedError),
    (anthropic.NotFoundError, api_errors.NotFoundError),
    (anthropic.ConflictError, api_errors.ConflictError),
    (anthropic.ContentTooLargeError, api_errors.ContentTooLargeError),
    (anthropic.RateLimitError, api_errors.RateLimitedError),
    (anthropic.InternalServerError, api_errors.InternalServerError),
]


def _api(base_url: str, **config: Any) -> BatchesApi:
    return BatchesApi(ApiConfig(base_url=base_url, **config), "test")


def _run(fn: Any, *args: Any) -> Any:
    return anyio.run(fn, *args)


class TestHeaders:
    @pytest.mark.parametrize("version", [SDK_API_VERSION, "2023-06-01"])
    def test_the_sdk_sends_the_same(self, version: str) -> None:
        """Key, anthropic-version and content headers equal an SDK client's for the config."""
        client = anthropic.Anthropic(api_key="sk-ant-test", base_url="http://127.0.0.1:9",
                                     default_headers={"anthropic-version": version})
        sdk = client.default_headers
        ours = api_headers("sk-ant-test", version)
        for name in ("Authorization", "anthropic-version", "Accept", "Content-Type"):
            assert ours[name] == sdk[name], name
        assert ours["User-Agent"].startswith("batchd/")
        client.close()

    def test_on_the_wire(self, emulator: EmulatorThread) -> None:
        """The emulator sees our calls with the same version and auth scheme as the SDK's."""
        sdk_client(emulator.base_url).messages.batches.list(limit=1)
        sdk_view = emulator.stats()
        api = _api(emulator.base_url)

        async def call() -> None:
            await api.check()
            await api.aclose()

        _run(call)
        stats = emulator.stats()
        assert set(stats["api_versions"]) == set(sdk_view["api_versions"]) == {SDK_API_VERSION}
        assert set(stats["auth_schemes"]) == set(sdk_view["auth_schemes"])
        assert sum(stats["auth_schemes"].values()) == 2


def _answer(status: int, code: str | None) -> tuple[bytes, dict[str, str]]:
    error: dict[str, Any] = {"type": "some_error", "message": f"status {status}"}
    if code is not None:
        error["details"] = {"error_code": code}
    body = {"type": "error", "error": error, "request_id": "req_1"}
    return orjson.dumps(body), {"request-id": "req_1", "retry-after": "3",
                                "content-type": "application/json"}


@pytest.mark.parametrize(("status", "code"), [
    (400, None), (401, None), (402, None), (403, None), (404, None), (409, None), (413, None),
    (418, None), (429, None), (429, "enforced_spend_limit_reached"), (400, "organization_on_hold"),
    (500, None), (503, "cmek_key_unreachable"), (529, None), (529, "compaction_unavailable"),
])
def test_errors_carry_what_the_sdk_errors_carry(status: int, code: str | None) -> None:
    """For one answer, batchd's error is the SDK's class family with the same fields."""
    content, headers = _answer(status, code)
    request = httpx2.Request("POST", "http://x/v1/messages/batches")
    response = httpx2.Response(status, request=request, headers=headers, content=content)
    sdk = make_status_error("x", body=orjson.loads(content), response=response)
    ours = api_errors.status_error(status, content, response.headers)
    for sdk_class, our_class in _CLASSES:
        assert isinstance(sdk, sdk_class) == isinstance(ours, our_class), (sdk_class, our_class)
    assert (ours.status_code, ours.type, ours.error_code, ours.api_message, ours.request_id) == (
        sdk.status_code, sdk.type, sdk.error_code, sdk.api_message, sdk.request_id)
    assert retry_after_of(ours) == 3.0


def test_a_body_that_is_not_json_is_kept_as_text() -> None:
    error = api_errors.status_error(502, b"<html>bad gateway</html>\n", {})
    assert isinstance(error, api_errors.InternalServerError)
    assert error.body == "<html>bad gateway</html>"
    assert error.error_code is None and error.type is None


def _spool(tmp_path: Path, requests: list[Request]) -> SpoolWriter:
    writer = SpoolWriter(tmp_path / "chunk.jsonl")
    for request in requests:
        body = orjson.dumps(request["params"])
        writer.add_request(request_line(request["custom_id"], body), {"key": request["custom_id"]})
    writer.seal()
    return writer


class TestAgainstTheEmulator:
    def test_batches_read_as_the_sdk_reads_them(self, emulator: EmulatorThread,
                                                tmp_path: Path) -> None:
        """create (streamed spool), retrieve, list and results agree with the SDK's view."""
        writer = _spool(tmp_path, message_requests(5))
        api = _api(emulator.base_url)
        sdk = sdk_client(emulator.base_url)

        async def flow() -> tuple[Any, Any, list[Any], list[bytes]]:
            created = await api.create(writer.final_path, writer.body_bytes)
            with anyio.fail_after(30):
                batch = await api.retrieve(created.id)
                while batch.processing_status != "ended":
                    await anyio.sleep(0.05)
                    batch = await api.retrieve(created.id)
            listed = [b async for b in api.recent(since=0)]
            lines = [line async for block in api.result_blocks(created.id) for line in block]
            await api.aclose()
            return created, batch, listed, lines

        created, batch, listed, lines = _run(flow)
        truth = sdk.messages.batches.retrieve(created.id)
        assert created.request_counts.total() == 5
        for name in ("id", "processing_status", "created_at", "expires_at", "ended_at",
                     "archived_at", "cancel_initiated_at", "results_url"):
            assert getattr(batch, name) == getattr(truth, name), name
        assert str(batch.created_at) == str(truth.created_at)  # what the manifest stores
        assert batch.request_counts.succeeded == truth.request_counts.succeeded == 5
        assert [b.id for b in listed] == [b.id for b in sdk.messages.batches.list().data]
        results = {r.custom_id: r.result.type for r in sdk.messages.batches.results(created.id)}
        ours = {row["custom_id"]: row["result"]["type"] for row in map(orjson.loads, lines)}
        assert ours == results and len(ours) == 5

    def test_reads_are_retried_as_the_sdk_retries_them(self, emulator: EmulatorThread) -> None:
        """A 500 on every call: a read is tried 1 + max_retries times, as by the SDK."""
        emulator.set_faults(http500=1.0, retry_after=0.05)
        with pytest.raises(anthropic.InternalServerError):
            sdk_client(emulator.base_url, max_retries=2).messages.batches.list()
        sdk_tries = sum(emulator.stats()["http_errors"].values())
        api = _api(emulator.base_url, max_retries=2)

        async def read() -> None:
            try:
                await api.check()
            finally:
                await api.aclose()

        with pytest.raises(api_errors.InternalServerError):
            _run(read)
        assert sum(emulator.stats()["http_errors"].values()) - sdk_tries == sdk_tries == 3

    def test_create_is_never_retried(self, emulator: EmulatorThread, tmp_path: Path) -> None:
        """A lost create may have made a (billed) batch: one try, the caller decides."""
        writer = _spool(tmp_path, message_requests(2))
        emulator.set_faults(http500=1.0, http_fault_on="create", retry_after=0.05)
        api = _api(emulator.base_url, max_retries=3)

        async def create() -> None:
            try:
                await api.create(writer.final_path, writer.body_bytes)
            finally:
                await api.aclose()

        with pytest.raises(api_errors.InternalServerError) as caught:
            _run(create)
        assert caught.value.type == "api_error"
        assert sum(emulator.stats()["http_errors"].values()) == 1

    def test_no_answer_is_a_connection_error(self) -> None:
        """Nothing listens: reads fail as ApiConnectionError, a results stream as StreamCut."""
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        api = _api(f"http://127.0.0.1:{port}", max_retries=0)

        async def calls() -> None:
            with pytest.raises(api_errors.ApiConnectionError):
                await api.retrieve("msgbatch_x")
            with pytest.raises(StreamCut):
                async for _ in api.result_blocks("msgbatch_x"):
                    pass
            await api.aclose()

        _run(calls)


def test_the_body_the_engine_streams_fits_the_sdk_types(tmp_path: Path) -> None:
    """Every key of the streamed create body is one the SDK's request types have."""
    writer = _spool(tmp_path, message_requests(3, system="Be brief.", metadata={"user_id": "u"}))

    async def body() -> bytes:
        return b"".join([part async for part in stream_body(writer.final_path)])

    data = orjson.loads(_run(body))
    assert len(data["requests"]) == writer.requests == 3
    assert set(data) <= set(typing.get_type_hints(BatchCreateParams))
    pydantic.TypeAdapter(BatchCreateParams).validate_python(data)
    params = frozenset(typing.get_type_hints(MessageCreateParamsNonStreaming))
    for request in data["requests"]:
        assert set(request) <= set(typing.get_type_hints(Request))
        assert set(request["params"]) <= params
