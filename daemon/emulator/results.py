"""
A batch's results file, written from its spill file in a worker thread once it ends.

Each request's result depends on how the batch ended: a request whose finish
step (see `schedule`) came before a cancel or the TTL keeps the outcome
decided at create and gets its reply as of its own finish time (which is when
it reads or writes the prompt cache); the others are ``canceled`` or
``expired``. Writing goes block by block, so memory stays flat.

Lines come out in a shuffled, seeded order: the API does not keep request
order, and a client that relies on it must fail here rather than in production.
"""

from __future__ import annotations

import hashlib
import os
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from batchd.daemon.emulator.faults import FaultInjector
from batchd.daemon.emulator.responder import Responder
from batchd.daemon.emulator.schedule import finish_step, finish_time

__all__ = ("USAGE_KEYS", "ResultsPlan", "ResultsSummary", "write_results")

_BLOCK = 512
#: What ``usage_totals`` sums per model, over succeeded lines.
USAGE_KEYS = (
    "requests",
    "input_tokens",
    "output_tokens",
    "cache_creation_5m_input_tokens",
    "cache_creation_1h_input_tokens",
    "cache_read_input_tokens",
    "thinking_tokens",
)


@dataclass(frozen=True)
class ResultsPlan:
    """How a batch ended, which is all its results depend on besides the spill file."""

    batch_id: str
    created_at: float
    latency: float
    end_kind: str
    finished_steps: int


@dataclass
class ResultsSummary:
    """What writing the file found out: its line count and the usage per model."""

    lines: int = 0
    _sums: dict[str, list[int]] = field(default_factory=dict)

    def add_usage(self, model: str, usage: dict[str, Any]) -> None:
        sums = self._sums.get(model)
        if sums is None:
            sums = self._sums[model] = [0] * len(USAGE_KEYS)
        creation = usage["cache_creation"]
        sums[0] += 1
        sums[1] += usage["input_tokens"]
        sums[2] += usage["output_tokens"]
        sums[3] += creation["ephemeral_5m_input_tokens"]
        sums[4] += creation["ephemeral_1h_input_tokens"]
        sums[5] += usage["cache_read_input_tokens"]
        sums[6] += usage["output_tokens_details"]["thinking_tokens"]

    @property
    def usage(self) -> dict[str, Counter[str]]:
        """Per model, ``USAGE_KEYS`` → total."""
        return {model: Counter(dict(zip(USAGE_KEYS, sums, strict=True)))
                for model, sums in self._sums.items()}


def write_results(
    spill: Path, out: Path, plan: ResultsPlan, *, responder: Responder, faults: FaultInjector
) -> ResultsSummary:
    """
    Write the JSONL results of an ended batch; the file appears under its name only once complete.
    """
    tmp = out.with_suffix(".tmp")
    summary = ResultsSummary()
    writer = _LineMaker(plan, responder, faults, summary)
    with spill.open("rb") as source, tmp.open("wb", buffering=1024 * 1024) as sink:
        block: list[tuple[int, bytes]] = []
        for raw in source:
            entry = orjson.loads(raw)
            block.append((zlib.crc32(entry[0].encode()) ^ faults.seed, writer.line(entry)))
            if len(block) >= _BLOCK:
                summary.lines += _flush(block, sink)
        summary.lines += _flush(block, sink)
        sink.flush()
        os.fsync(sink.fileno())
    tmp.rename(out)
    return summary


def _flush(block: list[tuple[int, bytes]], sink: Any) -> int:
    """Write a block out of request order and empty it."""
    ordered = sorted(block, key=lambda pair: pair[0])
    if len(ordered) > 1 and [line for _, line in ordered] == [line for _, line in block]:
        ordered.reverse()
    sink.write(b"".join(line for _, line in ordered))
    count = len(block)
    block.clear()
    return count


class _LineMaker:
    def __init__(
        self,
        plan: ResultsPlan,
        responder: Responder,
        faults: FaultInjector,
        summary: ResultsSummary,
    ) -> None:
        self.plan = plan
        self.responder = responder
        self.faults = faults
        self.summary = summary

    def line(self, entry: list[Any]) -> bytes:
        """One results line for a spilled request (see `ingest` for the entry's fields)."""
        custom_id, attempt, outcome, error_type, message, params, twist = entry
        plan = self.plan
        step = finish_step(self.faults.seed, custom_id)
        result: dict[str, Any]
        if step >= plan.finished_steps:
            result = {"type": plan.end_kind}
        elif outcome == "succeeded":
            miss = self.faults.cache_read_misses(custom_id, attempt)
            reply = self.responder.message(
                plan.batch_id,
                custom_id,
                params,
                at=finish_time(plan.created_at, plan.latency, step),
                twist=twist,
                cache_miss=miss,
            )
            self.summary.add_usage(reply["model"], reply["usage"])
            result = {"type": "succeeded", "message": reply}
        elif outcome == "errored":
            digest = hashlib.blake2b(
                f"{plan.batch_id}/{custom_id}".encode(), digest_size=11
            ).hexdigest()
            result = {
                "type": "errored",
                "error": {
                    "type": "error",
                    "error": {"type": error_type, "message": message},
                    "request_id": f"req_01{digest}",
                },
            }
        else:
            result = {"type": "expired"}
        return orjson.dumps({"custom_id": custom_id, "result": result}) + b"\n"

