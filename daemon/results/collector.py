"""
Streams an ended batch's results, joins them on ``custom_id`` and routes
every row to exactly one place: a sink, the dead-letter sink, or the next
retry chunk.

Nothing here is positional: results come back in any order, and the join
goes through the chunk's spool (custom_id → key). Every custom_id the spool
sent must come back exactly once; a missing one is retried. An unknown one is
an alarm; with ``refuse_unknown`` (cluster mode, where every adoption is
automatic) it means the batch is not this chunk's (a wrong adoption after an
ambiguous create): the collect is refused with :class:`WrongAdoption` before the
group holding it, or any later one, reaches a sink (the first group of 2,000
results is checked whole before anything is written). A single daemon keeps
the alarm: its operator may adopt a batch holding rows beyond the chunk
(``batchd reconcile --adopt``), whose extra rows are ignored. Results are parsed
line by line with orjson, never held whole.
The first pass (:mod:`batchd.daemon.results.result_join`) routes successes to the sinks
while they write the previous group; the second pass re-reads the spool only
when something failed, for the request bytes a retry or dead letter needs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import structlog

from batchd.daemon.batches.api import StreamCut
from batchd.daemon.batches.error_codes import pause_kind_of_row
from batchd.daemon.config import PipelineConfig
from batchd.daemon.intake.spool import SPOOL_BLOCK, SpoolWriter, iter_spool
from batchd.daemon.results.answers import AnswerReader
from batchd.daemon.results.result_join import CostFn, Failure, ResultJoin
from batchd.daemon.results.routing import Route
from batchd.daemon.results.sink_failures import sink_call
from batchd.daemon.results.sink_writer import background_puts
from batchd.daemon.wal import chunk_ids
from batchd.daemon.wal.records import ChunkSealed, FigureTotals
from batchd.plugins.contract import Sink
from batchd.plugins.records import ResultRow

__all__ = ("CollectSummary", "Collector", "CostFn", "WrongAdoption")

log = structlog.get_logger("batchd.collector")
_GROUP_ROWS = 2000


def _index(spool: Path) -> tuple[dict[str, tuple[str, int]], int]:
    """custom_id → (key, attempt) for every request the chunk sent, and its count of rejects."""
    index: dict[str, tuple[str, int]] = {}
    rejects = 0
    loads = orjson.loads
    with open(spool, "rb", buffering=SPOOL_BLOCK) as lines:
        for line in lines:
            tab = line.find(b"\t")
            if tab == 0:
                rejects += 1
                continue
            meta = loads(line[tab + 1 :])
            index[meta["custom_id"]] = (meta["key"], int(meta.get("attempt", 1)))
    return index, rejects


class WrongAdoption(Exception):
    """A batch's results hold a custom_id the chunk's spool never sent: not its batch."""

    def __init__(self, chunk: str, batch_id: str | None, custom_id: str, unknown: int,
                 done: int) -> None:
        super().__init__(
            f"batch {batch_id}'s results hold custom_id {custom_id!r}, which chunk {chunk}'s "
            f"spool never sent ({unknown} unknown among the first {unknown + done} results): "
            "it is not this chunk's batch; nothing was written to the sinks"
        )
        self.chunk, self.batch_id, self.custom_id = chunk, batch_id, custom_id


@dataclass(slots=True)
class CollectSummary(FigureTotals):
    """What one collect did: its figures (the record's), plus what only alarms and pauses use."""

    unknown: int = 0
    missing: int = 0
    unpriced: int = 0
    pause_reason: str | None = None
    pause_kind: str | None = None
    retry_chunk: ChunkSealed | None = None
    dead_types: dict[str, int] = field(default_factory=dict)
    dead_examples: dict[str, str] = field(default_factory=dict)  # error type -> one message


def _refuse_unknown(join: ResultJoin) -> None:
    """
    Raise :class:`WrongAdoption` once any custom_id the spool never sent was read.

    Called after each block and before its rows are handed to the sinks: groups go out
    only every 2,000 rows, so the whole first group (which would name the batch of
    another chunk at its first line) is checked before anything is written.
    """
    if join.first_unknown is not None:
        raise WrongAdoption(join.chunk, join.batch_id, join.first_unknown, join.unknown,
                            join.done)


def _accept_unknown(join: ResultJoin) -> None:
    """A single daemon's rule: unknown custom_ids are counted and alarmed after the collect."""


class Collector:
    """Collects one chunk; a new instance per attempt, so a replay starts clean."""

    def __init__(
        self,
        pipeline: PipelineConfig,
        sinks: Sequence[Sink],
        dead_letter: Sink,
        cost: CostFn,
        answers: AnswerReader | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.sinks = sinks
        self.dead_letter = dead_letter
        self.cost = cost
        self.answers = answers

    async def _put(self, sinks: Sequence[Sink], group: str, rows: list[ResultRow]) -> None:
        if rows:
            for sink in sinks:
                await sink_call(sink, sink.put(group, rows))
            rows.clear()

    async def collect(
        self,
        *,
        chunk: str,
        root: str,
        batch_id: str | None,
        spool: Path,
        blocks: Callable[[], AsyncIterator[list[bytes]]] | None,
        attempts_left_for_stream: int = 8,
        lost: tuple[str, str] | None = None,
        attempt: int = 1,
        refuse_unknown: bool = False,
    ) -> CollectSummary:
        """
        Route every request of ``chunk`` and make the outcome durable in the sinks.

        ``blocks`` opens the results stream, lists of raw lines (called again after a
        cut stream; lines already handled are skipped). It is None for a chunk that sent
        nothing (all rejects). ``lost`` (error type, message) says the batch's results are
        gone for good: every request is dead-lettered with it instead of being retried
        (sending again costs again, so that is the operator's call). Returns the summary
        the manifest records; the retry chunk's spool is sealed before this returns
        (``attempt`` is the chunk's, so its retry chunk's is one more).

        Raises:
            WrongAdoption: with *refuse_unknown*, a result's custom_id is not the spool's;
                nothing of the group holding it (or any later one) was written.
        """
        index, rejects = _index(spool)
        join = ResultJoin(self.pipeline, index, self.cost, chunk=chunk, batch_id=batch_id,
                          answers=self.answers)
        if blocks is not None:
            await self._first_pass(join, blocks, attempts_left_for_stream, refuse_unknown)
        summary = CollectSummary(
            succeeded=join.succeeded, truncated=join.truncated, unknown=join.unknown,
            cost_usd=join.cost_usd, input_tokens=join.input_tokens,
            output_tokens=join.output_tokens, unpriced=join.unpriced,
        )  # fmt: skip
        failures = join.failures
        for custom_id in join.missing():
            if lost is not None:
                failures[custom_id] = Failure(Route.DEAD, *lost)
                continue
            summary.missing += 1
            failures[custom_id] = Failure(
                Route.RETRY, "missing_result", "custom_id absent from the batch results"
            )
        if summary.missing:
            log.error("results are missing custom_ids; they will be retried",
                      pipeline=self.pipeline.name, chunk=chunk, batch_id=batch_id,
                      missing=summary.missing)
        if failures or rejects:  # the second pass, skipped when there is nothing to do
            await self._second_pass(summary, failures, chunk, root, batch_id, spool, attempt)

        for sink in self.sinks:
            await sink_call(sink, sink.flush(chunk))
        await sink_call(self.dead_letter, self.dead_letter.flush(chunk))
        return summary

    async def _first_pass(
        self,
        join: ResultJoin,
        blocks: Callable[[], AsyncIterator[list[bytes]]],
        attempts_left_for_stream: int,
        refuse_unknown: bool = False,
    ) -> None:
        """Every results line routed; successes put to the sinks while the next are parsed."""
        refuse = _refuse_unknown if refuse_unknown else _accept_unknown
        stream_attempt = 0
        async with background_puts(self.sinks, join.chunk) as hand_over:
            while True:
                try:
                    async for block in blocks():
                        join.take(block)
                        refuse(join)  # before this group is written
                        if len(join.rows) >= _GROUP_ROWS:
                            await hand_over(join.rows)
                            join.rows = []
                    break
                except StreamCut as exc:  # resume, skipping lines already handled
                    stream_attempt += 1
                    if stream_attempt >= attempts_left_for_stream:
                        raise
                    log.warning("results stream interrupted; resuming",
                                pipeline=self.pipeline.name, chunk=join.chunk,
                                batch_id=join.batch_id, lines_done=join.done,
                                error=f"{type(exc).__name__}: {exc}")
            refuse(join)  # a block cut after an unknown line was taken in part
            if join.rows:
                await hand_over(join.rows)
                join.rows = []

    async def _second_pass(
        self,
        summary: CollectSummary,
        failures: dict[str, Failure],
        chunk: str,
        root: str,
        batch_id: str | None,
        spool: Path,
        parent_attempt: int,
    ) -> None:
        """Failures and rejects, with their request bytes: dead letters or the retry chunk."""
        dead_rows: list[ResultRow] = []
        retry_writer: SpoolWriter | None = None
        retry_id = chunk_ids.retry_id(chunk, root)
        max_attempts = self.pipeline.max_attempts
        for request, meta in iter_spool(spool):
            if request is None:
                dead_rows.append(self._dead(meta, meta.get("error_type", "bad_record"),
                                            meta.get("error", ""), None, None, summary))
            else:
                failure = failures.get(meta["custom_id"])
                if failure is None:
                    continue
                attempt = int(meta.get("attempt", 1))
                history = [*meta.get("history", []), {
                    "attempt": attempt, "batch_id": batch_id,
                    "error_type": failure.error_type, "error_message": failure.message,
                }]
                if failure.route is Route.PAUSE:
                    summary.pause_reason = f"{failure.error_type}: {failure.message}"
                    summary.pause_kind = pause_kind_of_row(failure.error_type)
                exhausted = failure.route is Route.RETRY and attempt >= max_attempts
                if failure.route is Route.DEAD or exhausted:
                    meta = {**meta, "history": history}
                    dead_rows.append(self._dead(meta, failure.error_type, failure.message,
                                                orjson.loads(request), batch_id, summary))
                else:
                    if retry_writer is None:
                        retry_writer = SpoolWriter(spool.with_name(f"{retry_id}.jsonl"))
                    next_attempt = attempt + (failure.route is Route.RETRY)
                    retry_writer.add_request(
                        request, {**meta, "attempt": next_attempt, "history": history}
                    )
                    summary.retried += 1
            if len(dead_rows) >= _GROUP_ROWS:
                summary.dead += len(dead_rows)
                await self._put([self.dead_letter], chunk, dead_rows)
        summary.dead += len(dead_rows)
        await self._put([self.dead_letter], chunk, dead_rows)
        if retry_writer is not None:
            retry_writer.seal()
            summary.retry_chunk = ChunkSealed.retry(
                pipeline=self.pipeline.name, parent=chunk, parent_attempt=parent_attempt,
                chunk=retry_id, requests=retry_writer.requests, bytes=retry_writer.body_bytes,
            )

    def _dead(
        self,
        meta: dict[str, Any],
        error_type: str,
        message: str,
        request: dict[str, Any] | None,
        batch_id: str | None,
        summary: CollectSummary | None = None,
    ) -> ResultRow:
        if summary is not None:  # what the dead-letter ratio guard reports
            summary.dead_types[error_type] = summary.dead_types.get(error_type, 0) + 1
            summary.dead_examples.setdefault(error_type, message)
        return ResultRow(
            key=meta["key"],
            custom_id=meta.get("custom_id") or "",
            status="dead_letter",
            pipeline=self.pipeline.name,
            batch_id=batch_id,
            attempt=int(meta.get("attempt", 1)),
            error_type=error_type,
            error_message=message,
            history=meta.get("history", []),
            request=request,
            source=meta.get("position"),
        )
