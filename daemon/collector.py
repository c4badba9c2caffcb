"""
Streams an ended batch's results, joins them on ``custom_id`` and routes
every row to exactly one place: a sink, the dead-letter sink, or the next
retry chunk.

Nothing here is positional: results come back in any order, and the join
goes through the chunk's spool (custom_id → key). Every custom_id the spool
sent must come back exactly once; a missing one is retried, an unknown one
is an alarm. Results are parsed line by line with orjson, never held whole.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import structlog

from daemon.api import StreamCut
from daemon.config import PipelineConfig
from daemon.manifest import crash_point
from daemon.routing import Route, route
from daemon.spool import SpoolWriter, iter_spool
from plugins.contract import Sink
from plugins.errors import InvalidOutput
from plugins.manager import pm
from plugins.records import ResultRow

__all__ = ("CollectSummary", "Collector", "extract_output", "retry_chunk_id")

log = structlog.get_logger("batchd.collector")
_GROUP_ROWS = 2000
CostFn = Callable[[str, dict[str, Any]], float]


def retry_chunk_id(chunk: str, root: str) -> str:
    """``root-r1`` after the root, ``root-r(k+1)`` after ``root-rk``."""
    if chunk == root:
        return f"{root}-r1"
    return f"{root}-r{int(chunk.rsplit('-r', 1)[1]) + 1}"


def extract_output(message: dict[str, Any]) -> str:
    """The answer as text: text blocks joined, else the first tool call's input as JSON."""
    content = message.get("content") or []
    if len(content) == 1 and content[0].get("type") == "text":
        return content[0].get("text", "")  # the common case, without building a list
    texts = [b.get("text", "") for b in content if b.get("type") == "text"]
    if texts:
        return "".join(texts)
    for block in content:
        if block.get("type") == "tool_use":
            return orjson.dumps(block.get("input")).decode()
    return ""


@dataclass(slots=True)
class CollectSummary:
    succeeded: int = 0
    truncated: int = 0
    dead: int = 0
    retried: int = 0
    unknown: int = 0
    missing: int = 0
    cost_usd: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0
    pause_reason: str | None = None
    retry_chunk: dict[str, Any] | None = None
    dead_types: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class _Failure:
    route: Route
    error_type: str
    message: str


class Collector:
    """Collects one chunk; a new instance per attempt, so a replay starts clean."""

    def __init__(
        self,
        pipeline: PipelineConfig,
        sinks: Sequence[Sink],
        dead_letter: Sink,
        cost: CostFn,
    ) -> None:
        self.pipeline = pipeline
        self.sinks = sinks
        self.dead_letter = dead_letter
        self.cost = cost
        self._parse_hooked = bool(pm.hook.batchd_parse_result.get_hookimpls())

    def _output(self, key: str, text: str, message: dict[str, Any]) -> str:
        out = self.pipeline.output
        if out.strip:
            text = text.strip()
        if out.lowercase:
            text = text.lower()
        if self._parse_hooked:
            replaced = pm.hook.batchd_parse_result(
                pipeline=self.pipeline.name, key=key, output=text, message=message
            )
            if replaced is not None:
                text = str(replaced)
        if out.allowed is not None and text not in out.allowed:
            raise InvalidOutput(f"answer {text[:80]!r} is not one of {list(out.allowed)}")
        return text

    async def _put(self, sinks: Sequence[Sink], group: str, rows: list[ResultRow]) -> None:
        if rows:
            for sink in sinks:
                await sink.put(group, rows)
            rows.clear()

    async def collect(
        self,
        *,
        chunk: str,
        root: str,
        batch_id: str | None,
        spool: Path,
        lines: Callable[[], AsyncIterator[bytes]] | None,
        attempts_left_for_stream: int = 8,
    ) -> CollectSummary:
        """
        Route every request of ``chunk`` and make the outcome durable in the sinks.

        ``lines`` opens the results stream (called again after a cut stream;
        lines already handled are skipped). It is None for a chunk that sent
        nothing (all rejects). Returns the summary the manifest records;
        the retry chunk's spool is sealed before this returns.
        """
        summary = CollectSummary()
        index: dict[str, tuple[str, int]] = {}
        rejects = 0
        for request, meta in iter_spool(spool):
            if request is not None:
                index[meta["custom_id"]] = (meta["key"], int(meta.get("attempt", 1)))
            else:
                rejects += 1
        failures: dict[str, _Failure] = {}
        seen: set[str] = set()
        rows: list[ResultRow] = []
        dead_rows: list[ResultRow] = []
        name = self.pipeline.name
        keep_message = self.pipeline.keep_message

        if lines is not None:
            stream_attempt = 0
            while True:
                try:
                    async for line in lines():
                        try:
                            obj = orjson.loads(line)
                        except orjson.JSONDecodeError as exc:
                            raise StreamCut(f"unparseable results line: {line[:120]!r}") from exc
                        custom_id = obj.get("custom_id")
                        if custom_id in seen:
                            continue
                        entry = index.get(custom_id)
                        if entry is None:
                            summary.unknown += 1
                            log.error("unknown custom_id in results", pipeline=name,
                                      chunk=chunk, batch_id=batch_id, custom_id=custom_id)
                            continue
                        key, attempt = entry
                        seen.add(custom_id)
                        if len(seen) % 100 == 0:
                            crash_point("mid_results")
                        result = obj.get("result") or {}
                        where, error_type, message = route(result)
                        if where is not Route.SUCCEEDED:
                            failures[custom_id] = _Failure(where, error_type or "", message or "")
                            continue
                        msg = result.get("message") or {}
                        usage = msg.get("usage") or {}
                        model = msg.get("model") or ""
                        try:
                            output = self._output(key, extract_output(msg), msg)
                        except InvalidOutput as exc:
                            failures[custom_id] = _Failure(Route.DEAD, "invalid_output", str(exc))
                            continue
                        cost = self.cost(model, usage)
                        truncated = msg.get("stop_reason") == "max_tokens"
                        rows.append(
                            ResultRow(
                                key=key,
                                custom_id=custom_id,
                                status="truncated" if truncated else "succeeded",
                                pipeline=name,
                                output=output,
                                model=model,
                                input_tokens=usage.get("input_tokens") or 0,
                                output_tokens=usage.get("output_tokens") or 0,
                                cache_creation_input_tokens=usage.get(
                                    "cache_creation_input_tokens") or 0,
                                cache_read_input_tokens=usage.get("cache_read_input_tokens") or 0,
                                cost_usd=cost,
                                batch_id=batch_id,
                                attempt=attempt,
                                message=msg if keep_message else None,
                            )
                        )
                        summary.truncated += truncated
                        summary.succeeded += not truncated
                        summary.cost_usd += cost
                        summary.input_tokens += usage.get("input_tokens") or 0
                        summary.output_tokens += usage.get("output_tokens") or 0
                        if len(rows) >= _GROUP_ROWS:
                            await self._put(self.sinks, chunk, rows)
                    break
                except StreamCut as exc:  # resume, skipping lines already handled
                    stream_attempt += 1
                    if stream_attempt >= attempts_left_for_stream:
                        raise
                    log.warning("results stream interrupted; resuming", pipeline=name,
                                chunk=chunk, batch_id=batch_id, lines_done=len(seen),
                                error=f"{type(exc).__name__}: {exc}")
        await self._put(self.sinks, chunk, rows)

        for custom_id in index.keys() - seen:
            summary.missing += 1
            failures[custom_id] = _Failure(
                Route.RETRY, "missing_result", "custom_id absent from the batch results"
            )
        if summary.missing:
            log.error("results are missing custom_ids; they will be retried", pipeline=name,
                      chunk=chunk, batch_id=batch_id, missing=summary.missing)

        retry_writer: SpoolWriter | None = None
        retry_id = retry_chunk_id(chunk, root)
        max_attempts = self.pipeline.max_attempts
        # The second pass, for failures and rejects, is skipped when there are none.
        for request, meta in iter_spool(spool) if failures or rejects else ():
            if request is None:
                dead_rows.append(self._dead(meta, meta.get("error_type", "bad_record"),
                                            meta.get("error", ""), None, None))
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
                exhausted = failure.route is Route.RETRY and attempt >= max_attempts
                if failure.route is Route.DEAD or exhausted:
                    meta = {**meta, "history": history}
                    dead_rows.append(self._dead(meta, failure.error_type, failure.message,
                                                orjson.loads(request), batch_id))
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

        for sink in self.sinks:
            await sink.flush(chunk)
        await self.dead_letter.flush(chunk)
        if retry_writer is not None:
            retry_writer.seal()
            summary.retry_chunk = {
                "chunk": retry_id,
                "requests": retry_writer.requests,
                "bytes": retry_writer.body_bytes,
            }
        return summary

    def _dead(
        self,
        meta: dict[str, Any],
        error_type: str,
        message: str,
        request: dict[str, Any] | None,
        batch_id: str | None,
    ) -> ResultRow:
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
