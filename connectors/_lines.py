"""
Byte-exact line reading for the file sources, plus their option checks.

The file sources resume by seeking straight to a byte offset, so they read
binary files and decode each line themselves: a text-mode file's ``tell()`` is
an opaque cookie, and counting characters would not survive a multi-byte
encoding. Overlong lines are skipped in fixed-size chunks so that one giant
field never has to fit in memory.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Mapping
from typing import Any, BinaryIO

from batchd.plugins.errors import ConfigError

__all__ = ("LineReader", "check_options", "option_int", "option_str_list", "text_codec")

_SKIP_CHUNK = 1 << 20


class LineReader:
    """
    Reads physical lines from a binary file, tracking byte offset and line number.

    Args:
        file: opened in binary mode and already positioned at ``offset``.
        offset: the byte offset of the next read.
        line: the 1-based number of the line that the next read starts in.
    """

    __slots__ = ("file", "held", "hold_partial", "last_line", "line", "offset")

    def __init__(self, file: BinaryIO, offset: int = 0, line: int = 1) -> None:
        self.file = file
        self.offset = offset
        self.line = line
        self.last_line = line - 1  # the line of the last byte read
        # With hold_partial, a last line without its newline is left unread (it may still
        # be being written); ``held`` says the last read_line stopped in front of one.
        self.hold_partial = False
        self.held = False

    def read_line(self, limit: int) -> bytes:
        """
        Up to ``limit`` bytes ending at the next newline; ``b""`` at end of file.

        A result that neither ends in ``\\n`` nor is shorter than ``limit`` is
        the start of an overlong line: the caller decides how to skip the rest.
        """
        self.held = False
        raw = self.file.readline(limit)
        if raw and self.hold_partial and len(raw) < limit and not raw.endswith(b"\n"):
            self.file.seek(-len(raw), 1)
            self.held = True
            return b""
        if raw:
            self.offset += len(raw)
            self.last_line = self.line
            if raw.endswith(b"\n"):
                self.line += 1
        return raw

    def rewind(self, offset: int, line: int, last_line: int) -> None:
        """Go back to a record's start (its last line turned out to be unfinished)."""
        self.file.seek(offset)
        self.offset, self.line, self.last_line = offset, line, last_line

    def skip_line(self) -> None:
        """Move just past the next newline (or to end of file) without buffering the line."""
        self.skip_record(b"", in_quotes=False)

    def skip_record(self, quote: bytes, in_quotes: bool) -> None:
        """
        Move just past the next newline that is outside quotes (or to end of file).

        Quote parity is all a CSV record end needs: a doubled quote inside a
        quoted field toggles twice and cancels out.
        """
        while True:
            chunk = self.file.read(_SKIP_CHUNK)
            if not chunk:
                return
            pos = 0
            end = -1
            while True:
                if in_quotes:
                    q = chunk.find(quote, pos)
                    if q < 0:
                        break
                    in_quotes, pos = False, q + 1
                    continue
                nl = chunk.find(b"\n", pos)
                q = chunk.find(quote, pos) if quote else -1
                if nl >= 0 and (q < 0 or nl < q):
                    end = nl + 1
                    break
                if q < 0:
                    break
                in_quotes, pos = True, q + 1
            if end >= 0:
                self._consume(chunk[:end])
                self.file.seek(end - len(chunk), 1)
                return
            self._consume(chunk)

    def _consume(self, data: bytes) -> None:
        self.offset += len(data)
        self.line += data.count(b"\n")
        self.last_line = self.line - 1 if data.endswith(b"\n") else self.line


def check_options(
    what: str,
    options: Mapping[str, Any],
    required: Iterable[str],
    optional: Iterable[str],
) -> None:
    """Reject unknown and missing option keys, naming the key and listing the valid ones."""
    required = tuple(required)
    valid = sorted((*required, *optional))
    for name in options:
        if name not in valid:
            raise ConfigError(f"{what}: unknown option {name!r} (valid: {', '.join(valid)})")
    for name in required:
        if options.get(name) in (None, ""):
            raise ConfigError(
                f"{what}: missing required option {name!r} (valid: {', '.join(valid)})"
            )


def option_int(what: str, options: Mapping[str, Any], name: str, default: int) -> int:
    """A positive integer option (``True`` is not a number here)."""
    value = options.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{what}: option {name!r} must be a positive integer, got {value!r}")
    return value


def option_str_list(what: str, options: Mapping[str, Any], name: str) -> list[str] | None:
    """An optional non-empty list of non-empty strings."""
    value = options.get(name)
    if value is None:
        return None
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(v, str) and v for v in value)
    ):
        raise ConfigError(
            f"{what}: option {name!r} must be a non-empty list of names, got {value!r}"
        )
    return list(value)


def text_codec(what: str, encoding: Any) -> tuple[str, str]:
    """
    The codec for a file's first line and the one for every later line.

    Only encodings in which a newline is the single byte ``\\n`` are accepted,
    because lines are split on bytes before decoding. ``utf-8-sig`` strips
    the byte-order mark on the first line only.
    """
    if not isinstance(encoding, str) or not encoding:
        raise ConfigError(f"{what}: option 'encoding' must be a codec name, got {encoding!r}")
    try:
        name = codecs.lookup(encoding).name
    except LookupError:
        raise ConfigError(f"{what}: unknown encoding {encoding!r}") from None
    rest = "utf-8" if name == "utf-8-sig" else name
    try:
        ascii_safe = "\n\r,\"\t".encode(rest) == b"\n\r,\"\t"
    except (UnicodeError, LookupError):
        ascii_safe = False
    if not ascii_safe:
        raise ConfigError(
            f"{what}: encoding {encoding!r} is not ASCII-compatible; convert the file to UTF-8"
        )
    return name, rest
