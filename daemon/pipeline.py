"""
One pipeline at run time: its packer, its poller and a driver per live chunk.

The runner owns what the drivers share (in-flight accounting, pause state,
the source-commit watermark) and nothing else; each step's logic lives in
the packer, the chunk driver, the poller and the collector. Wiring goes one
way: drivers get a :class:`DriverDeps` and the runner as their
:class:`RunnerControl`, and the runner acts on the outcome each driver returns.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import anyio
import structlog
from anyio.abc import TaskGroup

from batchd.daemon.batches.api import BatchesApi
from batchd.daemon.batches.chunk_driver import ChunkDriver
from batchd.daemon.batches.driver_deps import DriverDeps
from batchd.daemon.batches.id_scheme import id_scheme
from batchd.daemon.batches.outcomes import Committed, Held, Lost, RateLimited
from batchd.daemon.batches.poller import Poller
from batchd.daemon.batches.queue_limit import QueueLimit
from batchd.daemon.batches.reconcile import Reconciler
from batchd.daemon.cluster.errors import LimitRefused
from batchd.daemon.commands.dead_letters import pending_retry_requests
from batchd.daemon.commands.resume import resume_request_path
from batchd.daemon.config import ApiConfig, PipelineConfig
from batchd.daemon.intake.ledger import KeyLedger
from batchd.daemon.intake.packer import BatchOwners, ChunkBuilder, ClaimKeys, Packer
from batchd.daemon.intake.retry_request_file import read_retry_keys
from batchd.daemon.intake.shaper import ModelCheck
from batchd.daemon.intake.spool_check import mark_whole
from batchd.daemon.models.budget import Budget
from batchd.daemon.ops.telemetry import Telemetry
from batchd.daemon.results.answers import AnswerReader
from batchd.daemon.results.collector import CostFn
from batchd.daemon.results.dead_letter_guard import DeadLetterGuard
from batchd.daemon.results.sink_failures import ALARM_AFTER
from batchd.daemon.store.contract import (
    Applied,
    ChunkLease,
    ShardLease,
    SpoolDigest,
    StateStore,
)
from batchd.daemon.store.local import LocalStore
from batchd.daemon.wal.chunk_ids import number_of, root_of
from batchd.daemon.wal.manifest import Manifest, crash_point
from batchd.daemon.wal.manifest_state import ChunkState, Stage
from batchd.daemon.wal.records import (
    AlarmRaised,
    ChunkRetired,
    ChunkSealed,
    Ended,
    PauseKind,
    PipelineResumed,
    Record,
    SourceCommitted,
)
from batchd.daemon.wal.records import PipelinePaused as PauseRecord
from batchd.plugins.backoff import Backoff
from batchd.plugins.contract import Sink, Source
from batchd.plugins.errors import FatalError, RetriableError

__all__ = ("DONE_STAGES", "BudgetExhausted", "PipelinePaused", "PipelineRunner", "ShardLost")

log = structlog.get_logger("batchd.pipeline")
DONE_STAGES = (Stage.COMMITTED, Stage.SOURCE_COMMITTED)
_PRUNE_EVERY = 300.0  # seconds between ledger prunes


class PipelinePaused(FatalError):
    """``--until-drained`` cannot finish: the pipeline is paused (billing, auth, budget)."""


class ShardLost(Exception):
    """Raised into the packer: another worker reads the source now (cluster mode)."""


class BudgetExhausted(Exception):
    """Raised into the packer: the next chunk would pass the budget, so intake stops."""


class _Signal:
    """A re-armable broadcast: waiters wake on the next ``fire``."""

    def __init__(self) -> None:
        self._event = anyio.Event()

    def fire(self) -> None:
        self._event.set()
        self._event = anyio.Event()

    async def wait(self) -> None:
        await self._event.wait()


class PipelineRunner:
    def __init__(
        self,
        pipeline: PipelineConfig,
        *,
        manifest: Manifest,
        api: BatchesApi,
        api_config: ApiConfig,
        ledger: KeyLedger,
        spool_dir: Path,
        create_lock: anyio.Lock,
        source: Source,
        sinks: Sequence[Sink],
        dead_letter: Sink,
        cost: CostFn,
        budget: Budget,
        telemetry: Telemetry,
        make_source: Callable[[], Source] | None = None,
        queue: QueueLimit | None = None,
        answers: AnswerReader | None = None,
        model_check: ModelCheck | None = None,
        reconciler: Reconciler | None = None,
        store: StateStore | None = None,
        workspace: str | None = None,
        queue_scope: str | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.manifest = manifest
        # Every record goes through the store (leases, fencing); reads stay on
        # ``manifest.state``, which the default LocalStore's appends update.
        self.store: StateStore = store or LocalStore.over(manifest, ledger)
        self.leases: dict[str, ChunkLease] = {}  # chunks this runner drives, by id
        self.shard: ShardLease | None = None  # the right to read the source and seal
        # Cluster mode (several workers share the store): creates go through the
        # workspace's create slot, chunks are claimed, the source is read by the one
        # worker holding its shard. None: one daemon on its state dir, as always.
        self.workspace = workspace
        self.scopes: dict[str, anyio.CancelScope] = {}  # drivers running, by chunk
        self.api = api
        self.api_config = api_config
        self.ledger = ledger
        self.spool_dir = spool_dir
        self.create_lock = create_lock
        self.source = source
        self.sinks = sinks
        self.dead_letter = dead_letter
        self.cost = cost
        self.budget = budget
        self.telemetry = telemetry
        self.make_source = make_source
        self.queue = queue
        self.answers = answers
        self.model_check = model_check
        self.poller = Poller(pipeline.name, manifest=manifest, api=api, api_config=api_config,
                             telemetry=telemetry, alarms=self, record_ended=self._record_ended,
                             watches=self._polls)
        self.deps = DriverDeps(
            pipeline=pipeline, manifest=manifest, api=api, api_config=api_config, ledger=ledger,
            spool_dir=spool_dir, create_lock=create_lock, source=source, sinks=sinks,
            dead_letter=dead_letter, cost=cost, telemetry=telemetry, poller=self.poller,
            make_source=make_source, queue=queue, answers=answers, model_check=model_check,
            reconciler=reconciler, store=self.store, workspace=workspace,
            queue_scope=queue_scope,
        )
        self.active = 0
        self.changed = _Signal()
        self._advance_lock = anyio.Lock()
        self._tg: TaskGroup | None = None
        # Set once every batch that was mid-create at start-up is adopted or resent.
        self.recovered = anyio.Event()
        self.packer: Packer | None = None
        self.reconciler = reconciler
        self.sink_failures = 0
        # Chunks that cannot go on until an operator acts (a spool lost beyond rebuilding).
        self.held_chunks: dict[str, str] = {}  # chunk → why it waits for an operator
        self._pruned_at = -_PRUNE_EVERY
        self.log = log.bind(pipeline=pipeline.name)
        self.dead_letter_guard = DeadLetterGuard(pipeline, self)

    # -- shared helpers the drivers call -----------------------------------------

    def spool_path(self, chunk: str) -> Path:
        return self.deps.spool_path(chunk)

    def lease_of(self, chunk: str) -> ChunkLease:
        """The lease a chunk's records go under (epoch 0 for one this runner never claimed)."""
        return self.leases.get(chunk) or ChunkLease(chunk, self.store.worker_id, 0)

    @property
    def clustered(self) -> bool:
        return self.workspace is not None

    def _polls(self, chunk: str) -> bool:
        """
        A cluster worker polls only the batches of chunks it holds: the view holds every
        worker's, and each polling all of them multiplied the API's list calls by the
        worker count, for ``ended`` records only the owner may write.
        """
        return not self.clustered or chunk in self.leases

    async def _record_ended(self, record: Ended) -> bool:
        if self.clustered and record.chunk not in self.leases:
            return False  # another worker's chunk: its owner's poller records it
        try:
            # In a cluster its queue reservation ends in the same transaction.
            applied = await self.store.append(record, lease=self.lease_of(record.chunk),
                                              expected=Stage.SUBMITTED)
        except (FatalError, ValueError):
            raise
        except Exception as exc:
            if not self.clustered:
                raise
            # The database away: the next poll sees the batch ended again and retries.
            self.log.warning("recording ended failed; will poll again", chunk=record.chunk,
                             error=f"{type(exc).__name__}: {exc}")
            return False
        return applied.fenced is None

    async def _shard_append(self, record: Record, spool: SpoolDigest | None = None) -> Applied:
        """A seal, a source commit or a retirement: under the shard lease."""
        if self.shard is None:
            self.shard = await self.store.acquire_shard(self.pipeline.name)
        return await self.store.append(record, lease=self.shard, spool=spool)

    @property
    def paused(self) -> str | None:
        state = self.manifest.state.pipelines.get(self.pipeline.name)
        return state.paused if state else None

    @property
    def pause_kind(self) -> str | None:
        state = self.manifest.state.pipelines.get(self.pipeline.name)
        return state.pause_kind if state else None

    def _paused_for(self, kind: PauseKind) -> bool:
        return self.paused is not None and self.pause_kind == kind

    @property
    def submissions_blocked(self) -> bool:
        """Billing/auth pauses stop every create; a budget pause only stops new chunks,
        since every chunk already sealed was admitted within the budget."""
        return self.paused is not None and not self._paused_for(PauseKind.BUDGET)

    async def wait_unpaused(self) -> None:
        while self.submissions_blocked:
            await self.changed.wait()

    async def pause(
        self, reason: str, *, alarm_kind: str, kind: PauseKind, chunk: str | None = None
    ) -> None:
        if self.paused != reason:
            await self.store.append(
                PauseRecord(pipeline=self.pipeline.name, reason=reason, pause_kind=kind)
            )
        await self.alarm(alarm_kind, f"pipeline paused: {reason}", chunk=chunk)
        self.changed.fire()

    async def sink_failed(self, error: str) -> None:
        """A sink failed again: past ALARM_AFTER in a row, alarm and pause intake and creates."""
        self.sink_failures += 1
        if self.sink_failures == ALARM_AFTER and not self._paused_for(PauseKind.SINK_FAILED):
            # Exactly once per episode (several chunks fail at the same time).
            await self.pause(f"sink_failed: {error}", alarm_kind="sink_failed",
                             kind=PauseKind.SINK_FAILED)

    async def sink_recovered(self) -> None:
        """A collect went through: a pause for a failing sink is over."""
        self.sink_failures = 0
        if self._paused_for(PauseKind.SINK_FAILED):
            await self.store.append(PipelineResumed(pipeline=self.pipeline.name))
            self.log.warning("sink writes again; pipeline resumed")
            self.changed.fire()

    async def alarm(self, kind: str, message: str, *, chunk: str | None = None) -> None:
        self.log.error("alarm", alarm=kind, message=message, chunk=chunk)
        await self.store.append(AlarmRaised(pipeline=self.pipeline.name, chunk=chunk,
                                               alarm_kind=kind, message=message))
        self.telemetry.alarm(kind)

    def start_chunk(self, chunk_id: str, *, active: bool) -> None:
        assert self._tg is not None
        if active:
            self.active += 1
        self._tg.start_soon(self._drive, chunk_id, active)

    async def _drive(self, chunk_id: str, active: bool) -> None:
        with anyio.CancelScope() as scope:
            self.scopes[chunk_id] = scope
            try:
                await self._drive_in(chunk_id, active)
            finally:
                self.scopes.pop(chunk_id, None)
        if scope.cancelled_caught:
            self.log.warning("lease lost: stopped driving the chunk", chunk=chunk_id)

    def leases_lost(self, chunks: set[str]) -> None:
        """A heartbeat no longer lists these chunks as ours: stop their drivers at once."""
        for chunk in chunks:
            self.leases.pop(chunk, None)
            scope = self.scopes.get(chunk)
            if scope is not None:
                scope.cancel()

    async def _drive_in(self, chunk_id: str, active: bool) -> None:
        try:
            driver = ChunkDriver(self.deps, self, chunk_id, self.lease_of(chunk_id))
            while True:
                outcome = await driver.run()
                if isinstance(outcome, Lost):
                    self.leases.pop(chunk_id, None)
                    if chunk_id in self.manifest.state.chunks and isinstance(
                        self.store, LocalStore
                    ):
                        # One process holds the state dir: nobody else can have it. The
                        # stage moved under the driver (in this process): read it again.
                        continue
                    self.log.info("chunk lost to another worker; not driving it",
                                  chunk=chunk_id, why=outcome.reason)
                    return
                if isinstance(outcome, RateLimited):
                    if outcome.shrink and self.packer is not None:
                        self.packer.shrink()
                    continue  # the same driver: it counts refusals in a row
                if isinstance(outcome, Committed):
                    # Nothing more is recorded under its lease (the shard's retires it): its
                    # retirement must not read as a lease lost at the next heartbeat.
                    self.leases.pop(chunk_id, None)
                    await self._committed(outcome)
                elif isinstance(outcome, Held):
                    # Not a retry loop, not an exit systemd would restart: the chunk waits for
                    # an operator, and --until-drained reports it.
                    self.held_chunks[outcome.chunk] = outcome.reason
                    self.changed.fire()
                    await anyio.sleep_forever()
                return
        finally:
            if active:
                self.active -= 1
                self.changed.fire()

    async def _committed(self, outcome: Committed) -> None:
        """A chunk's results are committed: lift or raise pauses, start its retry, advance."""
        summary = outcome.summary
        if summary is not None:
            await self.sink_recovered()
            if summary.pause_reason:
                await self.pause(summary.pause_reason, alarm_kind="billing_or_auth",
                                 kind=PauseKind(summary.pause_kind or "billing_or_auth"),
                                 chunk=outcome.chunk)
            await self.dead_letter_guard.check(summary)
        if outcome.retry_chunk is not None:
            if outcome.retry_lease is not None:  # the retry chunk is born ours
                self.leases[outcome.retry_chunk] = outcome.retry_lease
            self.start_chunk(outcome.retry_chunk, active=True)
        backoff = Backoff(1.0, 60.0)
        while True:
            try:
                await self.advance()
                return
            except FatalError:
                raise
            except Exception as exc:  # as a driver's step: logged and tried again
                self.telemetry.api_error(type(exc).__name__)
                delay = backoff.next_delay()
                self.log.warning("step failed; will retry", chunk=outcome.chunk,
                                 stage="committed", error=f"{type(exc).__name__}: {exc}",
                                 retry_in=round(delay, 1))
                await anyio.sleep(delay)

    async def room(self) -> None:
        """
        Backpressure: wait until a chunk slot is free and the pipeline is not paused.

        In cluster mode the reader seals for every worker: it waits while the chunks
        sealed and not yet claimed by anyone number ``max_in_flight``.
        """
        limit = self.pipeline.batching.max_in_flight
        if self.clustered:
            while self.paused or self._unclaimed() >= limit:
                with anyio.move_on_after(1.0):
                    await self.changed.wait()
            return
        while self.active >= limit or self.paused:
            await self.changed.wait()

    def _unclaimed(self) -> int:
        """Chunks sealed and waiting for a driver anywhere (the local view; cluster mode)."""
        return sum(1 for c in self.live_chunks()
                   if c.stage is Stage.SEALED and c.chunk not in self.scopes)

    # -- sealing and the source watermark ------------------------------------------

    async def budget_refusal(self, requests: int, request_bytes: int) -> str | None:
        """Why the next chunk may not be sealed (the manifest's figures; a cluster's counter)."""
        return self.budget.refusal(self.manifest.state.pipelines.get(self.pipeline.name),
                                   self.live_chunks(), requests, request_bytes)

    async def budget_stop(self, refusal: str) -> NoReturn:
        """Intake stops: pause (budget), alarm, and raise into the packer."""
        self.telemetry.budget(True)
        await self.pause(refusal, alarm_kind="budget_exhausted", kind=PauseKind.BUDGET)
        raise BudgetExhausted(refusal)

    async def seal(self, builder: ChunkBuilder, shard: ShardLease | None = None) -> None:
        """
        Seal a packed chunk; *shard* is the lease of the shard it was read from when a
        cluster worker reads a source split in shards (else the runner's one shard).
        """
        refusal = await self.budget_refusal(builder.writer.requests, builder.writer.body_bytes)
        if refusal is not None:
            builder.writer.discard()
            await self.budget_stop(refusal)
        builder.writer.seal()
        mark_whole(builder.writer.final_path)  # counted as written: not read again to send
        position = builder.position
        if position is not None:
            # What the source was when these records were read (a file's inode and hashes):
            # resuming after this position in anything else is refused at start.
            identity = self.source.identity(position)
            if identity is not None:
                position = {**position, "identity": identity}
        if not self.clustered:  # the cluster log keeps no id scheme (no reconciler there)
            scheme = id_scheme(self.pipeline)  # recorded before the first chunk made under it
            if self.manifest.state.id_schemes.get(scheme.pipeline) != scheme.fingerprint:
                await self.store.append(scheme)
        digest = None
        if self.clustered:
            reading = shard or self.shard
            assert reading is not None
            digest = await self.store.put_spool(builder.id, reading.epoch,
                                                self.spool_path(builder.id))
        sealed = ChunkSealed(
            pipeline=self.pipeline.name,
            chunk=builder.id,
            attempt=1,
            requests=builder.writer.requests,
            bytes=builder.writer.body_bytes,
            rejects=builder.writer.rejects,
            first_seq=builder.first_seq,
            last_seq=builder.last_seq,
            position=position,
            parent=None,
            shard=None if shard is None else shard.shard,
        )
        crash_point("before_seal")  # its keys claimed and its spool kept, not yet sealed
        try:
            if shard is None:
                applied = await self._shard_append(sealed, spool=digest)
            else:
                applied = await self.store.append(sealed, lease=shard, spool=digest)
        except LimitRefused as exc:  # the shared budget, in the seal's own transaction
            self.spool_path(builder.id).unlink(missing_ok=True)
            await self.budget_stop(self.budget.counter_refusal(
                exc.cap, exc.spent, exc.reserved + exc.external, exc.amount) or str(exc))
        if applied.fenced is not None:
            raise ShardLost(f"pipeline {self.pipeline.name}: {applied.fenced}")
        for lease in applied.created:
            self.leases[lease.chunk] = lease
        crash_point("after_seal")
        self.log.info("chunk sealed", chunk=builder.id, requests=builder.writer.requests,
                      rejects=builder.writer.rejects, bytes=builder.writer.body_bytes)
        if self.clustered and self.active >= self.pipeline.batching.max_in_flight:
            # No room to drive it here: let it go, so whichever worker has room claims it.
            held = self.leases.pop(builder.id, None)
            if held is not None:
                await self.store.release(held)
            return
        self.start_chunk(builder.id, active=True)

    async def replay_requested(self) -> None:
        """Resubmit dead letters an operator asked for (``batchd dead-letters retry``)."""
        if self.make_source is None or self.packer is None:
            return
        for request in pending_retry_requests(self.spool_dir.parent, self.pipeline.name):
            keys, problem = read_retry_keys(request)
            if keys is None:
                self.log.error("a dead-letters retry request cannot be read; set aside as .bad "
                               "(run `batchd dead-letters retry` again)", request=str(request),
                               problem=problem)
                continue
            wanted = len(keys)
            found = await self.packer.replay(self.make_source(), keys)
            self.log.info("dead letters resubmitted", request=request.name, requested=wanted,
                          found=found, not_in_source=sorted(keys)[:20])
            request.rename(request.with_suffix(".done"))

    def _families(self) -> list[tuple[ChunkState, list[ChunkState]]]:
        name = self.pipeline.name
        chunks = [c for c in self.manifest.state.chunks.values() if c.pipeline == name]
        families: dict[str, list[ChunkState]] = {}
        for chunk in chunks:
            families.setdefault(root_of(name, chunk.chunk), []).append(chunk)
        roots = sorted(
            (c for c in chunks if c.parent is None), key=lambda c: c.first_seq or 0
        )
        return [(root, families[root.chunk]) for root in roots]

    async def advance(self) -> None:
        """
        Commit the source up to the last record whose whole chunk family
        (the chunk and its retries) is terminal, then retire those chunks.
        """
        if self.clustered and self.shard is None:
            return  # the source's reader commits it and retires the chunks
        async with self._advance_lock:
            done: list[tuple[ChunkState, list[ChunkState]]] = []
            for root, family in self._families():
                if not all(c.stage in DONE_STAGES for c in family):
                    break
                done.append((root, family))
            if not done:
                return
            last = done[-1][0]
            state = self.manifest.state.pipelines[self.pipeline.name]
            if last.last_seq is not None and (state.committed_seq or 0) < last.last_seq:
                if last.position is not None:
                    self.store.deadline.check("source commit")
                    await self._commit_source(last.position)
                await self._shard_append(SourceCommitted(
                    pipeline=self.pipeline.name, position=last.position, source_seq=last.last_seq,
                ))
                crash_point("after_source_commit")
            for _, family in done:
                for chunk in family:
                    await self._shard_append(ChunkRetired(chunk=chunk.chunk))
                    self.spool_path(chunk.chunk).unlink(missing_ok=True)
            self._prune_ledger()
            self.changed.fire()

    def _prune_ledger(self) -> None:
        """Forget keys older than the ledger retention (at most every few minutes)."""
        retention = self.ledger_retention
        now = time.monotonic()
        if not retention or now - self._pruned_at < _PRUNE_EVERY:
            return
        self._pruned_at = now
        numbers = (number_of(self.pipeline.name, c.chunk) for c in self.live_chunks())
        live = [n for n in numbers if n >= 0]
        below = min([*live, self.packer.next_chunk if self.packer else 0])
        forgotten = self.ledger.prune(self.pipeline.name, retention, below)
        if forgotten:
            self.log.info("key ledger pruned", keys_forgotten=forgotten,
                          retention_seconds=retention)

    @property
    def ledger_retention(self) -> float | None:
        """Seconds keys are kept: the pipeline's setting, else the source's default."""
        configured = self.pipeline.ledger_retention
        if configured is not None:
            return configured or None  # 0: forever
        return self.source.ledger_retention

    async def _commit_source(self, position: dict[str, Any], source: Source | None = None,
                             **where: str) -> None:
        """Commit *source* (the pipeline's own by default) at *position*, retried until done."""
        backoff = Backoff(0.5, 30.0)
        while True:
            try:
                await (source or self.source).commit(position)
                return
            except RetriableError as exc:
                self.log.warning("source commit failed; retrying", error=str(exc), **where)
                await anyio.sleep(backoff.next_delay())

    # -- running ----------------------------------------------------------------

    def live_chunks(self) -> list[ChunkState]:
        return [c for c in self.manifest.state.chunks.values() if c.pipeline == self.pipeline.name]

    async def prepare(self) -> None:
        """
        Resume a paused pipeline and open its source, before any sink writes.

        A source that cannot start for a reason retrying cannot fix (a missing
        file, a bad query) fails here, while nothing has been written yet.
        A source that is merely unreachable is retried by the packer.
        """
        name = self.pipeline.name
        state = self.manifest.state.pipelines.get(name)
        if state is not None and state.paused:
            # A restart (or reload) is how an operator says "fixed": billing sorted, budget
            # raised. If the cause remains, the next create or seal pauses it again.
            self.log.warning("resuming a pipeline paused before the restart", reason=state.paused)
            await self.store.append(PipelineResumed(pipeline=name))
        self.telemetry.budget(False)
        resume = (
            (state.last_sealed_position, state.last_sealed_seq or 0, state.next_chunk_no)
            if state is not None else (None, 0, 0)
        )
        await self._start_packer(resume, owners=self.reconciler)

    async def _start_packer(self, resume: tuple[dict[str, Any] | None, int, int], *,
                            owners: BatchOwners | None = None,
                            claim_keys: ClaimKeys | None = None) -> None:
        """
        The packer and its source, started at ``resume``: locally the reconciler says which
        keys batches on the API already hold, in a cluster the shared ledger claims them.
        """
        self.packer = Packer(self.pipeline, self.source, self.ledger, self.spool_dir,
                             seal=self.seal, room=self.room, resume=resume,
                             between_chunks=self.replay_requested,
                             model_check=self.model_check, owners=owners, claim_keys=claim_keys)
        try:
            await self.source.start(resume[0])
            self.packer.started = True
        except RetriableError as exc:
            self.log.warning("source unavailable at start; will keep trying", error=str(exc))
        else:
            self._check_template_fields(self.source.field_names())

    def _check_template_fields(self, names: Sequence[str] | None) -> None:
        """A template naming a field no record has would dead-letter every record: refuse it."""
        from batchd.daemon.commands.validate import template_field_errors

        errors = template_field_errors(self.pipeline, names)
        if errors:
            raise errors[0]

    async def _watch_recovery(self, pending: set[str]) -> None:
        """Set :attr:`recovered` once no chunk that was mid-create at start is left unresolved."""
        while True:
            chunks = self.manifest.state.chunks
            if self.submissions_blocked or not any(
                cid in chunks and chunks[cid].stage in (Stage.SEALED, Stage.INTENT)
                for cid in pending
            ):
                self.recovered.set()
                return
            await anyio.sleep(0.05)

    async def run(self, *, until_drained: bool) -> None:
        if self.packer is None:
            await self.prepare()
        assert self.packer is not None
        async with anyio.create_task_group() as tg:
            self._tg = tg
            for chunk in self.live_chunks():
                in_flight = chunk.stage not in DONE_STAGES
                self.start_chunk(chunk.chunk, active=in_flight)
            intents = {c.chunk for c in self.live_chunks() if c.stage is Stage.INTENT}
            tg.start_soon(self._watch_recovery, intents)
            tg.start_soon(self.poller.run)
            if until_drained:
                tg.start_soon(self._fail_when_stuck)
            tg.start_soon(self._watch_resume_requests)
            if self.reconciler is not None:
                # Batches the state does not know shape the chunks rebuilt for them: read
                # nothing until they are known (creates wait for it anyway).
                await self.reconciler.ready.wait()
                await self._refuse_changed_scheme(until_drained)
            try:
                await self.packer.run(until_drained)
            except BudgetExhausted:
                # Intake stops; what is in flight still finishes and is collected.
                if not until_drained:
                    await anyio.sleep_forever()
            if until_drained:
                await self._until_done()
                tg.cancel_scope.cancel()

    async def _refuse_changed_scheme(self, until_drained: bool) -> None:
        """Read nothing under a custom_id scheme that unknown batches may predate."""
        scheme = id_scheme(self.pipeline)
        assert self.reconciler is not None
        changed = self.reconciler.scheme_changed(scheme.pipeline, scheme.fingerprint,
                                                 scheme.template)
        if changed is None:
            return
        await self.pause(f"unknown_batches: {changed}", alarm_kind="unknown_batches",
                         kind=PauseKind.UNKNOWN_BATCHES)
        if until_drained:
            await self._until_done()  # what was in flight goes on; then exit 3, paused
        await anyio.sleep_forever()

    async def _fail_when_stuck(self) -> None:
        """
        ``--until-drained``: end the run (exit 3, naming the reason) once a pause holds
        the pipeline and nothing in flight can still move, instead of waiting forever
        in front of a pause only an operator can lift.
        """
        while True:
            moving = any(c.stage in (Stage.SUBMITTED, Stage.ENDED) for c in self.live_chunks())
            if self.submissions_blocked and not moving:
                raise PipelinePaused(f"pipeline {self.pipeline.name!r} is paused: {self.paused}")
            held = self.held_error(while_reading=True)
            if held is not None:
                raise held
            with anyio.move_on_after(1.0):
                await self.changed.wait()

    def ends_while_reading(self) -> bool:
        """Whether a held chunk ends a drained run before the source is read to its end."""
        return False

    def held_error(self, *, while_reading: bool = False) -> PipelinePaused | None:
        """
        The end of a drained run whose other chunks all wait behind held ones (they
        commit their source only in order), or None. *while_reading*: asked while the
        source may still be read, when only :meth:`ends_while_reading` runners end.
        """
        if not self.held_chunks or (while_reading and not self.ends_while_reading()):
            return None
        live = [c for c in self.live_chunks() if c.chunk not in self.held_chunks]
        if not all(c.stage in DONE_STAGES for c in live):
            return None
        held = "; ".join(f"{c}: {why}" for c, why in sorted(self.held_chunks.items()))
        return PipelinePaused(
            f"pipeline {self.pipeline.name!r}: chunks are held, waiting for an operator "
            f"(see their alarm: spool_lost, spool_corrupt or wrong_adoption): {held}")

    async def _watch_resume_requests(self) -> None:
        """``batchd resume PIPELINE`` drops a file; lift the pause it asks for."""
        path = resume_request_path(self.spool_dir.parent, self.pipeline.name)
        request = anyio.Path(path)
        while True:
            if await request.exists():
                await self.resume_requested(request)
            await anyio.sleep(1.0)

    async def resume_requested(self, request: anyio.Path) -> None:
        await request.unlink(missing_ok=True)
        reason = self.paused
        if reason is None:
            self.log.info("resume requested; the pipeline is not paused")
            return
        if self._paused_for(PauseKind.BUDGET):
            self.log.warning("resume requested, but a budget pause lifts only with a higher "
                             "budget_usd: edit the config and reload (systemctl reload batchd)")
            return
        self.log.warning("resuming the pipeline on request", reason=reason, kind=self.pause_kind)
        await self.store.append(PipelineResumed(pipeline=self.pipeline.name))
        self.changed.fire()

    async def _until_done(self) -> None:
        """Return once every chunk is retired; raise if a pause leaves chunks that cannot move."""
        while True:
            live = [c for c in self.live_chunks() if c.chunk not in self.held_chunks]
            stuck = all(c.stage in (Stage.SEALED, Stage.INTENT) for c in live)
            if (self.submissions_blocked and stuck) or (self.paused and not live):
                raise PipelinePaused(f"pipeline {self.pipeline.name!r} is paused: {self.paused}")
            held = self.held_error()
            if held is not None:
                raise held
            if not live and not self.paused:
                return
            with anyio.move_on_after(1.0):
                await self.changed.wait()
