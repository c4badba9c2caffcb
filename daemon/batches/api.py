"""
The Message Batches calls batchd makes, on the official ``anthropic`` SDK.

Two SDK defaults are wrong for a daemon that must never pay twice:

* a retried create whose first response was lost makes a second, billed
  batch (the SDK sends no idempotency key), so create runs with
  ``max_retries=0`` and the caller resolves ambiguity itself;
* ``results()`` parses every line into models (~29k lines/s), so results
  are streamed as raw bytes and parsed with orjson by the collector.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from datetime import datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import anthropic
import httpx2
from anthropic.types.messages import MessageBatch

from batchd.daemon.config import ApiConfig
from batchd.daemon.intake.spool import stream_body

__all__ = (
    "BatchesApi",
    "StreamCut",
    "created_at_ts",
    "resolve_api_key",
    "timestamp",
)

_DEFAULT_BASE_URL = "https://api.anthropic.com"


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
    """Unix time of an SDK datetime or an RFC 3339 string (as the manifest stores it)."""
    if isinstance(value, datetime):
        return value.timestamp()
    return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()


def created_at_ts(batch: MessageBatch) -> float:
    return timestamp(batch.created_at)


class BatchesApi:
    """A thin async client; one per daemon, shared by all pipelines."""

    def __init__(self, config: ApiConfig, api_key: str | None) -> None:
        base_url = config.base_url or os.environ.get("ANTHROPIC_BASE_URL") or _DEFAULT_BASE_URL
        self.base_url = base_url
        self.client = anthropic.AsyncAnthropic(
            api_key=api_key or "no-key",
            base_url=base_url,
            max_retries=config.max_retries,
            timeout=anthropic.Timeout(config.timeout, connect=10.0),
            # The pinned version decides which request fields the API accepts (and a batch
            # is judged by the version it was created with).
            default_headers={"anthropic-version": config.version},
        )
        self.version = config.version

    async def create(self, spool: Path, body_bytes: int) -> MessageBatch:
        """POST the spool as the create body, streamed, with SDK retries off."""
        return await self.client.post(
            "/v1/messages/batches",
            cast_to=MessageBatch,
            content=stream_body(spool),
            options={
                "headers": {"Content-Type": "application/json", "Content-Length": str(body_bytes)},
                "max_retries": 0,
            },
        )

    async def retrieve(self, batch_id: str) -> MessageBatch:
        return await self.client.messages.batches.retrieve(batch_id)

    async def clock_skew(self) -> float | None:
        """
        The API's clock minus ours, in seconds (from a response's ``Date`` header, so to
        about a second), or None if the response carried no usable date.
        """
        raw = await self.client.messages.batches.with_raw_response.list(limit=1)
        received = time.time()
        try:
            server = parsedate_to_datetime(raw.headers.get("date", ""))
        except (TypeError, ValueError):
            return None
        return server.timestamp() - received

    async def recent(self, since: float, page_size: int = 100) -> AsyncIterator[MessageBatch]:
        """Batches newest first, stopping at the first one created before ``since``."""
        after: str | None = None
        while True:
            if after is None:
                page = await self.client.messages.batches.list(limit=page_size)
            else:
                page = await self.client.messages.batches.list(limit=page_size, after_id=after)
            for batch in page.data:
                if created_at_ts(batch) < since:
                    return
                yield batch
            if not page.has_more or not page.data:
                return
            after = page.last_id or page.data[-1].id

    async def result_blocks(self, batch_id: str) -> AsyncIterator[list[bytes]]:
        """
        The results JSONL as raw lines (bytes), streamed a network block at a time.

        Lists of lines rather than single lines: one await per network block instead of
        one per line, so the collector's join runs as a plain loop over each block.
        """
        results = self.client.messages.batches.with_streaming_response.results(batch_id)
        try:
            async with results as response:
                tail = b""
                async for block in response.iter_bytes():
                    lines = (tail + block).split(b"\n")
                    tail = lines.pop()
                    yield lines
                if tail.strip():
                    yield [tail]
        except (anthropic.APIConnectionError, httpx2.TransportError) as exc:
            raise StreamCut(f"{type(exc).__name__}: {exc}") from exc

    async def aclose(self) -> None:
        await self.client.close()
