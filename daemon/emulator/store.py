"""
Every batch the emulator knows, the virtual clock, and the receive counters.

Handlers call into the store from the event loop only, so it needs no locks;
the one slow job, writing a results file, runs in a worker thread on files
that no handler touches until it is done.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import shutil
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from batchd.daemon.emulator.batch import Batch
from batchd.daemon.emulator.config import EmulatorConfig
from batchd.daemon.emulator.faults import FaultInjector
from batchd.daemon.emulator.ingest import (
    AsyncReadable,
    BodyTooLarge,
    IngestFailed,
    IngestSummary,
    ingest_body,
)
from batchd.daemon.emulator.responder import Responder
from batchd.daemon.emulator.results import USAGE_KEYS, ResultsPlan, ResultsSummary, write_results
from batchd.daemon.emulator.validation import BatchContext, RowJudge
from batchd.daemon.emulator.wire import ApiError, new_id, retry_after_header

__all__ = ("Store",)


class Store:
    """The emulator's state: batch metadata in memory, requests and results on disk."""

    def __init__(
        self, config: EmulatorConfig, state_dir: Path, responder: Responder, faults: FaultInjector
    ) -> None:
        self.config = config
        self.state_dir = state_dir
        self.responder = responder
        self.faults = faults
        self.clock_offset = 0.0
        self._batches: dict[str, Batch] = {}
        self._seq_of: dict[str, int] = {}
        self._next_seq = 0
        self.received: Counter[str] = Counter()
        self._pending: Counter[str] = Counter()
        self.batches_created = 0
        self.requests_received = 0
        self.peak_in_progress = 0
        self.usage_totals: dict[str, Counter[str]] = {}
        self._background: set[asyncio.Future[None]] = set()

    def now(self) -> float:
        """The virtual time: wall clock plus the offset tests advanced."""
        return time.time() + self.clock_offset

    def today(self) -> dt.date:
        """The virtual UTC day (model retirements are judged by it)."""
        return dt.datetime.fromtimestamp(self.now(), dt.UTC).date()

    # -- lifecycle -----------------------------------------------------------

    def _retention_seconds(self) -> float:
        return self.faults.settings.retention_days * 86400.0

    def _refresh(self, batch: Batch) -> None:
        """Bring one batch up to now; start its results file once it ends, drop it once archived."""
        was_archived = batch.archived_at is not None
        if batch.advance(self.now(), self._retention_seconds()):
            self._start_results(batch)
        if batch.archived_at is not None and not was_archived:
            task = asyncio.ensure_future(self._discard_files(batch, keep_dir=True))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    def _start_results(self, batch: Batch) -> asyncio.Future[Any]:
        """The job writing the results file of an ended batch (started once, at its end)."""
        job = batch.results_job
        if job is None:
            assert batch.end_kind is not None
            plan = ResultsPlan(
                batch_id=batch.id,
                created_at=batch.created_at,
                latency=batch.latency,
                end_kind=batch.end_kind,
                finished_steps=batch.finished_steps,
            )
            job = asyncio.ensure_future(
                asyncio.to_thread(
                    write_results,
                    batch.requests_path,
                    batch.results_path,
                    plan,
                    responder=self.responder,
                    faults=self.faults,
                )
            )
            job.add_done_callback(self._count_usage)
            batch.results_job = job
        return job

    def _count_usage(self, job: asyncio.Future[Any]) -> None:
        if job.cancelled() or job.exception() is not None:
            return
        summary: ResultsSummary = job.result()
        for model, usage in summary.usage.items():
            self.usage_totals.setdefault(model, Counter()).update(usage)

    async def _discard_files(self, batch: Batch, *, keep_dir: bool) -> None:
        """Remove a batch's files once no results job is writing them."""
        if batch.results_job is not None:
            await asyncio.gather(batch.results_job, return_exceptions=True)
        if keep_dir:
            batch.results_path.unlink(missing_ok=True)
            batch.requests_path.unlink(missing_ok=True)
        else:
            await asyncio.to_thread(shutil.rmtree, batch.directory, True)

    def get(self, batch_id: str) -> Batch:
        """The batch, brought up to now, or a 404 in the API's words."""
        batch = self._batches.get(batch_id)
        if batch is None:
            raise ApiError("not_found_error", f"Message Batch {batch_id!r} not found")
        self._refresh(batch)
        return batch

    def in_transient_404(self, batch: Batch) -> bool:
        """Whether the API's known transient 404 applies right now (just created or just ended)."""
        window = self.faults.settings.transient_404_seconds
        if window <= 0:
            return False
        now = self.now()
        starts = [batch.created_at] + ([batch.ended_at] if batch.ended_at is not None else [])
        if any(start <= now < start + window for start in starts):
            self.faults.count("transient_404")
            return True
        return False

    def in_progress_requests(self) -> int:
        """Requests in batches that have not ended: what the API's queue limit counts."""
        total = 0
        now = self.now()
        for batch in self._batches.values():
            self._refresh(batch)
            total += batch.unfinished(now)
        return total

    # -- create --------------------------------------------------------------

    def _attempt_of(self, custom_id: str) -> int:
        """Reserve the how-many-th receipt of ``custom_id`` this is."""
        self._pending[custom_id] += 1
        return self.received[custom_id] + self._pending[custom_id]

    def _release(self, custom_ids: dict[str, int], *, commit: bool) -> None:
        for custom_id in custom_ids:
            self._pending[custom_id] -= 1
            if self._pending[custom_id] <= 0:
                del self._pending[custom_id]
            if commit:
                self.received[custom_id] += 1

    async def create(self, reader: AsyncReadable, context: BatchContext) -> Batch:
        """
        Receive a create body and make the batch; its rows are judged by ``context``.

        Raises:
            ApiError: 400 for a failed check, 413 over the size limit, 429 over
                the queue limit; nothing of the body is kept then.
        """
        spill = self.state_dir / f"incoming-{uuid.uuid4().hex}.jsonl"
        summary = IngestSummary()
        try:
            await ingest_body(
                reader,
                spill,
                summary,
                max_bytes=self.config.max_body_bytes,
                max_requests=self.config.max_requests,
                faults=self.faults,
                attempt_of=self._attempt_of,
                judge=RowJudge(self.responder.catalog, context),
            )
        except BaseException as exc:
            spill.unlink(missing_ok=True)
            self._release(summary.custom_ids, commit=False)
            if isinstance(exc, BodyTooLarge):
                raise ApiError("request_too_large", str(exc)) from None
            if isinstance(exc, IngestFailed):
                raise ApiError("invalid_request_error", str(exc)) from None
            raise
        limit = self.faults.settings.queue_limit
        busy = self.in_progress_requests()
        if limit is not None and busy + summary.count > limit:
            spill.unlink(missing_ok=True)
            self._release(summary.custom_ids, commit=False)
            self.faults.count("queue_limit")
            raise ApiError(
                "rate_limit_error",
                f"Batch of {summary.count} requests would exceed the processing-queue limit "
                f"of {limit} requests ({busy} in progress)",
                headers={"retry-after": retry_after_header(self.faults.settings.retry_after)},
            )
        batch_id = new_id("msgbatch_")
        directory = self.state_dir / batch_id
        directory.mkdir()
        spill.rename(directory / "requests.jsonl")
        now = self.now()
        batch = Batch(
            id=batch_id,
            seq=self._next_seq,
            directory=directory,
            created_at=now,
            expires_at=now + self.config.ttl,
            latency=self.config.latency,
            count=summary.count,
            tally=summary.tally,
            version=context.version.name,
        )
        self._next_seq += 1
        self._batches[batch_id] = batch
        self._seq_of[batch_id] = batch.seq
        self._release(summary.custom_ids, commit=True)
        self.faults.injected.update(summary.faults)
        self.batches_created += 1
        self.requests_received += summary.count
        self.peak_in_progress = max(self.peak_in_progress, busy + summary.count)
        return batch

    # -- list / cancel / delete / results -------------------------------------

    def list(
        self, limit: int, before_id: str | None, after_id: str | None
    ) -> tuple[list[Batch], bool]:
        """A page, newest first: ``after_id`` pages to older batches, ``before_id`` to newer."""
        newest_first = sorted(self._batches.values(), key=lambda b: b.seq, reverse=True)
        for batch in newest_first:
            self._refresh(batch)
        if after_id is not None:
            cursor = self._cursor("after_id", after_id)
            older = [b for b in newest_first if b.seq < cursor]
            return older[:limit], len(older) > limit
        if before_id is not None:
            cursor = self._cursor("before_id", before_id)
            newer = [b for b in newest_first if b.seq > cursor]
            return newer[-limit:], len(newer) > limit
        return newest_first[:limit], len(newest_first) > limit

    def _cursor(self, name: str, batch_id: str) -> int:
        seq = self._seq_of.get(batch_id)
        if seq is None:
            raise ApiError("invalid_request_error", f"{name}: unknown Message Batch {batch_id!r}")
        return seq

    def cancel(self, batch_id: str) -> Batch:
        """
        Start cancelling; a batch already canceling or ended is returned as it is.

        A latency-0 batch ends at its first *read*, so a cancel sent before any
        read still catches it in progress (tests of cancel need no latency).
        """
        batch = self._batches.get(batch_id)
        if batch is None or batch.latency > 0 or batch.ended_at is not None:
            batch = self.get(batch_id)
        if batch.ended_at is None and batch.cancel_initiated_at is None:
            now = self.now()
            batch.cancel_initiated_at = now
            batch.cancel_end_at = now + min(batch.latency, 1.0)
        return batch

    async def delete(self, batch_id: str) -> None:
        """Forget an ended batch and its files; a running one is a 400 as in the API."""
        batch = self.get(batch_id)
        if batch.ended_at is None:
            raise ApiError(
                "invalid_request_error",
                f"Message Batch {batch_id} is still {batch.processing_status}; "
                "cancel it and wait for it to end before deleting it",
            )
        del self._batches[batch_id]
        await self._discard_files(batch, keep_dir=False)

    async def results_file(self, batch: Batch) -> Path:
        """The finished results file of an ended, unarchived batch."""
        job = self._start_results(batch)
        await asyncio.shield(job)
        return batch.results_path

    def cut_after(self, batch: Batch) -> int | None:
        """Lines after which this results fetch is cut off, or None for a whole stream."""
        settings = self.faults.settings
        if settings.cut_results_after is None or batch.cut_fetches >= settings.cut_results_times:
            return None
        batch.cut_fetches += 1
        self.faults.count("cut_results")
        return settings.cut_results_after

    # -- admin ----------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        return {
            "batches_created": self.batches_created,
            "requests_received": self.requests_received,
            "received": dict(self.received),
            "faults_injected": self._faults_injected(),
            "in_progress_requests": self.in_progress_requests(),
            "peak_in_progress_requests": self.peak_in_progress,
            "clock_offset": self.clock_offset,
            "usage_totals": {
                model: {key: totals.get(key, 0) for key in USAGE_KEYS}
                for model, totals in sorted(self.usage_totals.items())
            },
        }

    def _faults_injected(self) -> dict[str, int]:
        injected = dict(self.faults.injected)
        if self.responder.cache.misses:
            injected["cache_miss"] = self.responder.cache.misses
        return injected

    async def close(self) -> None:
        """Wait for results jobs so no thread writes into a directory being removed."""
        tasks: list[asyncio.Future[Any]] = [
            b.results_job for b in self._batches.values() if b.results_job is not None
        ]
        tasks.extend(self._background)
        await asyncio.gather(*tasks, return_exceptions=True)

    async def reset(self) -> None:
        """Forget every batch and counter (files included)."""
        await self.close()
        batches = list(self._batches.values())
        self._batches.clear()
        self._seq_of.clear()
        self.received.clear()
        self.batches_created = 0
        self.requests_received = 0
        self.peak_in_progress = 0
        self.usage_totals.clear()
        self.responder.cache.clear()
        self.clock_offset = 0.0
        for batch in batches:
            await self._discard_files(batch, keep_dir=False)
