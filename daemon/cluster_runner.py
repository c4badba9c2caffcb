"""
One pipeline run by a cluster worker: the local runner, with its chunks claimed from
the shared store and its source read only while this worker holds the source's shard.

Kept apart from :mod:`batchd.daemon.pipeline` because every loop here exists only
when several workers share a pipeline through PostgreSQL (``[cluster] store =
"postgres"``); the chunk's life (packer, driver, poller, collector) is the same code.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import anyio

from batchd.daemon.cluster.budget_holds import budget_scope
from batchd.daemon.intake.ledger import Claim
from batchd.daemon.pipeline import DONE_STAGES, BudgetExhausted, PipelineRunner, ShardLost
from batchd.daemon.store.contract import FencedOut
from batchd.daemon.wal.records import PauseKind, PipelineResumed
from batchd.plugins.errors import ConfigError, FatalError

__all__ = ("ClusterRunner",)


class ClusterRunner(PipelineRunner):
    """A :class:`PipelineRunner` whose work is claimed, leased and fenced through the store."""

    async def prepare(self) -> None:
        """
        The pipeline's budget counter at this config's cap (at start and each reload); a
        budget pause lifts if the cap went up. The source opens once this worker holds
        its shard.
        """
        from batchd.daemon.store.cluster_worker import define_budget

        if not hasattr(self.store, "inner"):
            return  # not a PgStore behind a view (in-process tests)
        raised = await define_budget(self.store, self.pipeline.name, self.budget.limit,
                                     self.budget.upper_bound)
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
            self.recovered.set()  # intents are settled under the create slot, by their owner
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
                break
            if until_drained:
                await self._until_done()
                tg.cancel_scope.cancel()

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

    async def _claim_loop(self) -> None:
        """Each poll: claim what this worker has room for, read the others' progress."""
        interval = min(1.0, self.api_config.poll_interval)
        refresh = getattr(self.store, "refresh", None)
        while True:
            try:
                room = self.pipeline.batching.max_in_flight - self.active
                claims = []
                if room > 0 and not self.submissions_blocked:
                    claims = await self.store.claim_chunks(self.pipeline.name, room)
                elif not self.submissions_blocked:
                    # Full, but a dead worker's chunk at intent may be the create slot's
                    # pending one, which every create waits on: take those regardless.
                    claims = await self.store.claim_chunks(
                        self.pipeline.name, 1, stages=("intent",)
                    )
                if refresh is not None:
                    await refresh()  # drivers read their chunks from the local view
                if claims:
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
                if self.shard is not None:
                    await self.advance()
                self.changed.fire()
            except FatalError:
                raise
            except Exception as exc:  # the database away, a fenced commit: poll again
                self.log.warning(
                    "cluster poll failed; will poll again", error=f"{type(exc).__name__}: {exc}"
                )
            await anyio.sleep(interval)
