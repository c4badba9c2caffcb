"""
Byte-exact line reading for the file sources, and the text encodings they accept.

The file sources resume by seeking straight to a byte offset, so they read
binary files and decode each line themselves: a text-mode file's ``tell()`` is
an opaque cookie, and counting characters would not survive a multi-byte
encoding. Overlong lines are skipped in fixed-size chunks so that one giant
field never has to fit in memory.
"""

from __future__ import annotations

import codecs
from typing import BinaryIO

from batchd.plugins.options import Options

__all__ = ("LineReader", "text_codec")

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


def text_codec(opts: Options, key: str, default: str) -> tuple[str, str]:
    """
    The codec for a file's first line and the one for every later line.

    Only encodings in which a newline is the single byte ``\\n`` are accepted,
    because lines are split on bytes before decoding. ``utf-8-sig`` strips
    the byte-order mark on the first line only.
    """
    encoding: str = opts.text(key, default)
    try:
        name = codecs.lookup(encoding).name
    except LookupError:
        raise opts.error(key, f"unknown encoding {encoding!r}") from None
    rest = "utf-8" if name == "utf-8-sig" else name
    try:
        ascii_safe = "\n\r,\"\t".encode(rest) == b"\n\r,\"\t"
    except (UnicodeError, LookupError):
        ascii_safe = False
    if not ascii_safe:
        raise opts.error(
            key, f"encoding {encoding!r} is not ASCII-compatible; convert the file to UTF-8"
        )
    return name, rest
