"""
Drives one chunk from its last manifest record to the end of its life.

Every step re-reads the chunk's stage from the manifest and performs the
one action that stage calls for, so recovery after ``kill -9`` is not a
special code path: a restarted daemon simply drives every live chunk again.

    sealed ─submit─▶ intent ─create─▶ submitted ─poll─▶ ended ─collect─▶ committed
                        └─ ambiguous create: adopt the batch if it exists, else submit again

The driver reads what it needs from :class:`DriverDeps` and changes the pipeline's
state only through :class:`RunnerControl` (pause, alarm, wait while paused);
:meth:`ChunkDriver.run` returns an :mod:`outcome <batchd.daemon.batches.outcomes>`
(committed with its retry chunk, rate-limited, held, retired) for the runner to act on.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import structlog

from batchd.daemon.batches.api import created_at_ts
from batchd.daemon.batches.api_errors import NotFoundError
from batchd.daemon.batches.control import RunnerControl
from batchd.daemon.batches.driver_deps import DriverDeps
from batchd.daemon.batches.error_codes import Action, classify_error
from batchd.daemon.batches.outcomes import Committed, Held, Lost, Outcome, RateLimited, Retired
from batchd.daemon.batches.reconcile import FoundBatch, Unattributable
from batchd.daemon.cluster.create_slot import RESEND_AFTER
from batchd.daemon.intake.spool_check import set_aside_damaged, spool_damage
from batchd.daemon.intake.spool_rebuild import give_up_spool, rebuild_spool
from batchd.daemon.results.collector import CollectSummary, WrongAdoption
from batchd.daemon.results.sink_failures import RETRY_CAP, SinkFailed
from batchd.daemon.store.contract import Applied, ChunkLease, CreateSlot, SpoolCorrupt, SpoolDigest
from batchd.daemon.wal.chunk_ids import root_of
from batchd.daemon.wal.manifest import crash_point
from batchd.daemon.wal.manifest_state import ChunkState, Stage
from batchd.daemon.wal.records import (
    Ended,
    PauseKind,
    Record,
    ResultsCommitted,
    SubmitIntent,
    Submitted,
)
from batchd.plugins.backoff import Backoff
from batchd.plugins.errors import FatalError

__all__ = ("ChunkDriver",)

log = structlog.get_logger("batchd.chunk")

# How far a server clock may trail ours when looking for a batch created after an intent.
_CLOCK_SLACK = 600.0
_SKEW_MARGIN = 3.0  # Date has whole seconds; plus the time a response takes


async def _no_results() -> AsyncIterator[list[bytes]]:
    """An empty results stream: every request counts as missing and is retried."""
    return
    yield


class _Stop(Exception):
    """Ends :meth:`ChunkDriver.run` from deep in a step with an outcome for the runner."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome)
        self.outcome = outcome


def _total(counts: Any) -> int:
    return int(
        counts.processing + counts.succeeded + counts.errored + counts.canceled + counts.expired
    )


class ChunkDriver:
    """The per-chunk state machine: reads its deps, acts through its control."""

    def __init__(self, deps: DriverDeps, control: RunnerControl, chunk_id: str,
                 lease: ChunkLease | None = None) -> None:
        self.deps = deps
        self.control = control
        self.chunk_id = chunk_id
        # What fences this driver's records: the claim's lease (epoch 0 on LocalStore,
        # whose state dir flock is the fence).
        self.lease = lease or ChunkLease(chunk_id, deps.store.worker_id, 0)
        self.name = deps.pipeline.name
        self.log = log.bind(pipeline=self.name, chunk=chunk_id)
        self._missing_since: float | None = None
        self._streaks: dict[str, int] = {}  # transient codes retried in a row
        self._summary: CollectSummary | None = None  # the collect this driver committed
        # The adoption window of the intent being settled: ((chunk, intent_at), API time).
        self._window: tuple[tuple[str, float], float] | None = None
        self._listed = (0.0, 0.0)  # API-clock start and end of the last list of batches
        self._retry_lease: ChunkLease | None = None  # on the retry chunk that collect cut

    def _chunk(self) -> ChunkState | None:
        return self.deps.manifest.state.chunks.get(self.chunk_id)

    def _lease_for(self, chunk_id: str) -> ChunkLease:
        if chunk_id == self.chunk_id:
            return self.lease
        return ChunkLease(chunk_id, self.lease.owner, self.lease.epoch)

    async def _append(self, record: Record, expected: Stage | tuple[Stage, ...],
                      spool: SpoolDigest | None = None) -> Applied:
        """
        Record one of a chunk's transitions through the store, under its lease.

        A fenced record (the lease was lost, or the chunk is no longer at *expected*)
        wrote nothing: for this driver's own chunk the run ends quietly with
        :class:`Lost`; for another chunk (a pending intent it settles) the caller sees
        ``Applied.fenced``.
        """
        chunk_id = record.to_fields()["chunk"]
        applied = await self.deps.store.append(record, lease=self._lease_for(chunk_id),
                                               expected=expected, spool=spool)
        self._fenced(applied, record.KIND, chunk_id)
        return applied

    def _fenced(self, applied: Applied, kind: str, chunk_id: str) -> None:
        if applied.fenced is not None:
            self.log.info("record fenced: the chunk is no longer ours", record=kind,
                          chunk_fenced=chunk_id, why=applied.fenced)
            if chunk_id == self.chunk_id:
                raise _Stop(Lost(self.chunk_id, applied.fenced))

    async def run(self) -> Outcome:
        """
        Drive the chunk until its results are committed (or it is gone, held, or a
        create is refused for now); returns what happened for the runner to act on.
        Call again after :class:`RateLimited`: the streak of refusals is kept.
        """
        backoff = Backoff(1.0, 60.0)
        deps, control = self.deps, self.control
        while True:
            chunk = self._chunk()
            if chunk is None and deps.workspace is not None:
                # Claimed before the local view has read it: the store knows.
                chunk = await deps.store.chunk(self.chunk_id)
            if chunk is None:
                return Retired(self.chunk_id)
            try:
                if chunk.stage is Stage.SEALED:
                    if chunk.requests == 0:
                        await self.collect(chunk)
                    else:
                        await self.submit(chunk)
                elif chunk.stage is Stage.INTENT:
                    await self.resolve_intent(chunk)
                elif chunk.stage is Stage.SUBMITTED:
                    await deps.poller.wait_ended(chunk)
                    if deps.queue is not None:
                        deps.queue.notify()
                elif chunk.stage is Stage.ENDED:
                    await self.collect(chunk)
                else:
                    summary = self._summary
                    retry = summary.retry_chunk if summary is not None else None
                    return Committed(chunk.chunk, summary, retry.chunk if retry else None,
                                     self._retry_lease)
                backoff.reset()
            except _Stop as stop:
                return stop.outcome
            except FatalError:
                raise
            except SinkFailed as exc:
                await control.sink_failed(str(exc))
                delay = min(backoff.next_delay(), RETRY_CAP)
                self.log.warning("sink write failed; will retry", stage=str(chunk.stage),
                                 error=str(exc), retry_in=round(delay, 1))
                await anyio.sleep(delay)
            except Exception as exc:
                deps.telemetry.api_error(type(exc).__name__)
                delay = backoff.next_delay()
                self.log.warning("step failed; will retry", stage=str(chunk.stage),
                                 error=f"{type(exc).__name__}: {exc}", retry_in=round(delay, 1))
                await anyio.sleep(delay)

    # -- submitting ------------------------------------------------------------

    async def submit(self, chunk: ChunkState) -> None:
        deps = self.deps
        await self.control.wait_unpaused()
        if not await self._ensure_spool(chunk):
            return
        if deps.workspace is not None:
            await self._create_in_cluster()
            return
        if deps.reconciler is not None:
            await deps.reconciler.ready.wait()
        queue = deps.queue
        if queue is not None:
            await queue.wait_room(chunk.requests, pipeline=self.name, chunk=chunk.chunk)
        async with deps.create_lock:
            current = self._chunk()
            if current is None or current.stage is not Stage.SEALED:
                return
            if queue is not None and not queue.fits(current.requests):
                return  # another create took the room while we waited for the lock
            if self.control.submissions_blocked:
                return  # paused while we waited
            await self._create(current)

    def _latest_intent(self) -> ChunkState | None:
        """
        The chunk whose intent was written last, if it is still waiting on it.

        Creates are serialised by the create lock and each is announced by
        its own intent, so only the chunk with the latest intent can own a
        batch that nobody has recorded: every earlier create either
        returned, failed for certain, or was resolved before the next intent.
        """
        latest: ChunkState | None = None
        for other in self.deps.manifest.state.chunks.values():
            if other.last_intent_at is not None and (
                latest is None or other.last_intent_at > (latest.last_intent_at or 0.0)
            ):
                latest = other
        return latest if latest is not None and latest.stage is Stage.INTENT else None

    async def _create(self, chunk: ChunkState) -> None:
        deps = self.deps
        pending = self._latest_intent()
        if pending is not None and pending.chunk != chunk.chunk:
            # Settle the one create that may have an unrecorded batch before a new intent
            # makes it impossible to tell whose that batch is.
            await self._adopt(pending)
        reconciler = deps.reconciler
        if reconciler is not None:
            if not reconciler.ready.is_set():
                return  # the caller waits for it outside the create lock, then comes back
            try:
                adopt = await reconciler.clearance(chunk, deps.spool_path(chunk.chunk))
            except Unattributable as exc:
                await self.control.pause(f"unknown_batches: {exc}", alarm_kind="unknown_batches",
                                   kind=PauseKind.UNKNOWN_BATCHES, chunk=chunk.chunk)
                return
            if adopt is not None:
                await self._record_adoption(chunk, adopt)
                return
        await self._append(
            SubmitIntent(chunk=chunk.chunk, at=time.time(), requests=chunk.requests),
            (Stage.SEALED, Stage.INTENT),
        )
        crash_point("after_intent")
        try:
            batch = await deps.api.create(deps.spool_path(chunk.chunk), chunk.bytes)
        except Exception as exc:
            await self._create_failed(chunk, exc)
            return
        crash_point("after_create")
        await self._append(
            Submitted(chunk=chunk.chunk, batch_id=batch.id, created_at=str(batch.created_at)),
            Stage.INTENT,
        )
        self.log.info("batch submitted", batch_id=batch.id, requests=chunk.requests,
                      bytes=chunk.bytes)

    async def _create_failed(self, chunk: ChunkState, exc: Exception) -> None:
        """Pause, wait and retry, or look for the batch: what the error's code says (§6)."""
        decision = classify_error(exc)
        error = f"{type(exc).__name__}: {exc}"
        status = getattr(exc, "status_code", None)
        self.deps.telemetry.api_error(f"{status}:{decision.code}" if status else decision.code)
        if decision.action is Action.RETRY:
            streak = self._streaks[decision.code] = self._streaks.get(decision.code, 0) + 1
            if decision.pause_after is None or streak < decision.pause_after:
                wait = decision.retry_after if decision.retry_after is not None else 5.0
                self.log.warning("create refused for now; waiting", code=decision.code,
                                 why=decision.advice, retry_after=wait, error=error)
                # Waited here, under the create lock, so no other create goes out meanwhile.
                await anyio.sleep(wait)
                raise _Stop(RateLimited(chunk.chunk, decision.code, wait, decision.shrink))
        self._streaks.clear()
        if decision.action in (Action.PAUSE, Action.RETRY, Action.REJECTED):
            await self.control.pause(
                f"{decision.code}: {decision.advice} (chunk {chunk.chunk}: {error})",
                alarm_kind=decision.alarm, kind=PauseKind(decision.kind or decision.alarm),
                chunk=chunk.chunk,
            )
            return
        self.log.warning("create outcome unknown; will look for the batch before resending",
                         error=error)
        await anyio.sleep(decision.retry_after or 1.0)

    async def resolve_intent(self, chunk: ChunkState) -> None:
        """
        The create may have succeeded before we heard of it: adopt that batch
        if one exists, else send the chunk again. Under the create lock, so no
        other create of ours is in flight while we look.
        """
        deps = self.deps
        await self.control.wait_unpaused()
        if deps.workspace is not None:
            if await self._ensure_spool(chunk):
                await self._create_in_cluster()
            return
        async with deps.create_lock:
            current = self._chunk()
            if current is None or current.stage is not Stage.INTENT:
                return  # another driver adopted our batch while we waited for the lock
            latest = self._latest_intent()
            if latest is not None and latest.chunk == current.chunk and await self._adopt(current):
                return
            if deps.reconciler is None or deps.reconciler.ready.is_set():
                if not await self._ensure_spool(current):
                    return
                self.log.info("no batch found for the earlier create; submitting again")
                await self._create(current)
                return
        # Batches the state does not know are still being read: wait (without holding the
        # create lock), then look again; the adopt check runs anew.
        await deps.reconciler.ready.wait()

    async def _window_opens(self, chunk: ChunkState, skew: float | None) -> float:
        """
        When, on the API's clock, a batch of the chunk's first intent can have been made.

        The intent was stamped on the store's clock: this machine's for a state dir, the
        database's (``clock_timestamp()``) in a cluster, whose difference to ours is read
        with ``SELECT clock_timestamp()`` as the API's is read from its ``Date`` header.
        Computed once per intent: a list taken later under a different skew must not
        shift the window past a batch an earlier list could have seen.
        """
        assert chunk.intent_at is not None
        key = (chunk.chunk, chunk.intent_at)
        if self._window is not None and self._window[0] == key:
            return self._window[1]
        if skew is None:
            since = chunk.intent_at - _CLOCK_SLACK
        else:
            measure = getattr(self.deps.store, "db_clock_skew", None)
            store_skew = float(await measure()) if measure is not None else 0.0
            since = chunk.intent_at - store_skew + skew - _SKEW_MARGIN
        self._window = (key, since)
        return since

    async def _adopt(self, chunk: ChunkState, slot: CreateSlot | None = None) -> bool:
        """
        Record the oldest unknown batch of the chunk's size created since its first intent.

        "Since" is read on the API's clock: the skew is measured from a response's Date
        header, so a batch that was already there when we announced the intent (another
        daemon's, or a run before the state directory was wiped) is never taken for ours.
        Only when the API sends no date does the window open ``_CLOCK_SLACK`` wider.
        Leaves :attr:`_listed`: the API-clock times the list began and ended.
        """
        assert chunk.intent_at is not None
        deps = self.deps
        state = deps.manifest.state
        skew = await deps.api.clock_skew()
        since = await self._window_opens(chunk, skew)
        began = time.time() + (skew or 0.0)
        candidates = []
        async for batch in deps.api.recent(since=since):
            if state.is_known_batch(batch.id) or _total(batch.request_counts) != chunk.requests:
                continue
            if slot is not None and await deps.store.batch_owner(batch.id) is not None:
                continue  # another worker's (the local view may not have it yet)
            candidates.append(batch)
        self._listed = (began, time.time() + (skew or 0.0))
        found = None
        spool = deps.spool_path(chunk.chunk)
        for batch in sorted(candidates, key=created_at_ts):
            # Where the reconciler has read a batch's custom_ids (a restored backup: other
            # chunks' batches of the same size exist too), take only one that matches.
            reconciler = deps.reconciler
            if reconciler is not None and spool.exists():
                if await reconciler.holds_exactly(batch.id, chunk, spool) is False:
                    continue
            found = batch
            break
        if found is None:
            return False
        if slot is not None:
            applied = await deps.store.record_submitted(slot, self._lease_for(chunk.chunk),
                                                        found.id, str(found.created_at))
            self._fenced(applied, "submitted", chunk.chunk)
        else:
            applied = await self._append(
                Submitted(chunk=chunk.chunk, batch_id=found.id,
                          created_at=str(found.created_at)),
                Stage.INTENT,
            )
        if applied.fenced is not None:
            return False  # another worker holds that chunk now: it settles its own intent
        self.log.warning("adopted a batch created before a crash or lost response",
                         adopted_for=chunk.chunk, batch_id=found.id, requests=chunk.requests)
        return True

    async def _settle_intent(self, chunk: ChunkState, slot: CreateSlot) -> bool:
        """
        Adopt the batch of the chunk's pending intent; False once sending again is safe.

        The API's list may not show a batch created a moment ago, so one empty list is
        not enough: only a second list begun at least ``RESEND_AFTER`` seconds of API
        time after the first ended lets the chunk be sent again. Meanwhile the slot
        stays held (no create in the workspace could go out before this intent is
        settled anyway) and every wait checks the lease deadline.
        """
        first_empty: float | None = None
        while True:
            if await self._adopt(chunk, slot):
                return True
            began, ended = self._listed
            if first_empty is None:
                first_empty = ended
                self.log.info("no batch found for the earlier create yet; listing again",
                              after_seconds=RESEND_AFTER)
            elif began - first_empty >= RESEND_AFTER:
                return False
            await anyio.sleep(min(1.0, self.deps.api_config.poll_interval))
            self.deps.store.deadline.check("create")

    async def _create_in_cluster(self) -> None:
        """
        One create under the cluster's create slot (cluster mode): settle, announce, send.

        The slot serialises creates across every worker of the workspace, as the create
        lock does in one daemon. A pending intent of another chunk is its owner's to
        settle (a dead holder's chunk is claimed after its TTL and grace, and its driver
        comes here at ``intent``); until then no other create goes out. The chunk is read
        from the store, not the local view: another worker may have moved it.

        Waiting for the slot, for another chunk's pending intent or for room in the queue
        is done with the slot and the create lock released: a waiter holding the slot
        through its wait kept the pending chunk's owner from ever taking it (two drivers
        of one worker taking turns held it nearly all the time).
        """
        backoff = await self._create_under_slot()
        if backoff:
            await anyio.sleep(backoff)

    async def _create_under_slot(self) -> float:
        """:meth:`_create_in_cluster`'s work; returns how long to wait before trying again."""
        deps, store = self.deps, self.deps.store
        assert deps.workspace is not None
        poll = min(1.0, deps.api_config.poll_interval)
        async with deps.create_lock:
            slot = await store.acquire_create_slot(deps.workspace)
            if slot is None:
                return poll
            keep_pending, freed = False, False
            try:
                current = await store.chunk(self.chunk_id)
                if current is None or current.stage not in (Stage.SEALED, Stage.INTENT):
                    return 0.0
                pending = slot.pending
                if pending is not None and pending.chunk != current.chunk:
                    self.log.info("create slot has another chunk's create to settle first",
                                  pending=pending.chunk)
                    keep_pending = True
                    return poll
                if current.stage is Stage.INTENT:
                    keep_pending = True  # until adopted or announced again
                    if await self._settle_intent(current, slot):
                        freed = True
                        return 0.0
                    self.log.info("no batch found for the earlier create in two lists "
                                  f"{RESEND_AFTER:.0f}s apart; submitting again")
                if self.control.submissions_blocked:
                    return 0.0
                store.deadline.check("create")
                applied = await store.record_intent(slot, self.lease, current.requests,
                                                    queue_scope=deps.queue_scope)
                if applied is None:  # the queue is full cluster-wide: later
                    return min(5.0, deps.api_config.poll_interval)
                self._fenced(applied, "submit_intent", current.chunk)
                keep_pending = True
                crash_point("after_intent")
                try:
                    store.deadline.check("create")
                    # Cut at the deadline (the connection dropped): a worker paused past its
                    # lease mid-create finishes nothing, instead of waiting out the API's
                    # timeout; before the last bytes that creates no batch.
                    with anyio.fail_after(max(0.0, store.deadline.remaining())):
                        batch = await deps.api.create(deps.spool_path(current.chunk),
                                                      current.bytes, deadline=store.deadline)
                except Exception as exc:
                    keep_pending = classify_error(exc).action not in (
                        Action.RETRY, Action.PAUSE, Action.REJECTED)
                    await self._create_failed(current, exc)
                    return 0.0
                crash_point("after_create")
                applied = await store.record_submitted(slot, self.lease, batch.id,
                                                       str(batch.created_at))
                freed = True
                self._fenced(applied, "submitted", current.chunk)
                self.log.info("batch submitted", batch_id=batch.id, requests=current.requests,
                              bytes=current.bytes)
                return 0.0
            finally:
                if not freed:
                    with anyio.CancelScope(shield=True):
                        await store.release_create_slot(slot, keep_pending=keep_pending)

    async def _record_adoption(self, chunk: ChunkState, found: FoundBatch) -> None:
        """Take a batch the API has and the state did not know as this chunk's batch."""
        await self._append(
            SubmitIntent(chunk=chunk.chunk, at=time.time(), requests=chunk.requests),
            (Stage.SEALED, Stage.INTENT),
        )
        await self._append(
            Submitted(chunk=chunk.chunk, batch_id=found.batch_id, created_at=found.created_at),
            Stage.INTENT,
        )
        self.log.warning("adopted a batch the state did not know (a restored backup or a "
                         "manifest cut short): its custom_ids are exactly this chunk's",
                         adopted_for=chunk.chunk, batch_id=found.batch_id,
                         requests=chunk.requests)

    # -- lost pieces -------------------------------------------------------------

    async def _ensure_spool(self, chunk: ChunkState) -> bool:
        """
        True once the chunk's spool file exists (rebuilt if it was lost); False when it
        could not be and the chunk's rows were dead-lettered instead (it is committed).
        """
        deps, control = self.deps, self.control
        path = deps.spool_path(chunk.chunk)
        if deps.workspace is not None and not deps.store.spool_held(chunk.chunk):
            # Sealed or cut by another worker, or a file an earlier incarnation of this
            # worker left (perhaps other rows under this id): the store's copy is the chunk.
            try:
                await deps.store.fetch_spool(chunk.chunk)
            except SpoolCorrupt as exc:
                await control.alarm("spool_corrupt", f"chunk {chunk.chunk} is held: {exc}",
                                    chunk=chunk.chunk)
                raise _Stop(Held(chunk.chunk, str(exc))) from None
        damage = None
        if path.exists():
            if _given_up(path) and chunk.requests:
                await self._commit_given_up(chunk)
                return False
            damage = await anyio.to_thread.run_sync(
                spool_damage, path, chunk.requests, chunk.bytes)
            if damage is None:
                return True
            path = set_aside_damaged(path)  # then rebuilt as if it were missing
        await control.alarm(
            "spool_lost",
            f"spool file {deps.spool_path(chunk.chunk)} of chunk {chunk.chunk} is "
            + (f"damaged ({damage}; kept as {path})" if damage else "missing")
            + f"; its {chunk.requests + chunk.rejects} rows are read again from the source",
            chunk=chunk.chunk,
        )
        path = deps.spool_path(chunk.chunk)
        reason = await rebuild_spool(deps, chunk)
        if reason is None:
            self.log.warning("spool rebuilt from the source", spool=str(path))
            return True
        if not await give_up_spool(deps, chunk, reason):
            # Nothing left to rebuild it from, nor keys to dead-letter: hold this chunk (not
            # a retry loop, not an exit that systemd would restart) and say what to do.
            await control.alarm(
                "spool_lost",
                f"chunk {chunk.chunk} is held: spool file {path} is lost and cannot be rebuilt "
                f"({reason}), and only that file knew its {chunk.requests} rows' keys. "
                "Restore it from a backup of the state dir, then restart",
                chunk=chunk.chunk,
            )
            raise _Stop(Held(chunk.chunk, reason))
        await self._commit_given_up(chunk)
        return False

    async def _commit_given_up(self, chunk: ChunkState) -> None:
        """Dead-letter a given-up chunk's rows and commit it without collecting its batch."""
        if chunk.stage is Stage.SUBMITTED:
            assert chunk.batch_id is not None
            await self._append(Ended(chunk=chunk.chunk, batch_id=chunk.batch_id,
                                     counts={"spool_lost": chunk.requests}), Stage.SUBMITTED)
        current = self._chunk()
        if current is not None:
            await self.collect(current, given_up=True)

    async def _batch_gone(self, chunk: ChunkState) -> bool:
        """Whether a 404 on an ended batch's results has lasted past the not-found window."""
        window = self.deps.api_config.not_found_window
        first = self._missing_since = self._missing_since or time.monotonic()
        return time.monotonic() - first > window

    # -- collecting ------------------------------------------------------------

    async def _archived(self, batch_id: str) -> bool:
        """Whether a batch's results are gone for good (past the API's retention)."""
        try:
            batch = await self.deps.api.retrieve(batch_id)
        except NotFoundError:
            return False
        return batch.archived_at is not None

    async def _collect_once(
        self,
        chunk: ChunkState,
        blocks: Callable[[], AsyncIterator[list[bytes]]] | None,
        lost: tuple[str, str] | None = None,
    ) -> CollectSummary:
        """One collect attempt of *chunk* by a fresh collector (so a replay starts clean)."""
        return await self.deps.collector().collect(
            chunk=chunk.chunk, root=root_of(self.name, chunk.chunk), batch_id=chunk.batch_id,
            spool=self.deps.spool_path(chunk.chunk), attempt=chunk.attempt, blocks=blocks,
            lost=lost, refuse_unknown=self.deps.workspace is not None,
        )

    async def collect(self, chunk: ChunkState, *, given_up: bool = False) -> None:
        deps = self.deps
        deps.store.deadline.check("sink write")
        if not given_up and not await self._ensure_spool(chunk):
            return
        batch_id = chunk.batch_id
        api = deps.api
        blocks = (lambda: api.result_blocks(batch_id)) if batch_id and not given_up else None
        lost = None
        if batch_id and chunk.counts and chunk.counts.get("lost"):
            blocks, lost = None, _lost_reason(batch_id, deps.api_config.not_found_window)
        try:
            summary = await self._collect_once(chunk, blocks, lost)
        except WrongAdoption as exc:
            # Adopted after an ambiguous create, but the batch is another chunk's (or
            # nobody's): writing its answers would give keys answers to other requests.
            await self.control.alarm("wrong_adoption", f"chunk {chunk.chunk} is held: {exc}",
                                     chunk=chunk.chunk)
            raise _Stop(Held(chunk.chunk, str(exc))) from None
        except NotFoundError:
            assert batch_id is not None
            if not await self._archived(batch_id):
                if not await self._batch_gone(chunk):
                    raise  # the known transient 404 just after end: retried with backoff
                window = deps.api_config.not_found_window
                await self.control.alarm(
                    "batch_not_found",
                    f"batch {batch_id} has answered 404 for over {window:.0f}s: its results "
                    f"are gone; its {chunk.requests} rows are dead-lettered as batch_lost "
                    "(`batchd dead-letters retry` sends them again, paid again)",
                    chunk=chunk.chunk,
                )
                summary = await self._collect_once(chunk, None, _lost_reason(batch_id, window))
                await self._committed(chunk, summary)
                return
            await self.control.alarm(
                "results_archived",
                f"results of batch {batch_id} were archived before they were collected; "
                f"its {chunk.requests} requests are sent again",
                chunk=chunk.chunk,
            )
            summary = await self._collect_once(chunk, _no_results)
        await self._committed(chunk, summary)

    async def _committed(self, chunk: ChunkState, summary: CollectSummary) -> None:
        """Record a collect: the retry chunk it cut, the figures and the alarm for gaps."""
        deps = self.deps
        batch_id = chunk.batch_id
        crash_point("after_flush")
        retry = summary.retry_chunk
        if summary.unknown or summary.missing:
            await self.control.alarm(
                "reconciliation",
                f"batch {batch_id}: {summary.missing} custom_ids missing from results "
                f"(retried), {summary.unknown} unknown custom_ids",
                chunk=chunk.chunk,
            )
        digest = None
        if deps.workspace is not None and retry is not None:
            digest = await deps.store.put_spool(retry.chunk, self.lease.epoch,
                                                deps.spool_path(retry.chunk))
        applied = await self._append(ResultsCommitted(
            chunk=chunk.chunk, batch_id=batch_id, figures=summary.figures(), retry_chunk=retry,
            unpriced=summary.unpriced,
        ), chunk.stage, digest)
        self._retry_lease = next(iter(applied.created), None)
        crash_point("after_commit")  # committed, before the source commit and retirement
        deps.telemetry.committed(summary)
        self.log.info("results committed", batch_id=batch_id, succeeded=summary.succeeded,
                      truncated=summary.truncated, dead_lettered=summary.dead,
                      retried=summary.retried, cost_usd=round(summary.cost_usd, 6))
        self._summary = summary  # the runner acts on it once run() returns


def _lost_reason(batch_id: str, window: float) -> tuple[str, str]:
    return ("batch_lost",
            f"batch {batch_id} is unknown to the API (404 for over {window:.0f}s): its results "
            "are gone; `batchd dead-letters retry` sends the row again (paid again)")


def _given_up(path: Path) -> bool:
    """Whether a spool is the stand-in :func:`give_up_spool` wrote (its first line says so)."""
    with path.open("rb") as spool:
        first = spool.readline(4096)
    return first.startswith(b"\t") and b'"error_type":"spool_lost"' in first
