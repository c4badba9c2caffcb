"""
The collector's first pass: results lines joined on ``custom_id``, never by position.

Each line is parsed with orjson and looked up in the chunk's index (custom_id →
key, attempt, built from the spool). A success becomes a :class:`ResultRow`;
anything else is remembered as a failure for the second pass, which needs the
spool's request bytes to dead-letter or resend it. This is the hot path of
collecting (once per result line), so :meth:`ResultJoin.take` works a whole
network block at a time with its state in locals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
import structlog

from batchd.daemon.batches.api import StreamCut
from batchd.daemon.config import PipelineConfig
from batchd.daemon.models.pricing import CostFn
from batchd.daemon.results.answers import AnswerReader, Rejected
from batchd.daemon.results.routing import Route, route
from batchd.daemon.wal.manifest import crash_point
from batchd.plugins.errors import InvalidOutput
from batchd.plugins.manager import pm
from batchd.plugins.records import ResultRow

__all__ = ("CostFn", "Failure", "ResultJoin", "extract_output")

log = structlog.get_logger("batchd.collector")
_DONE = ("", 0)  # the index entry of a custom_id already handled (compared by identity)


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
class Failure:
    route: Route
    error_type: str
    message: str


class ResultJoin:
    """
    The first pass over one chunk's results; survives a cut stream.

    A custom_id handled is marked done in the index itself rather than in a
    second set as large as the chunk, so a resumed stream skips lines already
    routed and :meth:`missing` names the ones that never came.
    """

    def __init__(
        self,
        pipeline: PipelineConfig,
        index: dict[str, tuple[str, int]],
        cost: CostFn,
        *,
        chunk: str,
        batch_id: str | None,
        answers: AnswerReader | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.answers = answers if answers is not None else AnswerReader(pipeline)
        self.index = index
        self.cost = cost
        self.chunk = chunk
        self.batch_id = batch_id
        self.done = 0  # custom_ids handled
        self.failures: dict[str, Failure] = {}
        self.rows: list[ResultRow] = []  # successes not yet handed to the sinks
        self.succeeded = self.truncated = self.unknown = 0
        self.first_unknown: str | None = None  # what the collector's refusal names
        self.input_tokens = self.output_tokens = 0
        self.cost_usd = 0.0
        self.unpriced = 0  # billed answers of models without a price (cost unknown)
        self._parse_hooked = bool(pm.hook.batchd_parse_result.get_hookimpls())

    def missing(self) -> list[str]:
        """The custom_ids sent but not (yet) in the results."""
        return [custom_id for custom_id, entry in self.index.items() if entry is not _DONE]

    def output(self, key: str, text: str, message: dict[str, Any]) -> str:
        """The answer after the pipeline's ``[output]`` rules and the parse hook."""
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

    def take(self, block: list[bytes]) -> None:
        """
        Route every line of ``block``; successes are appended to :attr:`rows`.

        Raises:
            StreamCut: a line is not a JSON object (a cut or garbled stream).
        """
        name, batch_id = self.pipeline.name, self.batch_id
        keep_message = self.pipeline.keep_message
        index, failures, rows = self.index, self.failures, self.rows
        cost_of, output_of, loads = self.cost, self.output, orjson.loads
        read = self.answers.read
        succeeded = truncated = input_tokens = output_tokens = unpriced = 0
        cost_usd = 0.0
        try:
            for line in block:
                try:
                    obj: dict[str, Any] = loads(line)
                except orjson.JSONDecodeError as exc:
                    if not line.strip():
                        continue
                    raise StreamCut(f"unparseable results line: {line[:120]!r}") from exc
                if type(obj) is not dict:
                    raise StreamCut(f"results line is not an object: {line[:120]!r}")
                custom_id = obj.get("custom_id", "")
                entry = index.get(custom_id)
                if entry is _DONE:
                    continue
                if entry is None:
                    self.unknown += 1
                    if self.first_unknown is None:
                        self.first_unknown = str(custom_id)
                    log.error("unknown custom_id in results", pipeline=name, chunk=self.chunk,
                              batch_id=batch_id, custom_id=custom_id)
                    continue
                key, attempt = entry
                index[custom_id] = _DONE
                self.done += 1
                if self.done % 100 == 0:
                    crash_point("mid_results")
                result = obj.get("result") or {}
                if result.get("type") != "succeeded":
                    where, error_type, message = route(result)
                    failures[custom_id] = Failure(where, error_type or "", message or "")
                    continue
                # A succeeded line was billed whatever becomes of it: count it first.
                msg = result.get("message") or {}
                usage = msg.get("usage") or {}
                model = msg.get("model") or ""
                cost = cost_of(model, usage)
                if cost is None:
                    unpriced += 1
                    cost = 0.0
                cost_usd += cost
                row_in = usage.get("input_tokens") or 0
                row_out = usage.get("output_tokens") or 0
                input_tokens += row_in
                output_tokens += row_out
                answer = read(msg)
                if type(answer) is Rejected:
                    failures[custom_id] = Failure(Route.DEAD, answer.error_type, answer.message)
                    continue
                assert not isinstance(answer, Rejected)
                value = answer.value
                try:
                    if value is None:
                        output = output_of(key, answer.text, msg)
                    else:
                        output, value = self.json_output(key, answer.text, value, msg)
                except InvalidOutput as exc:
                    failures[custom_id] = Failure(Route.DEAD, "invalid_output", str(exc))
                    continue
                row = ResultRow(
                    key, custom_id, "succeeded", name, output, model, row_in, row_out,
                    usage.get("cache_creation_input_tokens") or 0,
                    usage.get("cache_read_input_tokens") or 0,
                    cost, batch_id, attempt, msg if keep_message else None,
                )  # fmt: skip
                if value is not None:
                    row.output_json = value
                if answer.truncated:
                    row.status = "truncated"
                    truncated += 1
                else:
                    succeeded += 1
                rows.append(row)
        finally:
            self.succeeded += succeeded
            self.truncated += truncated
            self.cost_usd += cost_usd
            self.input_tokens += input_tokens
            self.output_tokens += output_tokens
            self.unpriced += unpriced

    def json_output(
        self, key: str, text: str, value: Any, message: dict[str, Any]
    ) -> tuple[str, Any]:
        """A JSON answer after the parse hook (text rules do not apply to JSON)."""
        if self._parse_hooked:
            replaced = pm.hook.batchd_parse_result(
                pipeline=self.pipeline.name, key=key, output=text, message=message
            )
            if isinstance(replaced, dict | list):
                return orjson.dumps(replaced).decode(), replaced
            if replaced is not None:
                return str(replaced), None
        return text, value
