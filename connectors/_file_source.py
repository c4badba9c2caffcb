"""
What the file sources share: a file opened once, read in a worker thread
one batch at a time, and a batch that survives a cancelled poll.

Subclasses say how to position the file (``_prepare``) and how to parse
one batch into ``self._pending`` (``_read_batch``); everything else is here.
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Any, BinaryIO

import anyio

from plugins.contract import Source, SourceSize
from plugins.errors import FatalError
from plugins.records import Record

__all__ = ("FileSource",)


class FileSource(Source):
    """A file read sequentially from a resumable byte position."""

    _what: str  # "csv source", named in every error

    def __init__(self, label: str, path: Path) -> None:
        self._label = label
        self._path = path
        self._limiter = anyio.CapacityLimiter(1)
        self._file: BinaryIO | None = None
        self._pending: list[Record] | None = None

    async def start(self, resume: dict[str, Any] | None) -> None:
        """Open the file and position it just past ``resume``."""
        await anyio.to_thread.run_sync(self._open, resume, limiter=self._limiter)

    async def poll(self) -> list[Record] | None:
        """Parse up to ``batch`` records in a worker thread; ``None`` at end of file."""
        if self._file is None:
            raise FatalError(f"{self._what} {self._label}: poll() before start()")
        if self._pending is None:
            # The worker leaves its batch in _pending, so a poll cancelled while the
            # thread finishes loses nothing: the next poll returns it.
            await anyio.to_thread.run_sync(self._read_batch, limiter=self._limiter)
        out, self._pending = self._pending, None
        return out or None

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

    def _open(self, resume: dict[str, Any] | None) -> None:
        try:
            file = open(self._path, "rb")  # kept open until aclose
        except FileNotFoundError:
            raise FatalError(f"{self._what}: file not found: {self._path}") from None
        except OSError as exc:
            raise FatalError(f"{self._what}: cannot open {self._path}: {exc.strerror}") from None
        try:
            self._prepare(file, resume)
        except BaseException:
            file.close()
            raise
        self._file = file

    @abc.abstractmethod
    def _prepare(self, file: BinaryIO, resume: dict[str, Any] | None) -> None:
        """Position ``file`` just after ``resume`` (worker thread)."""

    @abc.abstractmethod
    def _read_batch(self) -> None:
        """Parse the next batch into ``self._pending`` (worker thread)."""
