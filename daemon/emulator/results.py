"""
A batch's results file, written from its spill file in a worker thread.

The file for the batch's natural outcome is started at create, so a large
batch's results are usually on disk before a client asks (100,000 lines take
one to two seconds of CPU); a batch that ends canceled or expired gets its own,
trivial file at its end. Writing goes block by block, so memory stays flat.

Lines come out in a shuffled, seeded order: the API does not keep request
order, and a client that relies on it must fail here rather than in production.
"""

from __future__ import annotations

import hashlib
import os
import zlib
from pathlib import Path
from typing import Any

import orjson

from daemon.emulator.responder import Responder

__all__ = ("write_results",)

_BLOCK = 512


def write_results(
    spill: Path, out: Path, *, batch_id: str, end_kind: str, responder: Responder, seed: int
) -> int:
    """
    Write the JSONL results for a batch that ended as ``end_kind`` and return the line count.

    ``end_kind`` is ``natural`` (each request keeps the outcome decided at
    create), ``canceled`` or ``expired`` (the batch ended before processing, so
    every request gets that result). The file appears under its final name
    only once complete.
    """
    tmp = out.with_suffix(".tmp")
    lines = 0
    with spill.open("rb") as source, tmp.open("wb", buffering=1024 * 1024) as sink:
        block: list[tuple[int, bytes]] = []
        for raw in source:
            entry = orjson.loads(raw)
            line = _result_line(entry, batch_id=batch_id, end_kind=end_kind, responder=responder)
            block.append((zlib.crc32(entry[0].encode()) ^ seed, line))
            if len(block) >= _BLOCK:
                lines += _flush(block, sink)
        lines += _flush(block, sink)
        sink.flush()
        os.fsync(sink.fileno())
    tmp.rename(out)
    return lines


def _flush(block: list[tuple[int, bytes]], sink: Any) -> int:
    """Write a block out of request order and empty it."""
    ordered = sorted(block, key=lambda pair: pair[0])
    if len(ordered) > 1 and [line for _, line in ordered] == [line for _, line in block]:
        ordered.reverse()
    sink.write(b"".join(line for _, line in ordered))
    count = len(block)
    block.clear()
    return count


def _result_line(entry: list[Any], *, batch_id: str, end_kind: str, responder: Responder) -> bytes:
    """One results line for a spilled ``[custom_id, attempt, outcome, type, message, params]``."""
    custom_id, _attempt, outcome, error_type, message, params = entry
    result: dict[str, Any]
    if end_kind in ("canceled", "expired"):
        result = {"type": end_kind}
    elif outcome == "succeeded":
        result = {"type": "succeeded", "message": responder.message(batch_id, custom_id, params)}
    elif outcome == "errored":
        digest = hashlib.blake2b(f"{batch_id}/{custom_id}".encode(), digest_size=11).hexdigest()
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
