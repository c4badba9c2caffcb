"""
One pipeline run by a cluster worker: the local runner, with its chunks claimed from
the shared store and its source read only while this worker holds the source's shard.

A source split in shards (a Kafka topic's partitions, :mod:`batchd.daemon.cluster_readers`)
is read apart: each worker holds its fair share of the shards (the shard count over the
live workers, rounded up), reads each through its own source restricted to that shard,
and hands back what is over its share at the next chunk boundary. A new holder resumes
after the highest position sealed from the shard, so a worker that dies or hands a
shard over never makes anyone read, send or pay a sealed record again.

Kept apart from :mod:`batchd.daemon.pipeline` because every loop here exists only
when several workers share a pipeline through PostgreSQL (``[cluster] store =
"postgres"``); the chunk's life (packer, driver, poller, collector) is the same code.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any, cast

import anyio

from batchd.daemon.cluster.budget_holds import budget_scope
from batchd.daemon.cluster_readers import (
    ShardReader,
    ShardStore,
    SplitSource,
    fair_share,
    split_source,
)
from batchd.daemon.intake.ledger import Claim
from batchd.daemon.intake.packer import Packer
from batchd.daemon.pipeline import DONE_STAGES, BudgetExhausted, PipelineRunner, ShardLost
from batchd.daemon.store.contract import FencedOut
from batchd.daemon.wal.chunk_ids import root_of
from batchd.daemon.wal.records import ChunkRetired, PauseKind, PipelineResumed, SourceCommitted
from batchd.plugins.backoff import Backoff
from batchd.plugins.errors import ConfigError, FatalError, RetriableError

__all__ = ("ClusterRunner",)


_LIST_EVERY = 30.0  # seconds between listings of a split source's shards (new partitions)


class ClusterRunner(PipelineRunner):
    """A :class:`PipelineRunner` whose work is claimed, leased and fenced through the store."""

    #: A split source's shards this worker reads now, by name; None: read as one shard.
    readers: dict[str, ShardReader] | None = None
    #: ``--until-drained``: shards this worker found read to their end, chunks retired.
    _checked: set[str]

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

    # -- a source split in shards ---------------------------------------------------

    def _shard_store(self) -> ShardStore:
        if not isinstance(self.store, ShardStore):
            raise FatalError(f"pipeline {self.pipeline.name!r}: the store cannot share a "
                             "split source's shards")
        return cast(ShardStore, self.store)

    async def _read_shards(self, split: SplitSource, until_drained: bool) -> None:
        """
        Hold this worker's share of the source's shards, each read by its own task.

        Each poll: the share is the shard count over the live workers reading this
        pipeline (rounded up);
        readers over it are asked to hand their shard back at the next chunk boundary,
        and free shards (nobody live holds them) are taken up to it, starting from a
        place that differs per worker so that workers starting together pick apart.
        With ``--until-drained`` it returns once this worker has held every shard read
        to its end with its chunks retired (as the one-shard reader ends).
        """
        store = self._shard_store()
        self.readers, self._checked = {}, set()
        while True:
            try:
                await store.join_readers(self.pipeline.name)
                break
            except Exception as exc:  # the database away: try again
                self.log.warning("cannot join the source's readers; will try again",
                                 error=f"{type(exc).__name__}: {exc}")
                await anyio.sleep(1.0)
        interval = min(1.0, self.api_config.poll_interval)
        # Workers started together count each other before the first share is taken
        # (else the first takes every shard and hands most back at once).
        await anyio.sleep(interval)
        names: list[str] = []
        listed_at = -_LIST_EVERY
        while True:
            if time.monotonic() - listed_at >= _LIST_EVERY:
                try:
                    names = await split.shards()
                    listed_at = time.monotonic()
                except (FatalError, ConfigError):
                    raise
                except Exception as exc:  # the broker away: keep what is held, ask again
                    self.log.warning("cannot list the source's shards; will try again",
                                     error=f"{type(exc).__name__}: {exc}")
            if until_drained and names and self._checked >= set(names) and not self.readers:
                return
            if until_drained and self._paused_for(PauseKind.BUDGET) and not self.readers:
                return  # intake stopped by the budget: what was sealed is done; exit 3
            try:
                await self._balance(store, names, until_drained)
            except (FatalError, ConfigError):
                raise
            except Exception as exc:  # the database away: try again next poll
                self.log.warning("cannot share the source's shards; will try again",
                                 error=f"{type(exc).__name__}: {exc}")
            await anyio.sleep(interval)

    async def _balance(self, store: ShardStore, names: list[str], until_drained: bool) -> None:
        """Hand back what is over this worker's share; take free shards up to it."""
        assert self.readers is not None and self._tg is not None
        if not names or self._paused_for(PauseKind.BUDGET):
            return  # (the budget: no reader would seal; take shards once it lifts)
        share = fair_share(len(names), await store.live_readers(self.pipeline.name))
        keeping = [r for r in self.readers.values() if not r.release_wanted]
        for reader in keeping[share:]:
            reader.release_wanted = True
            self.log.info("handing a source shard back (over this worker's share)",
                          shard=reader.name, share=share)
        held = min(len(keeping), share)
        if held >= share:
            return
        start = zlib.crc32(self.store.worker_id.encode()) % len(names)
        wanted = [name for name in names[start:] + names[:start]
                  if name not in self.readers and name not in self._checked]
        if not wanted:
            return
        for name in await store.free_shards(self.pipeline.name, wanted):
            if held >= share:
                break
            lease = await self.store.acquire_shard(self.pipeline.name, name)
            if lease is None:
                continue  # a live worker reads it
            assert self.make_source is not None
            reader = ShardReader(name, lease, self.make_source())
            self.readers[name] = reader
            held += 1
            self._tg.start_soon(self._read_shard, reader, until_drained)

    async def _read_shard(self, reader: ShardReader, until_drained: bool) -> None:
        """Read one shard until it is lost, handed back, or (until drained) done."""
        store = self._shard_store()
        lease = reader.lease
        self.log.info("reading a source shard", shard=reader.name, epoch=lease.epoch,
                      previous_owner=lease.previous_owner,
                      resume_after=lease.sealed_position and lease.sealed_position.get("next"))
        try:
            cast(SplitSource, reader.source).only(reader.name)
            reader.packer = Packer(
                self.pipeline, reader.source, self.ledger, self.spool_dir,
                seal=partial(self.seal, shard=lease), room=partial(self._reader_room, reader),
                resume=(lease.sealed_position, lease.sealed_seq or 0, lease.next_chunk_no),
                model_check=self.model_check, claim_keys=partial(self._reader_keys, reader),
                number=partial(store.next_chunk_number, self.pipeline.name),
            )
            try:
                await reader.packer.start()  # also what commits the shard's source
                if self._paused_for(PauseKind.BUDGET):  # by any worker: read nothing
                    raise BudgetExhausted(self.paused or "budget")
                await reader.packer.run(until_drained)
                reader.drained = True
            except BudgetExhausted:
                if not until_drained:
                    # Hand it back once a raised budget lifts the pause: its next
                    # holder reads on from its sealed floor (the refused chunk's
                    # records were not sealed).
                    await self._wait_budget(reader)
                    return
                reader.drained = True  # read no further; --until-drained reports it
            await self._hold_until_retired(reader)
        except ShardLost as exc:
            self.log.warning("source shard lost or handed back", shard=reader.name,
                             why=str(exc))
        except (FatalError, ConfigError):
            raise
        except Exception as exc:  # the database link cut, the broker away
            self.log.warning("reading a source shard failed; will take shards again",
                             shard=reader.name, error=f"{type(exc).__name__}: {exc}")
        finally:
            if self.readers is not None and self.readers.get(reader.name) is reader:
                del self.readers[reader.name]
            if reader.drained and not reader.release_wanted:
                self._checked.add(reader.name)
            with anyio.CancelScope(shield=True):
                await self._let_go(store, reader)

    async def _let_go(self, store: ShardStore, reader: ShardReader) -> None:
        """Close the shard's source and give its lease back (a lost one is left as it is)."""
        for step in (reader.source.aclose, partial(store.release_shard, reader.lease)):
            try:
                with anyio.fail_after(10):
                    await step()
            except Exception as exc:
                self.log.warning("letting a source shard go failed", shard=reader.name,
                                 error=f"{type(exc).__name__}: {exc}")

    async def _reader_room(self, reader: ShardReader) -> None:
        """The packer's backpressure, and the chunk boundary where a shard is handed back."""
        while True:
            if reader.release_wanted:
                raise ShardLost(f"shard {reader.name}: handed back, over this worker's share")
            if self._paused_for(PauseKind.BUDGET):  # another reader's seal was refused
                raise BudgetExhausted(self.paused or "budget")
            with anyio.move_on_after(1.0):
                await self.room()
                return

    async def _reader_keys(self, reader: ShardReader, chunk: str,
                           entries: Sequence[tuple[str, dict[str, Any] | None]]) -> Claim:
        try:
            return await self.store.claim_keys(reader.lease, chunk, entries)
        except FencedOut as exc:
            raise ShardLost(str(exc)) from None

    async def _wait_budget(self, reader: ShardReader) -> None:
        """While a budget pause holds (and the shard is not wanted elsewhere)."""
        while self._paused_for(PauseKind.BUDGET) and not reader.release_wanted:
            with anyio.move_on_after(1.0):
                await self.changed.wait()

    async def _hold_until_retired(self, reader: ShardReader) -> None:
        """Keep the shard (its holder commits its source and retires its chunks) until done."""
        while not reader.release_wanted and any(
            c.shard == reader.name for c in self.live_chunks()
        ):
            with anyio.move_on_after(1.0):
                await self.changed.wait()

    async def advance(self) -> None:
        """Commit and retire per shard this worker reads (a split source), else as one."""
        if self.readers is None:
            await super().advance()
            return
        for reader in list(self.readers.values()):
            if reader.packer is not None and reader.packer.started:
                await self._advance_shard(reader)

    async def _advance_shard(self, reader: ShardReader) -> None:
        """
        The one-shard rule on one shard: commit its source up to the last record whose
        whole chunk family is done (its own read sequence), then retire those chunks.
        """
        name = self.pipeline.name
        async with self._advance_lock:
            chunks = [c for c in self.live_chunks() if c.shard == reader.name]
            families: dict[str, list[Any]] = {}
            for chunk in chunks:
                families.setdefault(root_of(name, chunk.chunk), []).append(chunk)
            roots = sorted((c for c in chunks if c.parent is None),
                           key=lambda c: c.first_seq or 0)
            done = []
            for root in roots:
                if not all(c.stage in DONE_STAGES for c in families[root.chunk]):
                    break
                done.append(root)
            if not done:
                return
            last = done[-1]
            state = self.manifest.state.pipelines.get(name)
            committed = None if state is None else state.committed_seq_of(reader.name)
            if last.last_seq is not None and (committed or 0) < last.last_seq:
                if last.position is not None:
                    self.store.deadline.check("source commit")
                    await self._commit_shard_source(reader, last.position)
                applied = await self.store.append(
                    SourceCommitted(pipeline=name, position=last.position,
                                    source_seq=last.last_seq, shard=reader.name),
                    lease=reader.lease,
                )
                if applied.fenced is not None:
                    return  # the shard moved on; its new holder commits
            for root in done:
                for chunk in families[root.chunk]:
                    applied = await self.store.append(ChunkRetired(chunk=chunk.chunk),
                                                      lease=reader.lease)
                    if applied.fenced is not None:
                        return
                    self.spool_path(chunk.chunk).unlink(missing_ok=True)
            self.changed.fire()

    async def _commit_shard_source(self, reader: ShardReader, position: dict[str, Any]) -> None:
        backoff = Backoff(0.5, 30.0)
        while True:
            try:
                await reader.source.commit(position)
                return
            except RetriableError as exc:
                self.log.warning("source commit failed; retrying", shard=reader.name,
                                 error=str(exc))
                await anyio.sleep(backoff.next_delay())

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
                self._drop_retired_spools()
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
                if self.shard is not None or self.readers:
                    await self.advance()
                self.changed.fire()
            except FatalError:
                raise
            except Exception as exc:  # the database away, a fenced commit: poll again
                self.log.warning(
                    "cluster poll failed; will poll again", error=f"{type(exc).__name__}: {exc}"
                )
            await anyio.sleep(interval)
