"""
Calm polling: one loop per pipeline, one ``list`` call for many batches.

The real API ends most batches within an hour, so polling every 30–60 s
with jitter costs nothing and keeps us far from the batch endpoints' rate
limits. With several batches in flight, a paged ``list`` (newest first,
stopping at the oldest batch we wait for) replaces a ``retrieve`` each.
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import structlog

from batchd.daemon.batches.api import BatchesApi, timestamp
from batchd.daemon.batches.api_errors import ApiError, NotFoundError
from batchd.daemon.batches.control import Alarms
from batchd.daemon.config import ApiConfig
from batchd.daemon.ops.telemetry import Telemetry
from batchd.daemon.wal.manifest import Manifest, crash_point
from batchd.daemon.wal.manifest_state import ChunkState, Stage
from batchd.daemon.wal.records import Ended

# Records a chunk's ``ended`` under the lease its driver holds; False when it was fenced.
RecordEnded = Callable[[Ended], Awaitable[bool]]
# Whether this poller watches a chunk (a cluster worker: only the chunks it holds).
Watches = Callable[[str], bool]

__all__ = ("Poller",)

log = structlog.get_logger("batchd.poller")


def _counts(batch: Any) -> dict[str, int]:
    c = batch.request_counts
    return {
        "succeeded": c.succeeded,
        "errored": c.errored,
        "canceled": c.canceled,
        "expired": c.expired,
        "processing": c.processing,
    }


class Poller:
    """Watches the pipeline's submitted chunks and records ``ended`` for each."""

    def __init__(
        self,
        pipeline: str,
        *,
        manifest: Manifest,
        api: BatchesApi,
        api_config: ApiConfig,
        telemetry: Telemetry,
        alarms: Alarms,
        record_ended: RecordEnded | None = None,
        watches: Watches | None = None,
    ) -> None:
        self.name = pipeline
        self.manifest = manifest
        self._record_ended = record_ended
        self._watches = watches
        self.api = api
        self.api_config = api_config
        self.telemetry = telemetry
        self.alarms = alarms
        self._events: dict[str, anyio.Event] = {}
        self._missing_since: dict[str, float] = {}

    async def wait_ended(self, chunk: ChunkState) -> None:
        event = self._events.get(chunk.chunk)
        if event is None:
            event = self._events[chunk.chunk] = anyio.Event()
        await event.wait()

    def _interval(self) -> float:
        api = self.api_config
        return api.poll_interval * (1 + api.poll_jitter * random.uniform(-1, 1))

    async def run(self) -> None:
        while True:
            watches = self._watches
            watched = [
                c for c in self.manifest.state.chunks.values()
                if c.pipeline == self.name and c.stage is Stage.SUBMITTED
                and (watches is None or watches(c.chunk))
            ]
            if watched:
                try:
                    await self.poll_once(watched)
                except ApiError as exc:
                    kind = getattr(exc, "status_code", None) or "connection"
                    self.telemetry.api_error(kind)
                    log.warning("poll failed; will poll again", pipeline=self.name,
                                error=f"{type(exc).__name__}: {exc}")
            await anyio.sleep(self._interval())

    async def _retrieve(self, chunk: ChunkState) -> Any | None:
        assert chunk.batch_id is not None
        self.telemetry.poll_call()
        try:
            return await self.api.retrieve(chunk.batch_id)
        except NotFoundError:
            return None

    async def poll_once(self, watched: list[ChunkState]) -> None:
        api = self.api
        by_batch = {c.batch_id: c for c in watched if c.batch_id}
        found: dict[str, Any] = {}
        if len(by_batch) > 2:
            since = min(_ts(c) for c in watched) - 60
            self.telemetry.poll_call()
            async for batch in api.recent(since=since):
                if batch.id in by_batch:
                    found[batch.id] = batch
                    if len(found) == len(by_batch):
                        break
        for batch_id, chunk in by_batch.items():
            if batch_id not in found:
                retrieved = await self._retrieve(chunk)
                if retrieved is None:
                    await self._not_found(chunk)
                    continue
                found[batch_id] = retrieved
        for batch_id, batch in found.items():
            self._missing_since.pop(batch_id, None)
            if batch.processing_status == "ended":
                await self._ended(by_batch[batch_id], batch)

    async def _not_found(self, chunk: ChunkState) -> None:
        """
        A 404 just after create or end is a known transient. Past the window the batch is
        lost (an API that forgot it, a batch deleted elsewhere): one alarm, and the chunk
        ends with its rows dead-lettered as ``batch_lost`` (resent only if the operator
        says so, since sending again costs again) instead of an alarm every window.
        """
        assert chunk.batch_id is not None
        first = self._missing_since.setdefault(chunk.batch_id, time.monotonic())
        window = self.api_config.not_found_window
        if time.monotonic() - first <= window:
            return
        await self.alarms.alarm(
            "batch_not_found",
            f"batch {chunk.batch_id} has answered 404 for over {window:.0f}s: the API no "
            f"longer knows it; its {chunk.requests} rows are dead-lettered as batch_lost "
            "(`batchd dead-letters retry` sends them again, paid again). If the API key "
            "changed workspace, put the old key back before restarting",
            chunk=chunk.chunk,
        )
        self._missing_since.pop(chunk.batch_id, None)
        counts = {"succeeded": 0, "errored": 0, "canceled": 0, "expired": 0, "processing": 0,
                  "lost": chunk.requests}
        await self._ended_record(
            Ended(chunk=chunk.chunk, batch_id=chunk.batch_id, counts=counts)
        )
        event = self._events.pop(chunk.chunk, None)
        if event is not None:
            event.set()

    async def _ended(self, chunk: ChunkState, batch: Any) -> None:
        counts = _counts(batch)
        total = sum(counts.values())
        if total != chunk.requests or counts["processing"]:
            await self.alarms.alarm(
                "reconciliation",
                f"batch {batch.id} ended with counts {counts} summing to {total}, "
                f"but chunk {chunk.chunk} sent {chunk.requests}",
                chunk=chunk.chunk,
            )
        if await self._ended_record(
            Ended(chunk=chunk.chunk, batch_id=batch.id, counts=counts)
        ):
            crash_point("after_ended")
            log.info("batch ended", pipeline=self.name, chunk=chunk.chunk, batch_id=batch.id,
                     **counts)
        event = self._events.pop(chunk.chunk, None)  # fenced too: the driver reads again
        if event is not None:
            event.set()

    async def _ended_record(self, record: Ended) -> bool:
        if self._record_ended is None:
            await self.manifest.append(record)
            return True
        return await self._record_ended(record)


def _ts(chunk: ChunkState) -> float:
    try:
        return timestamp(chunk.created_at)
    except (TypeError, ValueError):
        return time.time() - 86400 * 30
