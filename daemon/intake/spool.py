"""
Spool files: the durable copy of exactly what a chunk sends.

One file per chunk, ``spool/<chunk>.jsonl``, one line per record::

    <request JSON>\\t<meta JSON>\\n      a request ({"custom_id", "params"})
    \\t<meta JSON>\\n                    a reject (bad row, unshapeable record)

Compact JSON never contains a raw tab, so the split is unambiguous. The
request half is sent byte for byte as the create body (streamed, so memory
does not grow with batch size); the meta half (key, custom_id, position,
attempt, history) is what makes the join exact and retries cheap: a retry
chunk is cut from this file, nothing is re-read from the source.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import IO, Any

import aiofiles
import orjson

from batchd.daemon.wal.storage_errors import storage_error
from batchd.plugins.fsync import fsync_dir

__all__ = (
    "BODY_CLOSE",
    "BODY_OPEN",
    "SPOOL_BLOCK",
    "SpoolWriter",
    "body_size",
    "iter_spool",
    "stream_body",
)

BODY_OPEN = b'{"requests":['
BODY_CLOSE = b"]}"
# 256 KiB: large enough for streaming, small enough that the buffers a chunk being
# written, one being sent and one being collected hold at once stay small (with 1 MiB
# they were 6–10 MB of the daemon's peak RSS; docs/benchmarks.md §7).
SPOOL_BLOCK = 1 << 18


def body_size(requests: int, request_bytes: int) -> int:
    """Bytes of the create body for ``requests`` requests totalling ``request_bytes``."""
    commas = requests - 1 if requests > 1 else 0
    return len(BODY_OPEN) + request_bytes + commas + len(BODY_CLOSE)


class SpoolWriter:
    """
    Appends lines to ``<final>.tmp``; :meth:`seal` fsyncs and renames it.

    A crash before :meth:`seal` leaves only a ``.tmp`` file, which start-up
    deletes: the records are re-read from the source, which was never told
    to move past them.
    """

    def __init__(self, final_path: Path) -> None:
        self.final_path = final_path
        self.tmp_path = final_path.with_name(final_path.name + ".tmp")
        try:
            self._file: IO[bytes] = open(self.tmp_path, "wb", buffering=SPOOL_BLOCK)
        except OSError as exc:
            raise storage_error(exc, self.tmp_path, "spool file") from None
        self.requests = 0
        self.rejects = 0
        self.request_bytes = 0

    @property
    def body_bytes(self) -> int:
        return body_size(self.requests, self.request_bytes)

    def _write(self, data: bytes) -> None:
        try:
            self._file.write(data)
        except OSError as exc:
            raise storage_error(exc, self.tmp_path, "spool file") from None

    def add_request(self, request: bytes, meta: dict[str, Any]) -> None:
        self._write(request + b"\t" + orjson.dumps(meta) + b"\n")
        self.requests += 1
        self.request_bytes += len(request)

    def add_reject(self, meta: dict[str, Any]) -> None:
        self._write(b"\t" + orjson.dumps(meta) + b"\n")
        self.rejects += 1

    def seal(self) -> None:
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.replace(self.tmp_path, self.final_path)
            fsync_dir(self.final_path.parent)
        except OSError as exc:
            raise storage_error(exc, self.tmp_path, "spool file") from None

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self._file.close()
        with contextlib.suppress(OSError):
            self.tmp_path.unlink(missing_ok=True)


def iter_spool(path: Path) -> Iterator[tuple[bytes | None, dict[str, Any]]]:
    """Yield ``(request bytes or None for a reject, meta)`` for every line."""
    with open(path, "rb", buffering=SPOOL_BLOCK) as spool:
        for line in spool:
            request, _, meta = line.rstrip(b"\n").partition(b"\t")
            yield (request or None), orjson.loads(meta)


async def stream_body(path: Path) -> AsyncIterator[bytes]:
    """The create body, ``{"requests":[…]}``, read from the spool in 1 MiB blocks."""
    yield BODY_OPEN
    first = True
    tail = b""
    async with aiofiles.open(path, "rb") as spool:
        while True:
            block = await spool.read(SPOOL_BLOCK)
            if not block:
                break
            lines = (tail + block).split(b"\n")
            tail = lines.pop()
            out = []
            for line in lines:
                tab = line.find(b"\t")
                if tab > 0:
                    out.append(line[:tab])
            if out:
                joined = b",".join(out)
                yield joined if first else b"," + joined
                first = False
    if tail.strip():
        raise ValueError(f"{path}: spool file does not end with a newline (truncated?)")
    yield BODY_CLOSE
