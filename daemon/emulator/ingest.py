"""
A create body, parsed while it arrives and spilled to disk one request a line.

A 100,000-request body is ~50 MB; holding it (or its parsed form) would make
the emulator's memory grow with the batch, which is exactly what batchd must
not do either. ijson yields one request at a time from the socket, the
create-time checks run on it, and it goes to the spill file at once.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

import ijson
import orjson

from batchd.daemon.emulator.faults import REQUEST_FAULT_ERRORS, FaultInjector
from batchd.daemon.emulator.schedule import FinishTally, finish_step
from batchd.daemon.emulator.validation import check_request

#: The per-request verdict: ``(error_type, message)`` for a request that ends errored.
Judge = Callable[[dict[str, Any]], tuple[str, str] | None]

__all__ = ("BodyTooLarge", "IngestFailed", "IngestSummary", "InvalidBody", "ingest_body")

_READ_SIZE = 256 * 1024


class IngestFailed(Exception):
    """A body that makes no batch."""


class BodyTooLarge(IngestFailed):
    """The body passed the size limit while it was being read."""


class InvalidBody(IngestFailed):
    """The body fails a create-time check; the message names the request at fault."""


class AsyncReadable(Protocol):
    """Anything with ``await read(n)``, like aiohttp's request content."""

    async def read(self, n: int = -1) -> bytes: ...


class _Limited:
    """Counts bytes read and stops at the limit, so nothing past it is ever buffered."""

    def __init__(self, reader: AsyncReadable, limit: int) -> None:
        self._reader = reader
        self._limit = limit
        self.total = 0

    async def read(self, n: int = -1) -> bytes:
        data = await self._reader.read(n)
        self.total += len(data)
        if self.total > self._limit:
            raise BodyTooLarge(f"request body exceeds {self._limit} bytes")
        return data


@dataclass
class IngestSummary:
    """What the store keeps about a received body (the requests stay on disk)."""

    count: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    custom_ids: dict[str, int] = field(default_factory=dict)
    tally: FinishTally = field(default_factory=FinishTally)


class _SpillWriter:
    """The spill file; a plain class so the blocking open stays out of async code."""

    def __init__(self, path: Path) -> None:
        self._file: IO[bytes] = path.open("wb", buffering=1024 * 1024)

    def write(self, line: bytes) -> None:
        self._file.write(line)

    def close(self) -> None:
        self._file.close()


async def ingest_body(
    reader: AsyncReadable,
    spill_path: Path,
    summary: IngestSummary,
    *,
    max_bytes: int,
    max_requests: int,
    faults: FaultInjector,
    attempt_of: Callable[[str], int],
    judge: Judge,
) -> IngestSummary:
    """
    Parse ``{"requests": [...]}`` from ``reader`` into ``spill_path``, tallying into ``summary``.

    Each spill line is ``[custom_id, attempt, outcome, error_type, message, params, twist]``
    where the outcome (``succeeded``/``errored``/``expired``) is decided now:
    ``judge`` (the batch's params check) and the per-request faults depend
    only on what was received and on the how-many-th receipt of the custom_id
    this is (``attempt_of`` reserves that number). ``twist`` is a fault that
    keeps the request succeeded but changes its reply (a refusal, say).

    The caller owns ``summary`` so that, whatever ends the read (a failed
    check, a dropped connection, a cancel), it can release the receipts
    reserved so far: ``summary.custom_ids`` lists them.

    Raises:
        BodyTooLarge: over ``max_bytes``.
        InvalidBody: malformed JSON or a failed create-time check.
    """
    writer = _SpillWriter(spill_path)
    try:
        limited = _Limited(reader, max_bytes)
        try:
            async for item in ijson.items(
                limited, "requests.item", use_float=True, buf_size=_READ_SIZE
            ):
                _take(summary, item, writer, max_requests, faults, attempt_of, judge)
        except ijson.JSONError as exc:
            raise InvalidBody(f"request body is not valid JSON: {exc}") from None
        if summary.count == 0:
            raise InvalidBody("requests: expected a non-empty list of {custom_id, params} objects")
    finally:
        writer.close()
    return summary


def _take(
    summary: IngestSummary,
    item: Any,
    writer: _SpillWriter,
    max_requests: int,
    faults: FaultInjector,
    attempt_of: Callable[[str], int],
    judge: Judge,
) -> None:
    """Check one request, decide its outcome and spill it."""
    index = summary.count
    if index >= max_requests:
        raise InvalidBody(f"requests: at most {max_requests} requests are allowed per batch")
    try:
        custom_id = check_request(index, item)
    except ValueError as exc:
        raise InvalidBody(str(exc)) from None
    first = summary.custom_ids.get(custom_id)
    if first is not None:
        raise InvalidBody(
            f"requests.{index}.custom_id: duplicate custom_id {custom_id!r} "
            f"(also at requests.{first}); custom_id must be unique within a batch"
        )
    summary.custom_ids[custom_id] = index
    summary.count += 1
    attempt = attempt_of(custom_id)
    params = item["params"]
    problem = judge(params)
    error_type: str | None = None
    message: str | None = None
    twist: str | None = None
    if problem is not None:
        outcome = "errored"
        error_type, message = problem
    else:
        kind = faults.request_fault(custom_id, attempt)
        if kind is None:
            outcome = "succeeded"
            twist = faults.succeeded_twist(custom_id, attempt)
            if twist is not None:
                summary.faults[twist] += 1
        else:
            summary.faults[kind] += 1
            outcome, error_type = REQUEST_FAULT_ERRORS[kind]
            message = f"emulator fault {kind} (attempt {attempt})" if error_type else None
    summary.outcomes[outcome] += 1
    summary.tally.add(outcome, finish_step(faults.seed, custom_id))
    writer.write(
        orjson.dumps([custom_id, attempt, outcome, error_type, message, params, twist]) + b"\n"
    )
