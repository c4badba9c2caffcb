"""
The ``jsonl`` source: one record per JSON object line, resumable by byte offset.

It shares the CSV source's approach (binary file, byte offsets, a worker
thread per poll) but a record is always exactly one line, so a bad line is
simply an error record and the next line starts clean.
"""

from __future__ import annotations

import re
from typing import Any, BinaryIO

import orjson

from batchd.connectors._file_source import FileSource
from batchd.connectors._lines import LineReader, check_options, option_int, option_str_list
from batchd.plugins.contract import PluginContext
from batchd.plugins.errors import ConfigError, FatalError
from batchd.plugins.hookspecs import hookimpl
from batchd.plugins.records import Record

__all__ = ("JsonlSource", "register_sources")

_WHAT = "jsonl source"
_POLL_BYTES = 4 * 1024 * 1024  # input parsed per poll, so a poll returns promptly
_BOM = b"\xef\xbb\xbf"
_KEY_SCAN = 64 * 1024  # bytes of a bad line searched for its key


class JsonlSource(FileSource):
    _what = _WHAT

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
        super().__init__(path, context.resolve_path(path), until_drained=context.until_drained)
        self._key = key
        self._fields = option_str_list(_WHAT, options, "fields")
        self.max_records = option_int(_WHAT, options, "batch", 1000)
        self._max_line = option_int(_WHAT, options, "max_line_bytes", 64 * 1024 * 1024)
        # The key member as it appears right after "{" or ",": its value up to the next
        # "," or "}" (a string with escapes, or a number).
        name = re.escape(orjson.dumps(key))
        self._key_pattern = re.compile(
            rb'[{,]\s*' + name + rb'\s*:\s*("(?:[^"\\\x00-\x1f]|\\.)*"|-?\d+(?:\.\d+)?)\s*[,}]'
        )

    # -- worker-thread side -------------------------------------------------

    def _prepare(self, file: BinaryIO, resume: dict[str, Any] | None) -> None:
        self._lines = LineReader(file)
        if resume is not None:
            self._seek(file, resume)

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
                out.append(self._bad(line_no, reason, raw))
                continue
            if at_start and raw.startswith(_BOM):
                raw = raw[len(_BOM) :]
            if raw.strip():
                out.append(self._record(raw, line_no))
        self._pending = out

    def _position(self, line: int) -> dict[str, Any]:
        return {"line": line, "offset": self._lines.offset}

    def _bad(self, line: int, reason: str, raw: bytes = b"") -> Record:
        error = f"{self._label} line {line}: {reason}"
        key = self._key_in(raw) or f"line-{line}"
        return Record(key, {}, self._position(line), error)

    def _key_in(self, raw: bytes) -> str | None:
        """
        The key of a line that cannot be parsed whole (too long, a bad byte elsewhere),
        when its key member is there intact: a complete string or number at the top level.
        """
        found = self._key_pattern.findall(raw[:_KEY_SCAN])
        if len(found) != 1:  # none, or one in a nested object too: not trustworthy
            return None
        try:
            key = orjson.loads(found[0])
        except orjson.JSONDecodeError:
            return None
        if isinstance(key, bool) or not isinstance(key, str | int | float):
            return None
        key = str(key)
        return key if key and "\x00" not in key else None

    def _record(self, raw: bytes, line: int) -> Record:
        try:
            value = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            return self._bad(line, f"not valid JSON ({exc})", raw)
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
