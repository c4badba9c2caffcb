"""
The stray sweeper: cancel and alarm a batch that a chunk's resend made redundant.

A create whose outcome is unknown is settled by listing the API's batches (adopt the
match, or send again after two empty lists 15 s apart). One case survives that: the
dead or paused holder's create was still in flight (its last bytes sent, or about to
be, past its lease deadline) and its batch appears only after the survivor sent the
chunk again. Two batches then carry the same requests; the store records one. That
late one is a *stray*: it is paid, and nothing would ever collect it.

One worker per workspace sweeps: the holder of a lease on the ``shard`` row
``("workspace:<workspace>", "stray_sweeper")`` (the shard machinery: a new epoch per
taker, taken from a dead holder after its TTL and grace). Pipeline names cannot hold a
colon, so the row never meets a real pipeline's shard. Each pass:

1. Reads the *intent windows* of chunks that were announced more than once
   (``intent_count >= 2``: only a resend can leave a second batch), from their first
   intent to ``LATE`` seconds after their last one. With none, no API call is made.
2. Lists the API's batches back to the oldest window's start.
3. Then, in one snapshot (after the list, so a batch listed while its chunk was still
   at ``intent`` is seen recorded, or its chunk still at ``intent``), reads which of
   the listed batches a chunk records and which chunks are at ``intent``.
4. A listed batch is a stray when no chunk records it, its request count is a resent
   chunk's and it was created inside that chunk's window, and no chunk at ``intent``
   of that size could still adopt it (created after that intent, less ``MARGIN``):
   a batch a chunk records or might still adopt is never touched.
5. Cancels it (if still in progress) and records the alarm ``stray_batch`` naming the
   batch and the chunk, once (an alarm already in the event log is not repeated).

Times: intents are stamped on the database's clock, batches on the API's; the pass
converts with ``SELECT clock_timestamp()`` and the API's ``Date`` header.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import structlog

from batchd.daemon.cluster.schema import Sql
from batchd.daemon.cluster.shards import ShardLease

__all__ = (
    "LATE",
    "LEASE_SHARD",
    "MARGIN",
    "IntentWindow",
    "Listed",
    "Stray",
    "StraySweeper",
    "Windows",
    "find_strays",
    "lease_pipeline",
    "read_windows",
    "resent_since",
)

log = structlog.get_logger("batchd.cluster")

LEASE_SHARD = "stray_sweeper"
# How long after a chunk's last intent a late create of it may still land: the API's
# request timeout (600 s) bounds how long it waits for a create's body.
LATE = 600.0
# Clock slack (Date has whole seconds, a response takes time) on every comparison.
MARGIN = 10.0
# Windows whose last intent is older than this are not looked at again.
LOOKBACK = 3600.0


def lease_pipeline(workspace: str) -> str:
    """The ``shard.pipeline`` value of a workspace's sweeper lease (not a pipeline name)."""
    return f"workspace:{workspace}"


@dataclass(frozen=True)
class IntentWindow:
    """A resent chunk: a batch of its size created in [opens, closes] (DB clock) may be its."""

    chunk: str
    pipeline: str
    requests: int
    opens: float  # the first intent
    closes: float  # the last intent + LATE
    batch_id: str | None  # the batch it records


@dataclass(frozen=True)
class Windows:
    """What one pass reads from the store, in one snapshot."""

    resent: tuple[IntentWindow, ...]
    at_intent: tuple[tuple[str, int, float], ...]  # (chunk, requests, intent_at) still open
    known: frozenset[str]  # listed batch ids some chunk records


@dataclass(frozen=True)
class Listed:
    """A batch as the API listed it (created_at on the API's clock)."""

    batch_id: str
    created_at: float
    requests: int
    status: str


@dataclass(frozen=True)
class Stray:
    """A batch nobody records, inside a resent chunk's window."""

    batch_id: str
    chunk: str
    pipeline: str
    created_at: float
    status: str


async def resent_since(conn: Any, sql: Sql, since: float) -> float | None:
    """The first intent of the oldest chunk resent after *since* (DB clock), or None."""
    value = await conn.fetchval(
        sql("SELECT min(intent_at) FROM {s}.chunk WHERE intent_count >= 2"
            " AND last_intent_at >= $1"),
        since,
    )
    return None if value is None else float(value)


async def read_windows(conn: Any, sql: Sql, since: float, batch_ids: Sequence[str]) -> Windows:
    """The windows, the chunks at intent and the recorded batches, in one snapshot."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        resent = await conn.fetch(
            sql("SELECT chunk, pipeline, requests, intent_at, last_intent_at, batch_id"
                " FROM {s}.chunk WHERE intent_count >= 2 AND last_intent_at >= $1"),
            since,
        )
        open_ = await conn.fetch(
            sql("SELECT chunk, requests, intent_at FROM {s}.chunk WHERE stage = 'intent'")
        )
        known = await conn.fetch(
            sql("SELECT batch_id FROM {s}.chunk WHERE batch_id = ANY($1::text[])"),
            list(batch_ids),
        )
    return Windows(
        tuple(IntentWindow(r["chunk"], r["pipeline"], r["requests"], r["intent_at"],
                           r["last_intent_at"] + LATE, r["batch_id"]) for r in resent),
        tuple((r["chunk"], r["requests"], r["intent_at"] or 0.0) for r in open_),
        frozenset(r["batch_id"] for r in known),
    )


def find_strays(listed: Sequence[Listed], windows: Windows, api_minus_db: float, *,
                margin: float = MARGIN) -> list[Stray]:
    """
    The listed batches that are strays (see the module docstring, step 4).

    *api_minus_db* converts the store's times to the API's. Among several windows that
    hold a stray, the one announced last names the chunk.
    """
    strays = []
    for batch in listed:
        if batch.batch_id in windows.known:
            continue
        at = batch.created_at - api_minus_db  # on the database's clock
        adoptable = any(requests == batch.requests and at >= intent_at - margin
                        for _, requests, intent_at in windows.at_intent)
        if adoptable:
            continue  # a chunk still at intent may yet take it: its own resolution decides
        holders = [w for w in windows.resent if w.requests == batch.requests
                   and w.opens - margin <= at <= w.closes + margin]
        if holders:
            window = max(holders, key=lambda w: w.closes)
            strays.append(Stray(batch.batch_id, window.chunk, window.pipeline,
                                batch.created_at, batch.status))
    return strays


async def _alarmed(conn: Any, sql: Sql, batch_id: str) -> bool:
    """Whether a stray_batch alarm naming *batch_id* is in the event log already."""
    found = await conn.fetchval(
        sql("SELECT 1 FROM {s}.event WHERE kind = 'alarm'"
            " AND record->>'alarm_kind' = 'stray_batch' AND strpos(record::text, $1) > 0"
            " LIMIT 1"),
        batch_id,
    )
    return found is not None


async def _still_held(conn: Any, sql: Sql, lease: ShardLease) -> bool:
    found = await conn.fetchval(
        sql("SELECT 1 FROM {s}.shard WHERE pipeline = $1 AND shard = $2 AND owner = $3"
            " AND epoch = $4"),
        lease.pipeline, lease.shard, lease.owner, lease.epoch,
    )
    return found is not None


class StraySweeper:
    """
    One worker's sweeper loop: takes the workspace's sweeper lease, then sweeps.

    Args:
        store: the worker's ``PgStore`` (its pool, clock, lease and alarms).
        api: the worker's ``BatchesApi`` (list, clock skew, cancel).
        workspace: ``[cluster] workspace``.
        interval: seconds between passes (and between tries for the lease).
        on_alarm: told (pipeline, alarm kind) of each alarm raised, for the metrics.
    """

    def __init__(self, store: Any, api: Any, workspace: str, *, interval: float,
                 on_alarm: Callable[[str, str], None] | None = None) -> None:
        self.store = store
        self.on_alarm = on_alarm
        self.api = api
        self.workspace = workspace
        self.interval = interval
        self.lease: ShardLease | None = None

    async def run(self) -> None:
        """Sweep every *interval* while holding the lease; a failed pass is tried again."""
        while True:
            try:
                if self.lease is None:
                    self.lease = await self.store.acquire_shard(
                        lease_pipeline(self.workspace), LEASE_SHARD)
                    if self.lease is not None:
                        log.info("stray sweeper: this worker sweeps the workspace",
                                 workspace=self.workspace, epoch=self.lease.epoch)
                if self.lease is not None:
                    await self.sweep_once()
            except anyio.get_cancelled_exc_class():
                raise
            except Exception as exc:  # the database or the API away: next pass
                log.warning("stray sweep failed; will sweep again",
                            error=f"{type(exc).__name__}: {exc}")
            await anyio.sleep(self.interval)

    async def sweep_once(self) -> list[Stray]:
        """One pass (the module docstring's steps); returns the strays it handled."""
        store, sql = self.store, self.store.sql
        lease = self.lease
        if lease is None:
            return []
        async with store.connection() as conn:  # one connection for the common, idle pass
            if not await _still_held(conn, sql, lease):
                self.lease = None
                return []
            sent = time.time()
            db_now = float(await conn.fetchval(
                "SELECT extract(epoch FROM clock_timestamp())::float8"))
            db_skew = db_now - (sent + time.time()) / 2
            oldest = await resent_since(conn, sql, db_now - LOOKBACK)
        if oldest is None:
            return []  # no resend lately: nothing can be a stray, and no API call
        api_skew = await self.api.clock_skew()
        api_minus_db = (api_skew or 0.0) - db_skew
        listed = []
        async for batch in self.api.recent(since=oldest + api_minus_db - MARGIN):
            counts = batch.request_counts
            total = int(counts.processing + counts.succeeded + counts.errored
                        + counts.canceled + counts.expired)
            listed.append(Listed(batch.id, _ts(batch.created_at), total,
                                 str(batch.processing_status)))
        async with store.connection() as conn:
            windows = await read_windows(conn, sql, db_now - LOOKBACK,
                                         [b.batch_id for b in listed])
        handled: list[Stray] = []
        for stray in find_strays(listed, windows, api_minus_db):
            async with store.connection() as conn:
                if await _alarmed(conn, sql, stray.batch_id):
                    continue
                if not await _still_held(conn, sql, lease):
                    self.lease = None
                    return handled
            store.deadline.check("cancel a stray batch")
            await self._cancel_and_alarm(stray)
            handled.append(stray)
        return handled

    async def _cancel_and_alarm(self, stray: Stray) -> None:
        from batchd.daemon.wal.records import AlarmRaised

        status = stray.status
        if status == "in_progress":
            status = str((await self.api.cancel(stray.batch_id)).processing_status)
            what = f"cancelled it (now {status})"
        else:
            what = (f"it had already {status} (its requests were processed and are billed; "
                    "nothing collects them)")
        message = (f"stray batch {stray.batch_id}: a late create of chunk {stray.chunk}, which "
                   "was sent again and records another batch (a create still in flight when "
                   f"its worker lost its lease); {what}")
        log.error("alarm", alarm="stray_batch", message=message, chunk=stray.chunk,
                  batch_id=stray.batch_id)
        await self.store.append(AlarmRaised(pipeline=stray.pipeline, chunk=stray.chunk,
                                            alarm_kind="stray_batch", message=message))
        if self.on_alarm is not None:
            self.on_alarm(stray.pipeline, "stray_batch")


def _ts(value: Any) -> float:
    from batchd.daemon.batches.api import timestamp

    return timestamp(value)
