"""
MirroredStore: a cluster store with a local, synchronous view of its state.

The runtime reads ``manifest.state`` synchronously in many places (the driver's
stage, the runner's families and watermark, the poller's watch list, the queue
limit). On one daemon that view is the manifest's own replay state. In cluster
mode the truth is the PostgreSQL rows, so instead of turning every read into an
awaited store call, this proxy keeps ``state``: a :class:`ManifestState` read
with :meth:`PgStore.snapshot`, refreshed after every record this worker writes
(so a driver reads its own transitions at once) and every poll interval (so
other workers' transitions are seen within one poll). It stands where the
runtime expects a manifest for reads; every record still goes through the store.

Decisions that must not act on a stale view read the store itself: the create
path re-reads its chunk with :meth:`PgStore.chunk` under the create slot, and
every transition is fenced by the store (lease epoch and expected stage).
"""

from __future__ import annotations

from typing import Any

import anyio

from batchd.daemon.store.contract import Applied, ChunkLease, CreateSlot, StateStore
from batchd.daemon.wal.manifest_state import ManifestState

__all__ = ("MirroredStore",)


class MirroredStore:
    """Forwards to *store*; keeps :attr:`state` as fresh as this worker's own writes."""

    def __init__(self, store: StateStore) -> None:
        self.inner = store
        self.state = ManifestState()
        self._lock = anyio.Lock()
        self._wanted = 0  # refreshes asked for; one read serves every ask before it
        self._done = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    @property
    def worker_id(self) -> str:
        return self.inner.worker_id

    async def refresh(self) -> None:
        """Read the rows again (one read serves every caller that asked meanwhile)."""
        self._wanted += 1
        wanted = self._wanted
        async with self._lock:
            if self._done >= wanted:
                return
            target = self._wanted
            self.state = await self.inner.snapshot()
            self._done = target

    async def _after(self, applied: Applied | None) -> None:
        if applied is not None and applied.written:
            await self.refresh()

    async def append(self, record: Any, /, **kwargs: Any) -> Applied:
        applied = await self.inner.append(record, **kwargs)
        await self._after(applied)
        return applied

    async def record_intent(self, slot: CreateSlot, lease: ChunkLease, requests: int, *,
                            queue_scope: str | None = None) -> Applied | None:
        applied = await self.inner.record_intent(slot, lease, requests, queue_scope=queue_scope)
        await self._after(applied)
        return applied

    async def record_submitted(self, slot: CreateSlot, lease: ChunkLease, batch_id: str,
                               created_at: str) -> Applied:
        applied = await self.inner.record_submitted(slot, lease, batch_id, created_at)
        await self._after(applied)
        return applied
