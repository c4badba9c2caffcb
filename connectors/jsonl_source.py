"""
The ``jsonl`` source: one record per JSON object line, resumable by byte offset.

It shares the CSV source's approach (binary file, byte offsets, a worker
thread per poll) but a record is always exactly one line, so a bad line is
simply an error record and the next line starts clean.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from batchd.connectors._file_source import FileSource
from batchd.plugins.contract import PluginContext
from batchd.plugins.hookspecs import hookimpl
from batchd.plugins.options import Options
from batchd.plugins.records import Record

__all__ = ("JsonlSource", "register_sources")

_KEY_SCAN = 64 * 1024  # bytes of a bad line searched for its key


class JsonlSource(FileSource):
    """
    Reads a file of JSON objects, one per line; blank lines are skipped.

    Positions are ``{"line", "offset"}``: the 1-based line number and the
    byte offset just after the line. ``max_line_bytes`` (default 64 MiB)
    bounds memory: a longer line is an error record.
    """

    what = "jsonl source"

    def __init__(self, options: dict[str, Any], context: PluginContext) -> None:
        opts = Options(options, context, what=self.what)
        super().__init__(opts.path("path"), context, label=opts.text("path"))
        key = self._key = opts.text("key")
        self._fields: list[str] | None = opts.strings("fields", None)
        self.max_records = opts.integer("batch", self.max_records, min=1)
        self.max_line_bytes = opts.integer("max_line_bytes", self.max_line_bytes, min=1)
        opts.finish()
        # The key member as it appears right after "{" or ",": its value up to the next
        # "," or "}" (a string with escapes, or a number).
        name = re.escape(orjson.dumps(key))
        self._key_pattern = re.compile(
            rb'[{,]\s*' + name + rb'\s*:\s*("(?:[^"\\\x00-\x1f]|\\.)*"|-?\d+(?:\.\d+)?)\s*[,}]'
        )

    # -- worker-thread side -------------------------------------------------

    def overlong_line(self, head: bytes, line: int) -> Record:
        """An error record, keyed by the line's key when its start holds it intact."""
        return self._bad(line, f"line longer than max_line_bytes ({self.max_line_bytes})", head)

    def _bad(self, line: int, reason: str, raw: bytes = b"") -> Record:
        return self.error_record(line, reason, self._key_in(raw))

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

    def parse_line(self, raw: bytes, line: int) -> Record | None:
        """A JSON object line as a record; a bad one as an error record naming the line."""
        if not raw.strip():
            return None
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
        return Record(key, fields, self.position(line))


@hookimpl
def register_sources(register: Any) -> None:
    """The built-in ``jsonl`` source type."""
    register("jsonl", JsonlSource)
