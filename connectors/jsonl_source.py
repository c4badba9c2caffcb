"""
The ``jsonl`` source: one record per JSON object line, resumable by byte offset.

It shares the CSV source's approach (binary file, byte offsets, a worker
thread per poll) but a record is always exactly one line, so a bad line is
simply an error record and the next line starts clean.
"""

from __future__ import annotations

from typing import Any, BinaryIO

import anyio
import orjson

from connectors._lines import LineReader, check_options, option_int, option_str_list
from plugins.contract import PluginContext, Source
from plugins.errors import ConfigError, FatalError
from plugins.hookspecs import hookimpl
from plugins.records import Record

__all__ = ("JsonlSource", "register_sources")

_WHAT = "jsonl source"
_POLL_BYTES = 4 * 1024 * 1024  # input parsed per poll, so a poll returns promptly
_BOM = b"\xef\xbb\xbf"


class JsonlSource(Source):
    """
    Reads a file of JSON objects, one per line; blank lines are skipped.

    Positions are ``{"line", "offset"}``: the 1-based line number and the
    byte offset just after the line. ``max_line_bytes`` (default 64 MiB)
    bounds memory: a longer line is an error record.
    """

    def __init__(self, options: dict[str, Any], context: PluginContext) -> None:
        check_options(
            _WHAT, options, required=("path", "key"), optional=("fields", "batch", "max_line_bytes")
        )
        path, key = options["path"], options["key"]
        if not isinstance(path, str) or not isinstance(key, str):
            raise ConfigError(f"{_WHAT}: options 'path' and 'key' must be strings")
        self._label = path
        self._path = context.resolve_path(path)
        self._key = key
        self._fields = option_str_list(_WHAT, options, "fields")
        self.max_records = option_int(_WHAT, options, "batch", 1000)
        self._max_line = option_int(_WHAT, options, "max_line_bytes", 64 * 1024 * 1024)
        self._limiter = anyio.CapacityLimiter(1)
        self._file: BinaryIO | None = None
        self._pending: list[Record] | None = None

    async def start(self, resume: dict[str, Any] | None) -> None:
        """Open the file and seek just past ``resume``."""
        await anyio.to_thread.run_sync(self._open, resume, limiter=self._limiter)

    async def poll(self) -> list[Record] | None:
        """Parse up to ``batch`` lines in a worker thread; ``None`` at end of file."""
        if self._file is None:
            raise FatalError(f"{_WHAT} {self._label}: poll() before start()")
        if self._pending is None:
            # A cancelled poll leaves its batch in _pending for the next one.
            await anyio.to_thread.run_sync(self._read_batch, limiter=self._limiter)
        out, self._pending = self._pending, None
        return out or None

    async def aclose(self) -> None:
        """Close the file; safe to call twice."""
        file, self._file = self._file, None
        if file is not None:
            file.close()

    # -- worker-thread side -------------------------------------------------

    def _open(self, resume: dict[str, Any] | None) -> None:
        try:
            file = open(self._path, "rb")  # kept open until aclose
        except FileNotFoundError:
            raise FatalError(f"{_WHAT}: file not found: {self._path}") from None
        except OSError as exc:
            raise FatalError(f"{_WHAT}: cannot open {self._path}: {exc.strerror}") from None
        try:
            self._lines = LineReader(file)
            if resume is not None:
                self._seek(file, resume)
        except BaseException:
            file.close()
            raise
        self._file = file

    def _seek(self, file: BinaryIO, resume: dict[str, Any]) -> None:
        try:
            offset, line = int(resume["offset"]), int(resume["line"])
        except (KeyError, TypeError, ValueError):
            raise FatalError(
                f"{_WHAT} {self._label}: unusable resume position {resume!r}"
            ) from None
        size = file.seek(0, 2)
        ok = 0 <= offset <= size
        if ok and offset > 0:
            file.seek(offset - 1)
            ok = file.read(1) == b"\n" or offset == size
        if not ok:
            raise FatalError(
                f"{_WHAT}: cannot resume {self._label} at byte {offset} (file is {size} bytes, "
                "and a line must end there): was the file replaced or truncated?"
            )
        file.seek(offset)
        self._lines.offset, self._lines.line = offset, line + 1

    def _read_batch(self) -> None:
        out: list[Record] = []
        lines = self._lines
        begin = lines.offset
        while len(out) < self.max_records and lines.offset - begin < _POLL_BYTES:
            at_start = lines.offset == 0
            line_no = lines.line
            raw = lines.read_line(self._max_line + 1)
            if not raw:
                break
            if len(raw) > self._max_line:
                lines.skip_line()
                reason = f"line longer than max_line_bytes ({self._max_line})"
                out.append(self._bad(line_no, reason))
                continue
            if at_start and raw.startswith(_BOM):
                raw = raw[len(_BOM) :]
            if raw.strip():
                out.append(self._record(raw, line_no))
        self._pending = out

    def _position(self, line: int) -> dict[str, Any]:
        return {"line": line, "offset": self._lines.offset}

    def _bad(self, line: int, reason: str) -> Record:
        error = f"{self._label} line {line}: {reason}"
        return Record(f"line-{line}", {}, self._position(line), error)

    def _record(self, raw: bytes, line: int) -> Record:
        try:
            value = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            return self._bad(line, f"not valid JSON ({exc})")
        if not isinstance(value, dict):
            return self._bad(line, f"expected a JSON object, got {type(value).__name__}")
        key = value.get(self._key)
        if key is None:
            return self._bad(line, f"key field {self._key!r} is missing or null")
        if isinstance(key, bool) or not isinstance(key, str | int | float):
            return self._bad(line, f"key field {self._key!r} must be a string or number")
        key = str(key)
        if key == "":
            return self._bad(line, f"key field {self._key!r} is empty")
        if self._fields is None:
            fields = value
        else:
            fields = {name: value[name] for name in self._fields if name in value}
        return Record(key, fields, self._position(line))


@hookimpl
def register_sources(register: Any) -> None:
    """The built-in ``jsonl`` source type."""
    register("jsonl", JsonlSource)
