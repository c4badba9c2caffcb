"""
The processing queue the API grants, shared by every pipeline of the daemon.

The API counts the batch requests not yet processed across all batches of the
workspace and refuses a create that would pass the tier's limit (Start 200,000,
Build 300,000, Scale 500,000) with a 429. Waiting for room *before* the create
keeps the queue full without those 429s: a chunk is not submitted while the
requests in flight plus its own would pass the limit. "In flight" is read from
the manifest (chunks announced for create or submitted and not yet seen ended),
so it is exact across pipelines and restarts, and conservative by at most one
poll: a batch that ended but was not yet polled still counts.

A chunk larger than the whole limit is sent alone once nothing else is in
flight, rather than never.

In cluster mode the limit is the shared ``queue:<workspace>`` counter instead
(reserved at each chunk's intent, released at its ``ended``); what others use of
the workspace's queue is read from the API every few minutes
(:func:`processing_requests`) and set on the counter.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import anyio

from batchd.daemon.config import TIER_QUEUE_LIMITS, ApiConfig
from batchd.daemon.ops.lazy_log import LazyLogger
from batchd.daemon.wal.manifest import Manifest
from batchd.daemon.wal.manifest_state import Stage

if TYPE_CHECKING:  # status imports this module: it must not pull the HTTP client in
    from batchd.daemon.batches.api import BatchesApi

__all__ = ("DEFAULT_TIER", "QueueLimit", "processing_requests", "queue_limit_of")

log = LazyLogger("batchd.queue")  # status replays without importing structlog

#: The tier assumed when the config names none: the smallest documented one.
DEFAULT_TIER = "start"
_IN_QUEUE = (Stage.INTENT, Stage.SUBMITTED)
_RECHECK = 1.0  # seconds between looks at the manifest while waiting, if not notified
# A batch is processed or expires within 24 h of its creation; the margin covers clock skew.
_PROCESSING_WINDOW = 26 * 3600.0
_PAGE = 1000  # the list endpoint's largest page


def queue_limit_of(api: ApiConfig) -> tuple[int, str]:
    """The limit in force and where it comes from (for the start-up log and status)."""
    if api.queue_limit is not None:
        return api.queue_limit, "[api] queue_limit"
    tier = api.tier or DEFAULT_TIER
    origin = f"tier {tier}" + ("" if api.tier else " (default; set [api] tier)")
    return TIER_QUEUE_LIMITS[tier], origin


class QueueLimit:
    """Admits a create only while the requests in flight plus its own fit the limit."""

    def __init__(self, limit: int, manifest: Manifest) -> None:
        self.limit = limit
        self.manifest = manifest
        self.waits = 0  # creates that had to wait for room (for tests and the log)
        self._changed = anyio.Event()
        # Chunks waiting, first come first served: the source commit advances in read
        # order, so a later chunk overtaking earlier ones only delays it.
        self._line: list[str] = []

    def notify(self) -> None:
        """A batch ended (or a create failed): waiters look again."""
        self._changed.set()
        self._changed = anyio.Event()

    def in_flight(self) -> int:
        """Requests of every pipeline's chunks that are being created or are submitted."""
        return sum(c.requests for c in self.manifest.state.chunks.values() if c.stage in _IN_QUEUE)

    def fits(self, requests: int) -> bool:
        used = self.in_flight()
        return used == 0 or used + requests <= self.limit

    async def wait_room(self, requests: int, *, pipeline: str, chunk: str) -> None:
        """Return once ``requests`` more fit the queue (re-check under the create lock)."""
        if not self._line and self.fits(requests):
            return
        me = f"{pipeline}/{chunk}"
        self.waits += 1
        log.info("waiting for room in the API's processing queue", pipeline=pipeline,
                 chunk=chunk, requests=requests, in_flight=self.in_flight(), limit=self.limit)
        self._line.append(me)
        try:
            while not (self._line[0] == me and self.fits(requests)):
                with anyio.move_on_after(_RECHECK):  # a missed notify costs at most this
                    await self._changed.wait()
        finally:
            self._line.remove(me)
            self.notify()  # the next in line may fit too


async def processing_requests(api: BatchesApi) -> int:
    """
    The workspace's requests in the API's processing queue now: the sum of
    ``request_counts.processing`` over every batch still in progress (or canceling),
    listed newest first back to the oldest one that can still be processing.
    """
    total = 0
    since = time.time() - _PROCESSING_WINDOW
    async for batch in api.recent(since, page_size=_PAGE):
        if batch.processing_status != "ended" and batch.created_at.timestamp() >= since:
            total += batch.request_counts.processing
    return total
