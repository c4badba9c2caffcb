"""
The ``csv`` source: one record per data row, resumable by byte offset.

The csv module is fed one physical line at a time from a binary file decoded
here, so every record's end is a byte offset that ``start`` can seek to
directly, quoted fields may span lines, and a bad row (wrong width, bad
bytes, a giant field) becomes an error record instead of ending the run.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from typing import Any, BinaryIO, NamedTuple

from batchd.connectors._file_source import FileSource
from batchd.connectors._lines import LineReader, text_codec
from batchd.plugins.contract import PluginContext
from batchd.plugins.errors import FatalError
from batchd.plugins.hookspecs import hookimpl
from batchd.plugins.options import Options
from batchd.plugins.records import Record

__all__ = ("CsvSource", "register_sources")

_WHAT = "csv source"
_DIALECTS = ("excel", "excel-tab", "unix", "sniff")
_SNIFF_BYTES = 64 * 1024
_SNIFF_DELIMITERS = ",;\t|"  # left to itself the sniffer may pick a letter
_POLL_BYTES = 4 * 1024 * 1024  # input parsed per poll, so a poll returns promptly
_HEADER_CAP = 64 * 1024 * 1024

csv.field_size_limit(2**31 - 1)  # field size is checked here, in bytes, per source


class _Oversize(Exception):
    """A record grew past its byte cap; the feeder has already skipped the rest of it."""


_HEAD_BYTES = 64 * 1024  # of a record kept to find its key when the rest is too large


@dataclass(slots=True)
class _Problem:
    line: int
    reason: str
    keeps_key: bool = False  # the key column is still trustworthy
    key: str | None = None  # the key, when it was read from a record that has no row


class _Feeder:
    """Hands ``csv.reader`` one decoded physical line at a time and notes what it saw."""

    def __init__(self, lines: LineReader, codecs: tuple[str, str], quote: str | None) -> None:
        self.lines = lines
        self.first_codec, self.rest_codec = codecs
        self.quote = quote
        self.quote_bytes = quote.encode(self.rest_codec) if quote else b""
        self.cap = _HEADER_CAP
        self.reset()

    def reset(self) -> None:
        """Forget the previous record's bookkeeping."""
        self.record_bytes = 0
        self.odd_quotes = False
        self.problem: _Problem | None = None
        self.eof = False
        self.head = b""

    def __iter__(self) -> _Feeder:
        return self

    def __next__(self) -> str:
        room = self.cap - self.record_bytes
        line_no = self.lines.line
        codec = self.first_codec if self.lines.offset == 0 else self.rest_codec
        raw = self.lines.read_line(room + 1)
        if not raw:
            self.eof = True
            raise StopIteration
        self.record_bytes += len(raw)
        if len(self.head) < _HEAD_BYTES:
            self.head += raw[: _HEAD_BYTES - len(self.head)]
        if len(raw) > room:
            odd = self.odd_quotes ^ bool(raw.count(self.quote_bytes) & 1) if self.quote else False
            self.lines.skip_record(self.quote_bytes, odd)
            raise _Oversize
        try:
            text = raw.decode(codec)
        except UnicodeDecodeError as exc:
            text = raw.decode(codec, "replace")
            where = f"byte {exc.start + 1} of the line"
            self._note(line_no, f"undecodable bytes for encoding {codec} at {where}")
        if "\x00" in text:
            self._note(line_no, "NUL byte in row")
        if self.quote:
            self.odd_quotes ^= bool(text.count(self.quote) & 1)
        return text

    def _note(self, line: int, reason: str) -> None:
        if self.problem is None:
            self.problem = _Problem(line, reason)


class _Parsed(NamedTuple):
    row: list[str] | None
    line: int
    end_line: int
    offset: int
    problem: _Problem | None


class CsvSource(FileSource):
    """
    Reads a CSV file with a header row; each data row becomes one record.

    Positions are ``{"line", "row", "offset", "end_line"}``: the physical line
    a record starts on, its 0-based data-row index, the byte offset just after
    it and the physical line it ends on (so line numbers stay right after a
    resume past a multi-line record).
    """

    what = _WHAT

    def __init__(self, options: dict[str, Any], context: PluginContext) -> None:
        opts = Options(options, context, what=_WHAT)
        super().__init__(opts.path("path"), context, label=opts.text("path"))
        self._key: str = opts.text("key")
        self._fields: list[str] | None = opts.strings("fields", None)
        self._dialect_name = opts.choice("dialect", _DIALECTS, "excel")
        self._delimiter: Any = opts.get("delimiter", str)
        if self._delimiter is not None and len(self._delimiter) != 1:
            raise opts.error("delimiter", f"must be one character, got {self._delimiter!r}")
        self._codecs = text_codec(opts, "encoding", "utf-8-sig")
        self._max_field = opts.integer("max_field_bytes", 16 * 1024 * 1024, min=1)
        self.max_records = opts.integer("batch", self.max_records, min=1)
        opts.finish()

    # -- worker-thread side -------------------------------------------------


    def field_names(self) -> list[str] | None:
        """The header's columns (or the ``fields`` chosen from them), known after ``start``."""
        field_index = getattr(self, "_field_index", None)
        return None if field_index is None else [name for name, _ in field_index]

    def _prepare(self, file: BinaryIO, resume: dict[str, Any] | None) -> None:
        dialect = self._pick_dialect(file)
        file.seek(0)
        self._lines = LineReader(file)
        quote = None if dialect.quoting == csv.QUOTE_NONE else dialect.quotechar
        self._feeder = _Feeder(self._lines, self._codecs, quote)
        overrides = {"delimiter": self._delimiter} if self._delimiter else {}
        self._dialect, self._overrides = dialect, overrides
        self._reader = csv.reader(self._feeder, dialect, **overrides)
        self._read_header()
        self._row = 0
        if resume is not None:
            self._seek(file, resume)

    def _pick_dialect(self, file: BinaryIO) -> Any:
        if self._dialect_name != "sniff":
            return csv.get_dialect(self._dialect_name)
        sample = file.read(_SNIFF_BYTES)
        if len(sample) == _SNIFF_BYTES and b"\n" in sample:
            sample = sample[: sample.rindex(b"\n") + 1]
        text = sample.decode(self._codecs[0], "replace")
        try:
            return csv.Sniffer().sniff(text, delimiters=_SNIFF_DELIMITERS)
        except csv.Error:
            raise FatalError(
                f"{_WHAT}: could not detect the CSV dialect of {self._label} from its first "
                "64 KiB; set dialect = \"excel\", \"excel-tab\" or \"unix\" (or delimiter)"
            ) from None

    def _read_header(self) -> None:
        parsed = self._next_row()
        if parsed is None:
            raise FatalError(f"{_WHAT}: {self._label} is empty: expected a header row")
        if parsed.row is None or parsed.problem is not None:
            why = parsed.problem.reason if parsed.problem else "header row too large"
            raise FatalError(f"{_WHAT}: {self._label} line 1: unreadable header ({why})")
        header = self._header = parsed.row
        self._ncols = len(header)
        found = ", ".join(repr(name) for name in header)
        hint = ""
        if header and header[0].startswith("\ufeff"):
            hint = " (the file starts with a byte-order mark: use encoding = \"utf-8-sig\")"
        elif len(header) == 1 and (sep := next((c for c in ";\t|," if c in header[0]), None)):
            hint = (f" (the header looks {sep!r}-separated: set delimiter = {sep!r} "
                    "or dialect = \"sniff\")")
        wanted = [self._key, *(self._fields or [])]
        for name in wanted:
            if name not in header:
                what = "key column" if name == self._key else "field"
                raise FatalError(
                    f"{_WHAT}: {self._label} has no {what} {name!r}; columns found: {found}{hint}"
                )
            if header.count(name) > 1:
                raise FatalError(f"{_WHAT}: {self._label}: column {name!r} appears twice")
        self._key_index = header.index(self._key)
        names = self._fields if self._fields is not None else header
        self._field_index = [(name, header.index(name)) for name in names]
        # Past this many bytes a row must hold a field over the limit (every
        # character quoted and doubled, plus quotes and delimiters).
        self._feeder.cap = self._ncols * (2 * self._max_field + 3) + 2

    def _seek(self, file: BinaryIO, resume: dict[str, Any]) -> None:
        try:
            offset, line, row = int(resume["offset"]), int(resume["line"]), int(resume["row"])
            end_line = int(resume.get("end_line", line))
        except (KeyError, TypeError, ValueError):
            raise self._unusable(resume) from None
        self._seek_to(file, offset, end_line + 1, "record")  # past the header: offset >= it
        self._row = row + 1

    def _next_row(self) -> _Parsed | None:
        while True:
            self._feeder.reset()
            lines = self._lines
            start, start_offset, start_last = lines.line, lines.offset, lines.last_line
            problem: _Problem | None
            try:
                row: list[str] | None = next(self._reader)
            except StopIteration:
                row, problem = None, None
            except _Oversize:
                reason = f"a field is larger than max_field_bytes ({self._max_field})"
                row, problem = None, _Problem(start, reason, key=self._key_from_head())
            except csv.Error as exc:
                row, problem = None, _Problem(start, f"unparseable row ({exc})")
            else:
                if not row and self._feeder.problem is None:
                    continue  # blank line: not a row
                problem = self._feeder.problem
                if problem is None and self._feeder.eof and self._feeder.odd_quotes:
                    problem = _Problem(start, "unterminated quoted field at end of file")
            if lines.held:
                # The record's last line has no newline yet: it may still be being
                # written. Leave the whole record for a later read.
                lines.rewind(start_offset, start, start_last)
                return None
            if row is None and problem is None:
                return None
            if problem is not None and row is not None and self._key_is_clean(row):
                problem.keeps_key = True
            return _Parsed(row, start, self._lines.last_line, self._lines.offset, problem)

    def _key_is_clean(self, row: list[str]) -> bool:
        """A bad byte elsewhere in the row leaves the key column trustworthy."""
        if not hasattr(self, "_key_index"):  # the header itself: no key column yet
            return False
        if len(row) <= self._key_index:
            return False
        key = row[self._key_index]
        return bool(key) and "\x00" not in key and "\ufffd" not in key

    def _key_from_head(self) -> str | None:
        """The key of a record too large to parse, when it sits before the oversized field."""
        if not hasattr(self, "_key_index"):  # the header itself: no key column yet
            return None
        text = self._feeder.head.decode(self._codecs[1], "replace")
        try:
            fields = next(csv.reader([text], self._dialect, **self._overrides), [])
        except csv.Error:
            return None
        # Only a key followed by another field is whole (the head may end inside it).
        if len(fields) > self._key_index + 1:
            key = fields[self._key_index]
            if key and "\x00" not in key and "\ufffd" not in key:
                return key
        return None

    def _read_batch(self) -> None:
        out: list[Record] = []
        begin = self._lines.offset
        while len(out) < self.max_records and self._lines.offset - begin < _POLL_BYTES:
            parsed = self._next_row()
            if parsed is None:
                break
            out.append(self._record(parsed))
            self._row += 1
        self._pending = out

    def _record(self, parsed: _Parsed) -> Record:
        position = {
            "line": parsed.line,
            "row": self._row,
            "offset": parsed.offset,
            "end_line": parsed.end_line,
        }
        row, problem = parsed.row, parsed.problem
        if problem is None and row is not None:
            problem = self._check(row, parsed.line)
        key = f"line-{parsed.line}"
        if row is not None and (problem is None or problem.keeps_key):
            key = row[self._key_index]
        elif row is None and problem is not None and problem.key:
            key = problem.key
        if problem is not None:
            return Record(key, {}, position, f"{self._label} line {problem.line}: {problem.reason}")
        assert row is not None
        return Record(key, {name: row[i] for name, i in self._field_index}, position)

    def _check(self, row: list[str], line: int) -> _Problem | None:
        if row[self._key_index:] and row[self._key_index] == "":
            return _Problem(line, f"empty key column {self._key!r}")
        if len(row) != self._ncols:
            reason = f"expected {self._ncols} columns, got {len(row)}"
            return _Problem(line, reason, keeps_key=self._key_index < len(row))
        limit = self._max_field
        for index, value in enumerate(row):
            if len(value) * 4 > limit:
                size = len(value.encode(self._codecs[1], "replace"))
                if size > limit:
                    reason = (
                        f"column {self._header[index]!r} is {size} bytes, "
                        f"over max_field_bytes ({limit})"
                    )
                    return _Problem(line, reason, keeps_key=index != self._key_index)
        return None


@hookimpl
def register_sources(register: Any) -> None:
    """The built-in ``csv`` source type."""
    register("csv", CsvSource)
