"""
A pipeline read as a source split in shards (a Kafka topic's partitions) by several
cluster workers at once: each holds its fair share of the shards (the shard count over
the live workers, rounded up), reads each through its own source restricted to that
shard, and hands back what is over its share at the next chunk boundary. A new holder
resumes after the highest position sealed from the shard, so a worker that dies or
hands a shard over never makes anyone read, send or pay a sealed record again.

Per shard it keeps the one-shard rule of the single daemon: the shard's source is
committed up to the last record whose whole chunk family is done, then those chunks
retire. The shard bookkeeping itself (readers, fair share, the store's shard calls) is
:mod:`batchd.daemon.cluster_readers`; :mod:`batchd.daemon.cluster_runner` adds the
chunk claims, the budget counter and the one-shard (whole source) reading.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Sequence
from functools import partial
from typing import Any, cast

import anyio

from batchd.daemon.cluster_readers import ShardReader, ShardStore, SplitSource, fair_share
from batchd.daemon.intake.ledger import Claim
from batchd.daemon.intake.packer import Packer
from batchd.daemon.pipeline import DONE_STAGES, BudgetExhausted, PipelineRunner, ShardLost
from batchd.daemon.store.contract import FencedOut
from batchd.daemon.wal.chunk_ids import root_of
from batchd.daemon.wal.records import ChunkRetired, PauseKind, SourceCommitted
from batchd.plugins.errors import ConfigError, FatalError

__all__ = ("ShardedRunner",)


_LIST_EVERY = 30.0  # seconds between listings of a split source's shards (new partitions)


class ShardedRunner(PipelineRunner):
    """A :class:`PipelineRunner` that can read its source as shards shared by workers."""

    #: A split source's shards this worker reads now, by name; None: read as one shard.
    readers: dict[str, ShardReader] | None = None
    #: ``--until-drained``: shards this worker found read to their end, chunks retired.
    _checked: set[str]

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
                    await self._commit_source(last.position, reader.source, shard=reader.name)
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
