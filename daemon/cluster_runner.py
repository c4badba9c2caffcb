"""
One pipeline run by a cluster worker: the local runner, with its chunks claimed from
the shared store and its source read only while this worker holds the source's shard.

A source split in shards (a Kafka topic's partitions) is read apart, each worker its
fair share of the shards: :mod:`batchd.daemon.cluster_shard_runner`, which this runner
extends.

Kept apart from :mod:`batchd.daemon.pipeline` because every loop here exists only
when several workers share a pipeline through PostgreSQL (``[cluster] store =
"postgres"``); the chunk's life (packer, driver, poller, collector) is the same code.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any

import anyio

from batchd.daemon.cluster.budget_holds import budget_scope
from batchd.daemon.cluster.claim_pace import ClaimPace
from batchd.daemon.cluster_readers import split_source
from batchd.daemon.cluster_shard_runner import ShardedRunner
from batchd.daemon.intake.ledger import Claim
from batchd.daemon.pipeline import DONE_STAGES, BudgetExhausted, ShardLost
from batchd.daemon.store.contract import Claimed, FencedOut
from batchd.daemon.wal.records import PauseKind, PipelineResumed
from batchd.plugins.backoff import Backoff
from batchd.plugins.errors import ConfigError, FatalError

__all__ = ("ClusterRunner",)

_RETRIES_EVERY = 1.0  # seconds between looks for operators' dead-letter retries


class ClusterRunner(ShardedRunner):
    """A :class:`PipelineRunner` whose work is claimed, leased and fenced through the store."""

    _retries_checked = float("-inf")  # when the store was last asked for retries

    async def prepare(self) -> None:
        """
        The pipeline's budget counter at this config's cap (at start and each reload); a
        budget pause lifts if the cap went up. The source opens once this worker holds
        its shard.
        """
        from batchd.daemon.store.cluster_worker import define_budget

        if not hasattr(self.store, "inner"):
            return  # not a PgStore behind a view (in-process tests)
        backoff = Backoff(0.5, 10.0)
        while True:
            try:
                raised = await define_budget(self.store, self.pipeline.name, self.budget.limit,
                                             self.budget.upper_bound)
                break
            except (FatalError, ConfigError):
                raise
            except Exception as exc:  # the database link lost at start: not the config's fault
                self.log.warning("cannot define the pipeline's budget counter in the cluster's "
                                 "database; will try again", error=f"{type(exc).__name__}: {exc}")
                await anyio.sleep(backoff.next_delay())
        if raised and self._paused_for(PauseKind.BUDGET):
            self.log.warning("budget raised: resuming the pipeline paused by it",
                             budget_usd=self.budget.limit, reason=self.paused)
            await self.store.append(PipelineResumed(pipeline=self.pipeline.name))
            self.telemetry.budget(False)

    async def budget_refusal(self, requests: int, request_bytes: int) -> str | None:
        """
        The shared counter's answer (every worker's spend and holds), read before the spool
        is uploaded; the seal's own transaction then reserves, and refuses a late change.
        """
        counter = getattr(self.store, "counter", None)
        if counter is None or not hasattr(self.store, "inner"):
            return await super().budget_refusal(requests, request_bytes)
        now = await counter(budget_scope(self.pipeline.name))
        if now is None:
            return await super().budget_refusal(requests, request_bytes)
        return self.budget.counter_refusal(
            None if now.cap is None else float(now.cap), float(now.spent),
            float(now.reserved + now.external), self.budget.upper_bound(requests, request_bytes))

    async def run(self, *, until_drained: bool) -> None:
        """
        Cluster mode: drive what this worker claims; read the source while holding its shard.

        Every worker claims live chunks (sealed by anyone, or left by a dead worker after
        its TTL and grace) up to ``max_in_flight`` each poll. One worker at a time holds
        the source's shard: it reads, seals, commits the source and retires chunks. With
        ``--until-drained`` a worker ends once it has held the shard with nothing left to
        read and the cluster has no live chunk of the pipeline, so every worker ends.
        """
        async with anyio.create_task_group() as tg:
            self._tg = tg
            tg.start_soon(self._claim_loop)
            tg.start_soon(self._keep_running, self.poller.run)
            tg.start_soon(self._keep_running, self._watch_resume_requests)
            if self.deps.queue_scope is not None and hasattr(self.store, "inner"):
                from batchd.daemon.store.cluster_worker import (
                    queue_reconcile_loop,
                    reconcile_interval,
                )

                tg.start_soon(queue_reconcile_loop, self.store, self.api, self.deps.queue_scope,
                              reconcile_interval())
            if hasattr(self.store, "inner"):  # a PgStore (in-process tests run without)
                from batchd.daemon.cluster.retention import dedicated_connection, retention_loop

                inner = self.store.inner
                tg.start_soon(retention_loop, partial(dedicated_connection, inner.dsn, inner.name),
                              inner.sql, self.pipeline.name, self.ledger_retention)
            self.recovered.set()  # intents are settled under the create slot, by their owner
            if until_drained:  # a pause or a held chunk ends the run, as on one daemon
                tg.start_soon(self._fail_when_stuck)
            split = split_source(self.source)
            if split is not None and self.make_source is not None:
                await self._read_shards(split, until_drained)
            else:
                await self._read_whole_source(until_drained)
            if until_drained:
                await self._until_done()
                self._drop_retired_spools()
                tg.cancel_scope.cancel()

    def ends_while_reading(self) -> bool:
        """
        A split source's readers wait for their shard's chunks to retire, which a held
        chunk never does: the worker holding it ends (its lease passes to the next
        worker, which holds it too); rows not read stay unread and uncommitted. One
        reader of a whole source reads to the end first, as a single daemon does.
        """
        return self.readers is not None

    async def _read_whole_source(self, until_drained: bool) -> None:
        """Read the source (one shard) whenever this worker holds it, until drained."""
        while True:
            await self._hold_shard()
            try:
                if self._paused_for(PauseKind.BUDGET):  # by any worker: intake stays off
                    raise BudgetExhausted(self.paused or "budget")
                await self.prepare_reader()
                assert self.packer is not None
                await self.packer.run(until_drained)
            except ShardLost as exc:
                self.log.warning("source shard lost: another worker reads it now", why=str(exc))
                self.shard, self.packer = None, None
                continue
            except BudgetExhausted:
                if not until_drained:
                    # Read again once a raised budget (a worker's start or reload) lifts it.
                    while self._paused_for(PauseKind.BUDGET):
                        with anyio.move_on_after(1.0):
                            await self.changed.wait()
                    self.shard, self.packer = None, None
                    continue
            except (FatalError, ConfigError):
                raise
            except Exception as exc:  # the database link cut, a paused worker's session
                self.log.warning(
                    "reading the source failed; will wait for its shard again",
                    error=f"{type(exc).__name__}: {exc}",
                )
                self.shard, self.packer = None, None
                await anyio.sleep(min(1.0, self.api_config.poll_interval))
                continue
            return

    async def _keep_running(self, loop: Callable[[], Awaitable[None]]) -> None:
        """Run *loop* again after an error a worker outlives (the database link cut)."""
        while True:
            try:
                await loop()
                return
            except (FatalError, ConfigError):
                raise
            except Exception as exc:
                self.log.warning(
                    "loop failed; starting it again",
                    loop=loop.__name__,
                    error=f"{type(exc).__name__}: {exc}",
                )
                await anyio.sleep(1.0)

    async def _hold_shard(self) -> None:
        """Wait until this worker reads the source (one shard per source)."""
        interval = min(1.0, self.api_config.poll_interval)
        while True:
            try:
                shard = await self.store.acquire_shard(self.pipeline.name)
            except (FatalError, ConfigError):
                raise
            except Exception as exc:  # the database away: try again next poll
                self.log.warning(
                    "cannot ask for the source's shard; will try again",
                    error=f"{type(exc).__name__}: {exc}",
                )
                shard = None
            if shard is not None:
                self.shard = shard
                self.log.info(
                    "reading the source",
                    shard=shard.shard,
                    epoch=shard.epoch,
                    previous_owner=shard.previous_owner,
                )
                return
            await anyio.sleep(interval)

    async def prepare_reader(self) -> None:
        """The packer, resuming after what the cluster sealed (the shard lease says where)."""
        shard = self.shard
        assert shard is not None
        resume = (shard.sealed_position, shard.sealed_seq or 0, shard.next_chunk_no)

        async def claim_keys(
            chunk: str, entries: Sequence[tuple[str, dict[str, Any] | None]]
        ) -> Claim:
            assert self.shard is not None
            try:
                return await self.store.claim_keys(self.shard, chunk, entries)
            except FencedOut as exc:
                raise ShardLost(str(exc)) from None

        await self._start_packer(resume, claim_keys=claim_keys)

    async def replay_requested(self) -> None:
        """
        Operators' dead-letter retries from the cluster's store (``cluster/retry_requests.py``),
        taken between chunks by the worker reading the source, at most once a second.
        """
        take = getattr(self.store, "take_retries", None)
        if take is None:  # not a PgStore (in-process tests): the state dir's request files
            await super().replay_requested()
            return
        if self.shard is None or self.packer is None or self.make_source is None:
            return
        if time.monotonic() - self._retries_checked < _RETRIES_EVERY:
            return
        self._retries_checked = time.monotonic()
        try:
            taken = await take(self.shard)
        except FencedOut as exc:
            raise ShardLost(str(exc)) from None
        except Exception as exc:  # the database away: the requests wait for the next look
            self.log.warning("cannot read the dead-letter retries asked for; will try again",
                             error=f"{type(exc).__name__}: {exc}")
            return
        for request in taken:
            if request.answered:
                self.log.info("dead letters answered since; not sent again", request=request.id,
                              keys=len(request.answered), first=list(request.answered[:20]))
            if not request.keys:
                continue
            keys = set(request.keys)
            found = await self.packer.replay(self.make_source(), keys)
            self.log.info("dead letters resubmitted", request=request.id,
                          requested=len(request.keys), found=found,
                          not_in_source=sorted(keys)[:20])

    def _drop_retired_spools(self) -> None:
        """
        Delete this worker's copies of spools whose chunks are retired, by whoever: a
        retirement deletes only the retirer's copy, and every chunk a worker drove or
        sealed for others left one here.
        """
        drop = getattr(self.store, "drop_retired_spools", None)  # PgStore's
        if drop is not None:
            drop(self.manifest.state.retired_chunks)

    async def _claim_loop(self) -> None:
        """
        Each poll: claim what this worker has room for, read the others' progress. A
        worker not reading the source that finds nothing to claim polls less often
        (:mod:`batchd.daemon.cluster.claim_pace`), up to five polls' time (at most 5 s).
        """
        interval = min(1.0, self.api_config.poll_interval)
        pace = ClaimPace(interval, min(5 * interval, 5.0))
        refresh = getattr(self.store, "refresh", None)
        while True:
            try:
                room = self.pipeline.batching.max_in_flight - self.active
                reading = self.shard is not None or bool(self.readers)
                if pace.due(room, reading=reading):
                    claims = await self._claim(room)
                    pace.polled(found=bool(claims))
                    if refresh is not None:
                        await refresh()  # drivers read their chunks from the local view
                    self._drop_retired_spools()
                    self._start_claimed(claims)
                    if reading:
                        await self.advance()
                    self.changed.fire()
            except FatalError:
                raise
            except Exception as exc:  # the database away, a fenced commit: poll again
                self.log.warning(
                    "cluster poll failed; will poll again", error=f"{type(exc).__name__}: {exc}"
                )
            await anyio.sleep(interval)

    async def _claim(self, room: int) -> list[Claimed]:
        if self.submissions_blocked:
            return []
        if room > 0:
            return await self.store.claim_chunks(self.pipeline.name, room)
        # Full, but a dead worker's chunk at intent may be the create slot's pending one,
        # which every create waits on: take those regardless.
        return await self.store.claim_chunks(self.pipeline.name, 1, stages=("intent",))

    def _start_claimed(self, claims: list[Claimed]) -> None:
        for claimed in claims:
            chunk = claimed.lease.chunk
            self.leases[chunk] = claimed.lease
            if chunk in self.scopes:
                continue
            self.log.info(
                "chunk claimed",
                chunk=chunk,
                stage=claimed.stage,
                epoch=claimed.lease.epoch,
                previous_owner=claimed.previous_owner,
            )
            self.start_chunk(chunk, active=claimed.stage not in DONE_STAGES)
