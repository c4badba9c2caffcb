"""
The Message Batches calls batchd makes, spoken over ``httpx2`` directly.

``httpx2`` is the transport the official SDK itself uses; the SDK is not
imported because ``import anthropic`` (2.x) costs ~90 MB and ~2 s, more than the
engine's whole working set. What the SDK would do is kept: the same headers
(tests/test_api_client.py compares them with an ``anthropic`` client's), the
same retry policy on reads, the same status → error mapping (api_errors.py).

Two SDK defaults were wrong for a daemon that must never pay twice, and stay off:

* a retried create whose first response was lost makes a second, billed
  batch (the API takes no idempotency key), so create is never retried here
  and the caller resolves ambiguity itself;
* results are not parsed into models; they are streamed as raw bytes and
  parsed with orjson by the collector.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import AsyncIterator, Mapping
from datetime import datetime
from email.utils import mktime_tz, parsedate_to_datetime, parsedate_tz
from http import HTTPStatus
from importlib import metadata
from pathlib import Path
from typing import Any

import anyio
import httpx2
import orjson
import structlog

from batchd.daemon.batches.api_errors import (
    ApiConnectionError,
    ApiError,
    ApiStatusError,
    ApiTimeoutError,
    ResultsNotReady,
    status_error,
)
from batchd.daemon.batches.message_batch import MessageBatch
from batchd.daemon.config import ApiConfig
from batchd.daemon.intake.spool import stream_body
from batchd.plugins.backoff import Backoff

__all__ = (
    "BatchesApi",
    "StreamCut",
    "api_headers",
    "created_at_ts",
    "resolve_api_key",
    "timestamp",
)

_DEFAULT_BASE_URL = "https://api.anthropic.com"
_CONNECT_TIMEOUT = 10.0
# The SDK's retry pacing (anthropic/_constants.py): from 0.5 s doubling to 8 s, jittered.
_INITIAL_RETRY_DELAY = 0.5
_MAX_RETRY_DELAY = 8.0
_RETRY_STATUSES = frozenset({408, 409, 429})


def resolve_api_key() -> str | None:
    """``ANTHROPIC_API_KEY``, else the systemd credential ``anthropic-api-key``."""
    key = os.environ.get("ANTHROPIC_API_KEY")
    if key:
        return key.strip()
    cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
    if cred_dir:
        path = Path(cred_dir) / "anthropic-api-key"
        if path.exists():
            return path.read_text().strip()
    return None


class StreamCut(Exception):
    """The results stream broke off or sent a broken line: fetch again, skip what is done."""


def timestamp(value: Any) -> float:
    """Unix time of a datetime or an RFC 3339 string (as the manifest stores it)."""
    if isinstance(value, datetime):
        return value.timestamp()
    return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()


def created_at_ts(batch: MessageBatch) -> float:
    return timestamp(batch.created_at)


def _user_agent() -> str:
    try:
        return f"batchd/{metadata.version('batchd')}"
    except metadata.PackageNotFoundError:
        return "batchd"


def api_headers(api_key: str, version: str) -> dict[str, str]:
    """
    What every call sends. The key goes as the SDK 2.x sends it (``Authorization:
    Bearer``); the pinned ``anthropic-version`` decides which request fields the API
    accepts, and a batch is judged by the version it was created with.
    """
    return {
        "Accept": "application/json",
        "Content-Type": "application/json",
        "User-Agent": _user_agent(),
        "anthropic-version": version,
        "Authorization": f"Bearer {api_key}",
    }


def _keepalive_options() -> list[tuple[int, int, int]]:
    """TCP keepalive as the SDK sets it: a long results stream survives idle NAT paths."""
    options = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
    for name, value in (("TCP_KEEPINTVL", 60), ("TCP_KEEPCNT", 5), ("TCP_KEEPIDLE", 60)):
        option = getattr(socket, name, None)
        if option is not None:
            options.append((socket.IPPROTO_TCP, option, value))
    return options


def _client(config: ApiConfig, base_url: str, headers: Mapping[str, str]) -> httpx2.AsyncClient:
    """An httpx2 client set up as the SDK sets up its own (limits, keepalive, env proxies)."""
    try:
        from httpx2._utils import get_environment_proxies  # what the SDK calls too
    except ImportError:  # a later httpx2 moved it: no proxies from the environment
        def get_environment_proxies() -> dict[str, str | None]:
            return {}

    limits = httpx2.Limits(max_connections=1000, max_keepalive_connections=100)
    options = _keepalive_options()
    mounts: dict[str, httpx2.AsyncBaseTransport | None] = {
        key: None if proxy is None else httpx2.AsyncHTTPTransport(
            proxy=proxy, limits=limits, socket_options=options)
        for key, proxy in get_environment_proxies().items()
    }
    return httpx2.AsyncClient(
        base_url=base_url,
        headers=dict(headers),
        timeout=httpx2.Timeout(config.timeout, connect=_CONNECT_TIMEOUT),
        follow_redirects=True,
        transport=httpx2.AsyncHTTPTransport(limits=limits, socket_options=options),
        mounts=mounts,
    )


def _retry_after(headers: Mapping[str, str]) -> float | None:
    """``retry-after-ms``, ``retry-after`` in seconds, or as a date (the SDK's reading)."""
    try:
        return float(headers.get("retry-after-ms", "")) / 1000
    except ValueError:
        pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        parsed = parsedate_tz(value)
        return None if parsed is None else float(mktime_tz(parsed) - time.time())


def _should_retry(response: httpx2.Response) -> bool:
    header = response.headers.get("x-should-retry")
    if header in ("true", "false"):
        return header == "true"
    return response.status_code in _RETRY_STATUSES or response.status_code >= 500


def _delay(backoff: Backoff, headers: Mapping[str, str] | None) -> float:
    """What the answer asks (``retry-after``), else the next jittered backoff step."""
    after = _retry_after(headers) if headers is not None else None
    if after is not None and after > 0:
        backoff.next_delay()
        return min(after, 4_294_967.0)
    return backoff.next_delay()


_log = structlog.get_logger("batchd.api")


def _describe(failure: ApiError) -> str:
    """``500 Internal Server Error`` for an answer, the exception's text for no answer."""
    if isinstance(failure, ApiStatusError):
        try:
            reason = HTTPStatus(failure.status_code).phrase
        except ValueError:
            reason = ""
        return f"{failure.status_code} {reason}".strip()
    return str(failure)


class BatchesApi:
    """A thin async client; one per daemon, shared by all pipelines."""

    def __init__(self, config: ApiConfig, api_key: str | None) -> None:
        base_url = config.base_url or os.environ.get("ANTHROPIC_BASE_URL") or _DEFAULT_BASE_URL
        self.base_url = base_url
        self.version = config.version
        self.max_retries = config.max_retries
        self.headers = api_headers(api_key or "no-key", config.version)
        self.client = _client(config, base_url.rstrip("/") + "/", self.headers)

    async def _send(self, request: httpx2.Request, *, retries: int,
                    stream: bool = False) -> httpx2.Response:
        """
        Send, retrying what the SDK retries (no answer, 408/409/429/5xx, or what the
        ``x-should-retry`` header says) up to ``retries`` times; an error answer raises.
        """
        attempt = 0
        backoff = Backoff(_INITIAL_RETRY_DELAY, _MAX_RETRY_DELAY)
        while True:
            headers: Mapping[str, str] | None = None
            try:
                response = await self.client.send(request, stream=stream)
            except httpx2.TimeoutException as exc:
                failure: ApiError = ApiTimeoutError(f"{type(exc).__name__}: request timed out")
                failure.__cause__ = exc
            except httpx2.RequestError as exc:
                failure = ApiConnectionError(f"{type(exc).__name__}: {exc}")
                failure.__cause__ = exc
            else:
                if response.status_code < 400:
                    return response
                content = await response.aread()
                await response.aclose()
                failure = status_error(response.status_code, content, response.headers)
                if not _should_retry(response):
                    raise failure
                headers = response.headers
            if attempt >= retries:
                raise failure
            delay = _delay(backoff, headers)
            # What the SDK logged as "Retrying request": an operator debugging a flaky
            # API sees each retried answer (status and reason, never headers or the key).
            _log.info("api call retried", method=request.method, path=request.url.path,
                      error=_describe(failure), attempt=attempt + 1, delay=round(delay, 2))
            await anyio.sleep(delay)
            attempt += 1

    async def _get_json(self, path: str, params: dict[str, Any] | None = None
                        ) -> tuple[Any, httpx2.Response]:
        request = self.client.build_request("GET", path, params=params)
        response = await self._send(request, retries=self.max_retries)
        try:
            return orjson.loads(response.content), response
        except orjson.JSONDecodeError as exc:
            raise ApiError(f"GET {path}: the answer is not JSON ({exc})") from exc

    async def create(self, spool: Path, body_bytes: int, *,
                     deadline: Any | None = None) -> MessageBatch:
        """
        POST the spool as the create body, streamed, never retried.

        With a lease *deadline* (cluster mode) the body's last bytes are sent only while
        it holds (``cluster.deadline.gated``): a body cut short creates no batch.
        """
        content: AsyncIterator[bytes] = stream_body(spool)
        if deadline is not None:
            from batchd.daemon.cluster.deadline import gated

            content = gated(content, deadline)
        request = self.client.build_request(
            "POST", "v1/messages/batches", content=content,
            headers={"Content-Type": "application/json", "Content-Length": str(body_bytes)},
        )
        response = await self._send(request, retries=0)
        return MessageBatch.from_json(orjson.loads(response.content))

    async def retrieve(self, batch_id: str) -> MessageBatch:
        data, _ = await self._get_json(f"v1/messages/batches/{_segment(batch_id)}")
        return MessageBatch.from_json(data)

    async def cancel(self, batch_id: str) -> MessageBatch:
        """Ask the API to cancel a batch (a stray duplicate); idempotent, so retried."""
        request = self.client.build_request(
            "POST", f"v1/messages/batches/{_segment(batch_id)}/cancel")
        response = await self._send(request, retries=self.max_retries)
        return MessageBatch.from_json(orjson.loads(response.content))

    async def _list(self, limit: int, after_id: str | None = None
                    ) -> tuple[Any, httpx2.Response]:
        params: dict[str, Any] = {"limit": limit}
        if after_id is not None:
            params["after_id"] = after_id
        return await self._get_json("v1/messages/batches", params)

    async def check(self) -> None:
        """One list call: the base URL answers and accepts the key (``validate --connect``)."""
        await self._list(limit=1)

    async def clock_skew(self) -> float | None:
        """
        The API's clock minus ours, in seconds (from a response's ``Date`` header, so to
        about a second), or None if the response carried no usable date.
        """
        _, response = await self._list(limit=1)
        received = time.time()
        try:
            server = parsedate_to_datetime(response.headers.get("date", ""))
        except (TypeError, ValueError):
            return None
        return server.timestamp() - received

    async def recent(self, since: float, page_size: int = 100) -> AsyncIterator[MessageBatch]:
        """Batches newest first, stopping at the first one created before ``since``."""
        after: str | None = None
        while True:
            page, _ = await self._list(limit=page_size, after_id=after)
            batches = [MessageBatch.from_json(item) for item in page.get("data") or ()]
            for batch in batches:
                if created_at_ts(batch) < since:
                    return
                yield batch
            if not page.get("has_more") or not batches:
                return
            after = page.get("last_id") or batches[-1].id

    async def result_blocks(self, batch_id: str) -> AsyncIterator[list[bytes]]:
        """
        The results JSONL as raw lines (bytes), streamed a network block at a time.

        Lists of lines rather than single lines: one await per network block instead of
        one per line, so the collector's join runs as a plain loop over each block.
        """
        try:
            batch = await self.retrieve(batch_id)
            if not batch.results_url:
                raise ResultsNotReady(
                    f"batch {batch_id} has no results_url (status {batch.processing_status})")
            request = self.client.build_request(
                "GET", batch.results_url, headers={"Accept": "application/binary"})
            response = await self._send(request, retries=self.max_retries, stream=True)
        except ApiConnectionError as exc:
            raise StreamCut(f"{type(exc).__name__}: {exc}") from exc
        try:
            tail = b""
            async for block in response.aiter_bytes():
                lines = (tail + block).split(b"\n")
                tail = lines.pop()
                yield lines
            if tail.strip():
                yield [tail]
        except httpx2.TransportError as exc:
            raise StreamCut(f"{type(exc).__name__}: {exc}") from exc
        finally:
            await response.aclose()

    async def aclose(self) -> None:
        await self.client.aclose()


def _segment(value: str) -> str:
    """A batch id as one path segment (the SDK percent-encodes it the same way)."""
    from urllib.parse import quote

    if value in ("", ".", ".."):
        raise ValueError(f"not a batch id: {value!r}")
    return quote(value, safe="")

