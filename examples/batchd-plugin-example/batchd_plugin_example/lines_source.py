"""
The ``example-lines`` source: one record per non-empty line of a text file.

The file is read as bytes and each line decoded here, so a record's position
is a byte offset that :meth:`LinesSource.start` can seek straight to (a
text-mode ``tell()`` is an opaque cookie that cannot be stored). A line that
cannot be used — bad bytes, too long, no key — becomes an error record: batchd
dead-letters it with the reason and the position, and the run goes on.
"""

from __future__ import annotations

import hashlib
from typing import Any, BinaryIO

import anyio
import batchd

from batchd_plugin_example._options import check_keys, positive_int, text_option

__all__ = ("KEY_MODES", "LinesSource")

KEY_MODES = ("hash", "prefix")
_WHAT = "example-lines source"
_POLL_BYTES = 4 * 1024 * 1024  # read at most this much per poll, so a poll returns promptly
_SKIP_CHUNK = 64 * 1024


class LinesSource(batchd.Source):
    """
    Reads ``path``; each non-empty line becomes a record whose field ``text``
    (or the name in option ``field``) holds the line without its line ending.

    Keys: ``key = "hash"`` (the default) is the first 16 hex digits of the
    SHA-256 of the text, so the same text always gets the same key and a
    repeated line is reported as a duplicate; ``key = "prefix"`` reads
    ``KEY: TEXT`` lines. Positions are ``{"line": n, "offset": b}``: the
    1-based line number and the byte offset just after the line.
    """

    def __init__(self, options: dict[str, Any], context: batchd.PluginContext) -> None:
        # Step 1 of the lifecycle: validate everything, touch nothing on disk.
        check_keys(_WHAT, options, ("path",), ("key", "field", "max_line_bytes", "batch"))
        self._label = text_option(_WHAT, options, "path", None)
        self._path = context.resolve_path(self._label)
        self._key_mode = options.get("key", "hash")
        if self._key_mode not in KEY_MODES:
            raise batchd.ConfigError(
                f"{_WHAT}: option 'key' must be one of {', '.join(KEY_MODES)}, "
                f"got {self._key_mode!r}"
            )
        self._field = text_option(_WHAT, options, "field", "text")
        self._max_line = positive_int(_WHAT, options, "max_line_bytes", 1024 * 1024)
        self.max_records = positive_int(_WHAT, options, "batch", 1000)
        self._file: BinaryIO | None = None
        self._line = 0  # number of the last line read
        self._offset = 0  # byte offset just after it
        self._pending: list[batchd.Record] | None = None
        # One worker thread at a time: the file object is not shared between threads.
        self._limiter = anyio.CapacityLimiter(1)

    async def start(self, resume: dict[str, Any] | None) -> None:
        """Open the file and seek just past ``resume`` (the last sealed record)."""
        await anyio.to_thread.run_sync(self._open, resume, limiter=self._limiter)

    async def poll(self) -> list[batchd.Record] | None:
        """Up to ``batch`` records read in a worker thread; ``None`` at end of file."""
        if self._file is None:
            raise batchd.FatalError(f"{_WHAT} {self._label}: poll() before start()")
        if self._pending is None:
            # The thread leaves its records in _pending: if this poll is cancelled while
            # the thread finishes, the records are not lost — the next poll returns them.
            await anyio.to_thread.run_sync(self._read_batch, limiter=self._limiter)
        records, self._pending = self._pending, None
        return records or None

    async def aclose(self) -> None:
        """Close the file; safe to call twice."""
        file, self._file = self._file, None
        if file is not None:
            file.close()

    # -- worker-thread side ----------------------------------------------------

    def _open(self, resume: dict[str, Any] | None) -> None:
        try:
            file = open(self._path, "rb")  # kept open until aclose
        except FileNotFoundError:
            raise batchd.FatalError(f"{_WHAT}: file not found: {self._path}") from None
        except OSError as exc:
            raise batchd.FatalError(f"{_WHAT}: cannot open {self._path}: {exc.strerror}") from None
        if resume is not None:
            try:
                self._seek(file, resume)
            except BaseException:
                file.close()
                raise
        self._file = file

    def _seek(self, file: BinaryIO, resume: dict[str, Any]) -> None:
        try:
            offset, line = int(resume["offset"]), int(resume["line"])
        except (KeyError, TypeError, ValueError):
            raise batchd.FatalError(
                f"{_WHAT} {self._label}: unusable resume position {resume!r}"
            ) from None
        size = file.seek(0, 2)
        ok = 0 <= offset <= size
        if ok and 0 < offset < size:
            file.seek(offset - 1)
            ok = file.read(1) == b"\n"
        if not ok:
            # Resuming anywhere else would silently skip or repeat rows.
            raise batchd.FatalError(
                f"{_WHAT}: cannot resume {self._label} at byte {offset} (file is {size} bytes "
                "and no line ends there): was the file replaced or truncated?"
            )
        file.seek(offset)
        self._offset, self._line = offset, line

    def _read_batch(self) -> None:
        assert self._file is not None
        records: list[batchd.Record] = []
        begin = self._offset
        while len(records) < self.max_records and self._offset - begin < _POLL_BYTES:
            raw = self._file.readline(self._max_line + 1)
            if not raw:
                break
            self._line += 1
            self._offset += len(raw)
            if len(raw) > self._max_line and not raw.endswith(b"\n"):
                self._offset += self._skip_rest_of_line()
                reason = f"line is longer than max_line_bytes ({self._max_line})"
                records.append(self._error(reason))
                continue
            record = self._record(raw)
            if record is not None:
                records.append(record)
        self._pending = records

    def _skip_rest_of_line(self) -> int:
        """Move past the next newline in fixed-size reads, so a giant line is never held."""
        assert self._file is not None
        skipped = 0
        while chunk := self._file.read(_SKIP_CHUNK):
            newline = chunk.find(b"\n")
            if newline >= 0:
                self._file.seek(newline + 1 - len(chunk), 1)
                return skipped + newline + 1
            skipped += len(chunk)
        return skipped

    def _record(self, raw: bytes) -> batchd.Record | None:
        try:
            text = raw.decode("utf-8").strip()
        except UnicodeDecodeError as exc:
            return self._error(f"not valid UTF-8 (byte {exc.start + 1} of the line)")
        if not text:
            return None  # a blank line is not a record
        if self._key_mode == "hash":
            key = hashlib.sha256(text.encode()).hexdigest()[:16]
            return batchd.Record(key, {self._field: text}, self._position())
        key, colon, body = text.partition(":")
        key, body = key.strip(), body.strip()
        if not colon or not key:
            return self._error("expected 'KEY: TEXT' (no ':' or an empty key)")
        if not body:
            return self._error(f"no text after the key {key!r}", key=key)
        return batchd.Record(key, {self._field: body}, self._position())

    def _position(self) -> dict[str, Any]:
        return {"line": self._line, "offset": self._offset}

    def _error(self, reason: str, key: str | None = None) -> batchd.Record:
        """An error record: it names the file and line, and never reaches the API."""
        return batchd.Record(
            key or f"line-{self._line}",
            {},
            self._position(),
            error=f"{self._label} line {self._line}: {reason}",
        )
