"""
MirroredStore: a cluster store with a local, synchronous view of its state.

The runtime reads ``manifest.state`` synchronously in many places (the driver's
stage, the runner's families and watermark, the poller's watch list, the queue
limit). On one daemon that view is the manifest's own replay state. In cluster
mode the truth is the PostgreSQL rows, so instead of turning every read into an
awaited store call, this proxy keeps ``state``: a :class:`ManifestState` read once
in full (:meth:`PgStore.snapshot_seqs`), then kept up to date by replaying the
cluster's event log through the same ``ManifestState.apply`` the single daemon
replays its manifest with: after every record this worker writes (so a driver
reads its own transitions at once) and every poll (so other workers' transitions
are seen within one poll). It stands where the runtime expects a manifest for
reads; every record still goes through the store.

Each refresh reads only the events after the last one seen (:meth:`PgStore.events`),
so its cost is what changed, not the size of the cluster's history (a full
snapshot per write made every transition O(chunks ever sealed)). A record this
worker wrote is applied from its own ``Applied`` without a read when it is the
very next seq.

Seqs are taken inside transactions, so seq 12 can be visible before 11 commits.
Per pipeline that cannot happen (a record takes its seq under its pipeline's row
lock), so a skipped seq belongs to another pipeline, an alarm, or a transaction
that rolled back: it is asked for again on every refresh until it shows up, or
until it is older than any transaction can stay open (past the lease TTL and the
grace the server or a survivor ends a silent worker's session); then the view is
read in full once more, in case. A full read also happens every ``resync_every``
seconds as a backstop.

Decisions that must not act on a stale view read the store itself: the create
path re-reads its chunk with :meth:`PgStore.chunk` under the create slot, and
every transition is fenced by the store (lease epoch and expected stage).
"""

from __future__ import annotations

import time
from typing import Any

import anyio
import structlog

from batchd.daemon.cluster.pipeline_import import KIND as IMPORTED
from batchd.daemon.cluster.pipeline_import import merge as merge_imported
from batchd.daemon.store.contract import Applied, ChunkLease, CreateSlot, StateStore
from batchd.daemon.wal.manifest_state import ManifestCorrupt, ManifestState

__all__ = ("MirroredStore",)

log = structlog.get_logger("batchd.cluster")

# Seqs below a full read's that are checked for being missing (transactions open then).
_WINDOW = 2000
_RESYNC_EVERY = 600.0
_PAGE = 5000  # events per read


class MirroredStore:
    """Forwards to *store*; keeps :attr:`state` as fresh as this worker's own writes."""

    def __init__(self, store: StateStore, *, gap_horizon: float | None = None,
                 resync_every: float = _RESYNC_EVERY) -> None:
        self.inner = store
        self.state = ManifestState()
        self._lock = anyio.Lock()
        self._wanted = 0  # refreshes asked for; one read serves every ask before it
        self._done = 0
        self._seen = 0  # the highest seq applied
        self._missing: dict[int, float] = {}  # seq below _seen not seen yet -> when skipped
        self._abandoned: set[int] = set()  # missing past the horizon: rolled back
        if gap_horizon is None:
            ttl = float(getattr(store, "lease_ttl", 30.0))
            gap_horizon = ttl + float(getattr(store, "grace", 30.0)) + ttl / 3 + 5.0
        self._horizon = gap_horizon
        self._resync_every = resync_every
        self._synced_at: float | None = None  # monotonic time of the last full read
        self.full_reads = 0  # how often the view was read in full (tests, the bench)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    @property
    def worker_id(self) -> str:
        return self.inner.worker_id

    @property
    def missing(self) -> list[int]:
        """Seqs skipped because they were not committed yet (asked for at every refresh)."""
        return sorted(self._missing)

    async def refresh(self) -> None:
        """Read what changed (one read serves every caller that asked meanwhile)."""
        self._wanted += 1
        wanted = self._wanted
        async with self._lock:
            if self._done >= wanted:
                return
            target = self._wanted
            await self._catch_up()
            self._done = target

    async def _catch_up(self) -> None:
        now = time.monotonic()
        expired = [seq for seq, at in self._missing.items() if now - at > self._horizon]
        if (self._synced_at is None or expired
                or now - self._synced_at > self._resync_every):
            if expired:
                log.debug("events never committed; reading the view in full", seqs=expired[:5])
                self._abandoned.update(expired)
            await self._read_all()
            return
        events = self.inner.events  # type: ignore[attr-defined]  # PgStore's
        while True:
            records = await events(self._seen, sorted(self._missing), limit=_PAGE)
            if not self._apply(records):
                await self._read_all()
                return
            if len(records) < _PAGE:
                return

    async def _read_all(self) -> None:
        state, present = await self.inner.snapshot_seqs(_WINDOW)  # type: ignore[attr-defined]
        now = time.monotonic()
        seen = set(present)
        self.state = state
        self._seen = state.seq
        floor = max(1, state.seq - _WINDOW + 1)
        self._abandoned = {s for s in self._abandoned if s >= floor}
        self._missing = {s: now for s in range(floor, state.seq)
                         if s not in seen and s not in self._abandoned}
        self._synced_at = now
        self.full_reads += 1

    def _apply(self, records: list[dict[str, Any]]) -> bool:
        """Apply records in seq order, noting skipped seqs; False if the view went wrong."""
        now = time.monotonic()
        for record in records:
            seq = record["seq"]
            if seq in self._missing:
                del self._missing[seq]
            elif seq <= self._seen:
                continue  # applied already (this worker's own, or read twice)
            else:
                for skipped in range(self._seen + 1, seq):
                    self._missing[skipped] = now
                self._seen = seq
            try:
                if record["kind"] == IMPORTED:  # a single daemon's pipeline moved in
                    merge_imported(self.state, seq, record)
                else:
                    self.state.apply(record)
            except ManifestCorrupt as exc:  # not expected: the log replays to the rows
                log.warning("the cluster's event log does not replay on this view; "
                            "reading it in full", error=str(exc))
                return False
        return True

    async def _after(self, applied: Applied | None) -> None:
        if applied is None or not applied.written:
            return
        record = applied.record
        if (record is not None and not self._lock.locked() and self._synced_at is not None
                and record.get("seq") == self._seen + 1):
            async with self._lock:  # free: nothing awaits before the apply
                if record["seq"] == self._seen + 1 and self._apply([record]):
                    return
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
