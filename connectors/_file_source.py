"""
What the file sources share: a file opened once, read in a worker thread
one batch at a time, and a batch that survives a cancelled poll.

It is public (``batchd.FileSource``) so that a plugin reading a line-per-record
file writes only :meth:`FileSource.parse_line`. A source whose records may span
lines (CSV) overrides how the file is positioned (``_prepare``) and how one
batch is parsed into ``self._pending`` (``_read_batch``); everything else is here:

* **Positions are byte offsets**, ``{"line": n, "offset": b}``: the file is read as
  bytes and each line decoded by the subclass, because a text-mode ``tell()`` is an
  opaque cookie that cannot be stored. A restart seeks straight to the offset and
  refuses one where no line ends (the file was replaced or truncated).
* **A line longer than** ``max_line_bytes`` is skipped in fixed-size reads, never held
  in memory, and becomes an error record (:meth:`overlong_line`).
* **A last line without a newline is held back.** In daemon mode it may be a row
  still being written (``…,second appen``): it is read once its newline arrives.
  Under ``--until-drained`` it is read once the file has stopped growing for
  ``_SETTLE`` seconds, because nothing will finish it.
* **What was read is fingerprinted** (:meth:`identity`): device and inode, the
  size, and hashes of the file's head and of the bytes just before a position.
  Resuming in a file whose bytes before the saved offset are not the ones read
  is refused with one line saying what changed, instead of silently skipping
  the new file's first rows.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any, BinaryIO

import anyio

from batchd.connectors._file_watch import FileWatch
from batchd.connectors._lines import LineReader
from batchd.daemon.ops.lazy_log import LazyLogger
from batchd.plugins.contract import PluginContext, Source, SourceSize
from batchd.plugins.errors import FatalError
from batchd.plugins.records import Record

__all__ = ("FileSource",)

log = LazyLogger("batchd.source")  # status measures sizes without importing structlog

_SETTLE = 0.5  # seconds a file must keep its size before an unterminated last line is read
_HASHED = 4096  # bytes hashed at the head of the file and before a resume offset
_POLL_BYTES = 4 * 1024 * 1024  # input parsed per poll, so a poll returns promptly
_BOM = b"\xef\xbb\xbf"


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


class FileSource(Source):
    """
    A file read sequentially from a resumable byte position, one line per record.

    Subclass it and implement :meth:`parse_line`; set ``what`` (how messages name the
    source, ``"notes source"``), and optionally ``max_line_bytes`` and ``max_records``.
    Records are read in a worker thread, at most ``max_records`` or 4 MiB per poll.

    Args:
        path: the file (resolve a config value with :meth:`batchd.Options.path`).
        context: the factory's context; under ``--until-drained`` a last line without
            a newline is read once the file stops growing, otherwise it is held back
            because it may still be being written.
        label: how messages name the file (default: ``path``); error records say
            ``"<label> line <n>: <reason>"``.
    """

    what: str = "file source"
    #: A longer line becomes an error record (:meth:`overlong_line`), never held in memory.
    max_line_bytes: int = 64 * 1024 * 1024
    _lines: LineReader  # set by _prepare

    def __init__(
        self, path: Path, context: PluginContext | None = None, *, label: str | None = None
    ) -> None:
        self._label = label if label is not None else str(path)
        self._path = path
        self._until_drained = context.until_drained if context is not None else False
        self._limiter = anyio.CapacityLimiter(1)
        self._file: BinaryIO | None = None
        self._pending: list[Record] | None = None
        self._tail_seen: tuple[int, float] | None = None
        self._watch = FileWatch(path, self._label)
        self._at_end = False

    # -- what a line-per-record subclass writes ------------------------------------

    def parse_line(self, raw: bytes, line: int) -> Record | None:
        """
        One line as a record (worker thread); None skips it (a blank line, a comment).

        ``raw`` holds the line's bytes with its line ending (and without a UTF-8
        byte-order mark on line 1); ``line`` is its 1-based number. Give the record
        :meth:`position` ``(line)``; for a line that cannot be used return
        :meth:`error_record` instead of raising, so the run goes on.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement parse_line")

    def overlong_line(self, head: bytes, line: int) -> Record:
        """The record for a line over ``max_line_bytes``; ``head`` is its first part."""
        return self.error_record(line, f"line longer than max_line_bytes ({self.max_line_bytes})")

    def position(self, line: int) -> dict[str, Any]:
        """The resume position of the line just read: its number and the offset after it."""
        return {"line": line, "offset": self._lines.offset}

    def error_record(self, line: int, reason: str, key: str | None = None) -> Record:
        """A record batchd dead-letters with ``"<label> line <n>: <reason>"`` (never sent)."""
        return Record(key or f"line-{line}", {}, self.position(line),
                      f"{self._label} line {line}: {reason}")

    # -- the Source contract -------------------------------------------------------

    async def start(self, resume: dict[str, Any] | None) -> None:
        """Open the file and position it just past ``resume``."""
        await anyio.to_thread.run_sync(self._open, resume, limiter=self._limiter)

    async def poll(self) -> list[Record] | None:
        """Parse up to ``batch`` records in a worker thread; ``None`` at end of file."""
        if self._file is None:
            raise FatalError(f"{self.what} {self._label}: poll() before start()")
        if self._pending is None:
            if self._at_end:  # cut, replaced or rewritten since? (connectors/_file_watch)
                self._watch.check(self._file.fileno(), self._lines.offset)
            # The worker leaves its batch in _pending, so a poll cancelled while the
            # thread finishes loses nothing: the next poll returns it.
            await anyio.to_thread.run_sync(self._read_batch, limiter=self._limiter)
        out, self._pending = self._pending, None
        self._at_end = not out
        if out:
            self._tail_seen = None
            return out
        if self._lines.held and self._until_drained:
            if not self._settled():
                return []  # not drained yet: the engine polls again shortly
            self._lines.hold_partial = False  # the file stopped growing: its last line is whole
            await anyio.to_thread.run_sync(self._read_batch, limiter=self._limiter)
            out, self._pending = self._pending, None
        if not out:  # at the end: remember what was read last, or stop if it changed already
            self._watch.check(self._file.fileno(), self._lines.offset)
        return out or None

    def _settled(self) -> bool:
        """Whether the file has stopped growing: untouched for a while, or the same size
        over polls for ``_SETTLE`` seconds."""
        assert self._file is not None
        st = os.fstat(self._file.fileno())
        if time.time() - st.st_mtime >= _SETTLE:
            return True
        now = time.monotonic()
        if self._tail_seen is None or self._tail_seen[0] != st.st_size:
            self._tail_seen = (st.st_size, now)
            return False
        return now - self._tail_seen[1] >= _SETTLE

    async def size(self, position: dict[str, Any] | None) -> SourceSize | None:
        """The file's bytes, and the byte offset just after ``position``'s record."""
        try:
            total = (await anyio.Path(self._path).stat()).st_size
        except OSError:
            return None
        done = 0
        if position is not None:
            try:
                done = int(position["offset"])
            except (KeyError, TypeError, ValueError):
                return None
        return SourceSize(total=total, unit="bytes", done=min(done, total))

    async def aclose(self) -> None:
        """Close the file; safe to call twice."""
        file, self._file = self._file, None
        if file is not None:
            file.close()

    def identity(self, position: dict[str, Any]) -> dict[str, Any] | None:
        """Device, inode, size and hashes of the head and of the bytes before ``offset``."""
        offset = position.get("offset")
        if self._file is None or not isinstance(offset, int) or offset < 0:
            return None
        try:
            fd = self._file.fileno()
            st = os.fstat(fd)
            head = min(_HASHED, offset)
            tail = max(0, offset - _HASHED)
            return {
                "dev": st.st_dev,
                "ino": st.st_ino,
                "size": st.st_size,
                "head_bytes": head,
                "head": _digest(os.pread(fd, head, 0)),
                "tail": _digest(os.pread(fd, offset - tail, tail)),
            }
        except OSError:
            return None

    def _open(self, resume: dict[str, Any] | None) -> None:
        try:
            file = open(self._path, "rb")  # kept open until aclose
        except FileNotFoundError:
            raise FatalError(f"{self.what}: file not found: {self._path}") from None
        except OSError as exc:
            raise FatalError(f"{self.what}: cannot open {self._path}: {exc.strerror}") from None
        try:
            if resume is not None and isinstance(resume.get("identity"), dict):
                self._check_identity(file, resume)
            self._prepare(file, resume)
            self._lines.hold_partial = True
        except BaseException:
            file.close()
            raise
        self._file = file

    def _check_identity(self, file: BinaryIO, resume: dict[str, Any]) -> None:
        """Refuse to resume in a file whose bytes up to the saved offset are not the ones read."""
        ident: dict[str, Any] = resume["identity"]
        try:
            offset = int(resume["offset"])
            head_bytes = int(ident["head_bytes"])
        except (KeyError, TypeError, ValueError):
            return  # not a fingerprint this version wrote: the offset check still applies
        fd = file.fileno()
        st = os.fstat(fd)
        reason = None
        if st.st_size < offset:
            reason = (f"it is {st.st_size} bytes now, shorter than the {offset} bytes batchd "
                      "had read")
        elif isinstance(ident.get("size"), int) and st.st_size < ident["size"]:
            reason = f"it shrank from {ident['size']} to {st.st_size} bytes"
        elif _digest(os.pread(fd, head_bytes, 0)) != ident.get("head"):
            reason = f"its first {head_bytes} bytes are not the ones batchd read"
        else:
            start = max(0, offset - _HASHED)
            if _digest(os.pread(fd, offset - start, start)) != ident.get("tail"):
                reason = (f"the bytes before byte {offset}, where batchd resumes, are not the "
                          "ones it read")
        if reason is not None:
            raise FatalError(
                f"{self.what}: {self._path} was replaced or changed since batchd read it up to "
                f"byte {offset}: {reason}. Put the original file back to finish it; a new file "
                "needs a new state dir (or a new pipeline name)"
            )
        if (st.st_dev, st.st_ino) != (ident.get("dev"), ident.get("ino")):
            log.warning("source file was moved or copied (new inode); its contents match what "
                        "was read, so batchd resumes in it", path=str(self._path))

    def _prepare(self, file: BinaryIO, resume: dict[str, Any] | None) -> None:
        """Position ``file`` just after ``resume`` (worker thread)."""
        self._lines = LineReader(file)
        if resume is None:
            return
        try:
            offset, line = int(resume["offset"]), int(resume["line"])
        except (KeyError, TypeError, ValueError):
            raise self._unusable(resume) from None
        self._seek_to(file, offset, line + 1, "line")

    def _unusable(self, resume: dict[str, Any]) -> FatalError:
        return FatalError(f"{self.what} {self._label}: unusable resume position {resume!r}")

    def _seek_to(self, file: BinaryIO, offset: int, line: int, unit: str) -> None:
        """
        Continue at ``offset`` (numbered ``line``), after checking that a ``unit`` (a line,
        a record) ends just before it; anywhere else the file was replaced or truncated.
        """
        size = file.seek(0, 2)
        ok = self._lines.offset <= offset <= size
        if ok and offset > 0:
            file.seek(offset - 1)
            ok = file.read(1) == b"\n" or offset == size
        if not ok:
            raise FatalError(
                f"{self.what}: cannot resume {self._label} at byte {offset} (file is {size} "
                f"bytes, and a {unit} must end there): was the file replaced or truncated?"
            )
        file.seek(offset)
        self._lines.offset, self._lines.line = offset, line

    def _read_batch(self) -> None:
        """Parse the next batch into ``self._pending`` (worker thread)."""
        out: list[Record] = []
        lines = self._lines
        begin = lines.offset
        limit = self.max_line_bytes
        while len(out) < self.max_records and lines.offset - begin < _POLL_BYTES:
            at_start = lines.offset == 0
            line_no = lines.line
            raw = lines.read_line(limit + 1)
            if not raw:
                break
            if len(raw) > limit:
                lines.skip_line()
                out.append(self.overlong_line(raw, line_no))
                continue
            if at_start and raw.startswith(_BOM):
                raw = raw[len(_BOM) :]
            record = self.parse_line(raw, line_no)
            if record is not None:
                out.append(record)
        self._pending = out
