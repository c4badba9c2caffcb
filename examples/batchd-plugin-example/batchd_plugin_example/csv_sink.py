"""
The ``example-csv`` sink: one CSV file per group, published whole.

A group is one batch's outcomes, and its name is stable across replays, so it
names the file. Rows go to a hidden temp file; ``flush`` fsyncs it and renames
it over ``<group>.csv``. A reader sees no file or the whole file, never half,
and a replay after a crash rewrites the file instead of appending to it —
the idempotency the sink contract asks for.
"""

from __future__ import annotations

import csv
import errno
import io
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import anyio
import batchd

from batchd_plugin_example._options import check_keys, text_option

__all__ = ("COLUMNS", "DEFAULT_COLUMNS", "CsvSink")

_WHAT = "example-csv sink"
COLUMNS = (
    "key", "custom_id", "pipeline", "status", "output", "model", "input_tokens",
    "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens", "cost_usd",
    "batch_id", "attempt", "error_type", "error_message",
)  # fmt: skip
DEFAULT_COLUMNS = (
    "key", "status", "output", "model", "input_tokens", "output_tokens", "cost_usd", "batch_id",
)  # fmt: skip
_GROUP = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
# Errors an operator can clear without touching batchd: retrying is then the right thing.
_TRANSIENT = {errno.ENOSPC, errno.EDQUOT, errno.EAGAIN}


@dataclass(slots=True)
class _Part:
    """One group's unpublished file: unbuffered, so a failed write can be cut back exactly."""

    file: io.FileIO
    size: int = 0
    keys: set[str] = field(default_factory=set)


class CsvSink(batchd.Sink):
    """
    Writes each row's ``columns`` (a subset of :data:`COLUMNS`) as one CSV line
    into ``<path>/<group>.csv``, with a header line.

    Rows of any status are written as given, so the same type also serves as a
    dead-letter sink (use ``columns`` with ``error_type`` and ``error_message``,
    and a directory of its own). Within one group a key already written is
    skipped, so replaying a half-put group does not duplicate rows either.
    """

    _claimed: ClassVar[set[Path]] = set()  # directories of open sinks in this process

    def __init__(self, options: dict[str, Any], context: batchd.PluginContext) -> None:
        check_keys(_WHAT, options, ("path",), ("columns",))
        self._dir = context.resolve_path(text_option(_WHAT, options, "path", None))
        columns = options.get("columns", list(DEFAULT_COLUMNS))
        if not isinstance(columns, list) or not columns:
            raise batchd.ConfigError(f"{_WHAT}: option 'columns' must be a non-empty list")
        for name in columns:
            if name not in COLUMNS:
                raise batchd.ConfigError(
                    f"{_WHAT}: unknown column {name!r} in option 'columns' "
                    f"(valid: {', '.join(COLUMNS)})"
                )
        if len(set(columns)) != len(columns):
            raise batchd.ConfigError(f"{_WHAT}: option 'columns' names a column twice")
        self._columns: tuple[str, ...] = tuple(columns)
        self._parts: dict[str, _Part] = {}
        self._opened = False
        self._limiter = anyio.CapacityLimiter(1)

    async def open(self) -> None:
        """Create the directory; refuse one that another open sink of this type writes to."""
        where = self._dir.resolve()
        if where in CsvSink._claimed:
            # Group names are per pipeline, not per sink: two sinks in one directory
            # (say results and dead letters) would overwrite each other's files.
            raise batchd.ConfigError(
                f"{_WHAT}: another example-csv sink already writes to {self._dir}; "
                "give each sink (and the dead-letter sink) its own path"
            )
        await anyio.to_thread.run_sync(self._prepare, limiter=self._limiter)
        CsvSink._claimed.add(where)
        self._opened = True

    async def put(self, group: str, rows: Sequence[batchd.ResultRow]) -> None:
        """Append rows not yet written for ``group`` to its temp file (truncated on first put)."""
        _check_group(group)
        await anyio.to_thread.run_sync(self._put, group, rows, limiter=self._limiter)

    async def flush(self, group: str) -> None:
        """fsync the group's rows and publish them as ``<group>.csv``."""
        _check_group(group)
        await anyio.to_thread.run_sync(self._publish, group, limiter=self._limiter)

    async def aclose(self) -> None:
        """Delete unpublished temp files: their groups were never committed and will be replayed."""
        await anyio.to_thread.run_sync(self._discard_all, limiter=self._limiter)
        if self._opened:
            CsvSink._claimed.discard(self._dir.resolve())
            self._opened = False

    # -- worker-thread side ----------------------------------------------------

    def _final(self, group: str) -> Path:
        return self._dir / f"{group}.csv"

    def _temp(self, group: str) -> Path:
        return self._dir / f".{group}.csv.tmp"

    def _prepare(self) -> None:
        try:
            self._dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _classify(exc, self._dir) from None

    def _put(self, group: str, rows: Sequence[batchd.ResultRow]) -> None:
        part = self._parts.get(group)
        if part is None:
            try:
                # "wb" truncates what an earlier, unflushed attempt at this group left.
                part = _Part(io.FileIO(self._temp(group), "wb"))
            except OSError as exc:
                raise _classify(exc, self._temp(group)) from None
            self._parts[group] = part
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        if part.size == 0:
            writer.writerow(self._columns)
        new_keys: set[str] = set()
        for row in rows:
            if row.key in part.keys or row.key in new_keys:
                continue
            new_keys.add(row.key)
            writer.writerow([_cell(getattr(row, name)) for name in self._columns])
        data = buffer.getvalue().encode("utf-8")
        try:
            _write_all(part.file, data)
        except OSError as exc:
            self._cut_back(group, part)
            raise _classify(exc, self._temp(group)) from None
        part.size += len(data)
        part.keys |= new_keys

    def _cut_back(self, group: str, part: _Part) -> None:
        """Leave the group exactly as before the failed put, so calling put again is safe."""
        try:
            part.file.truncate(part.size)
            part.file.seek(part.size)
        except OSError as exc:
            # The group can no longer be made whole here: stop, and a restart replays it.
            self._parts.pop(group, None)
            part.file.close()
            raise batchd.FatalError(
                f"{_WHAT}: cannot undo a failed write to {self._temp(group)}: {exc.strerror}"
            ) from None

    def _publish(self, group: str) -> None:
        part = self._parts.pop(group, None)
        if part is None:
            return  # nothing was put for this group: no file
        try:
            try:
                os.fsync(part.file.fileno())
            finally:
                part.file.close()
            os.replace(self._temp(group), self._final(group))
            directory = os.open(self._dir, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(directory)  # makes the rename itself durable
            finally:
                os.close(directory)
        except OSError as exc:
            raise _classify(exc, self._final(group)) from None

    def _discard_all(self) -> None:
        while self._parts:
            group, part = self._parts.popitem()
            part.file.close()
            self._temp(group).unlink(missing_ok=True)


def _check_group(group: str) -> None:
    """A group name becomes a file name: refuse anything that could leave the directory."""
    if not _GROUP.fullmatch(group) or ".." in group:
        raise batchd.FatalError(f"{_WHAT}: group name {group!r} is not a safe file name")


def _cell(value: Any) -> str:
    return "" if value is None else str(value)


def _write_all(file: io.FileIO, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = file.write(view)
        if not written:
            raise OSError(errno.EIO, "short write")
        view = view[written:]


def _classify(exc: OSError, path: Path) -> batchd.BatchdError:
    """Disk full is worth retrying once someone frees space; permissions and the like are not."""
    message = f"{_WHAT}: cannot write {path}: {exc.strerror or exc}"
    if exc.errno in _TRANSIENT:
        return batchd.RetriableError(message)
    return batchd.FatalError(message)
