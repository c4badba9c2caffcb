"""
The ``jsonl`` sink (and ``dead_letter``, the same class): one part file per group.

Each group (one batch's outcomes) becomes ``<path>/<group>.jsonl``, published
whole by rename only on ``flush``, so a crash mid-group leaves no half file
and a replay replaces the part instead of appending to it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import anyio
import orjson

from batchd.plugins.contract import DeadLetter, FoundRow, PluginContext, Sink, SinkOutput
from batchd.plugins.errors import FatalError
from batchd.plugins.hookspecs import hookimpl
from batchd.plugins.options import Options
from batchd.plugins.records import ResultRow
from batchd.plugins.sinks._modes import output_mode
from batchd.plugins.sinks._partfile import PartFiles, check_group

__all__ = ("JsonlSink", "register_sinks")


class JsonlSink(Sink):
    """
    Writes each row's ``to_dict()`` as one JSON line into its group's part file.

    Rows of any status are written as given, which is why the same class is
    also the ``dead_letter`` sink type. Within one open group a key already
    written is skipped, so an in-process replay of a half-put group does not
    duplicate rows either.
    """

    what = "jsonl sink"

    def __init__(self, options: dict[str, Any], context: PluginContext) -> None:
        opts = Options(options, context, what=self.what)
        directory = opts.path("path")
        self._fields: list[str] | None = opts.strings("fields", None)
        mode = opts.convert("mode", output_mode, None)
        opts.finish()
        self._parts = PartFiles(directory, ".jsonl", what=self.what, mode=mode)
        self._pipeline = context.pipeline
        self._owner = str(context.state_dir.resolve())
        self._keys: dict[str, set[str]] = {}
        self._limiter = anyio.CapacityLimiter(1)

    async def open(self) -> None:
        """Create the output directory and take it for this pipeline (see PartFiles.claim)."""
        try:
            await anyio.to_thread.run_sync(self._open, limiter=self._limiter)
        except OSError as exc:
            raise FatalError(f"jsonl sink: cannot create {self._parts.directory}: "
                             f"{exc.strerror or exc}") from None

    def _open(self) -> None:
        self._parts.prepare()
        self._parts.claim(self._pipeline, self._owner)

    def outputs(self) -> Sequence[SinkOutput]:
        """The directory; pipelines with other names may share it (their part files differ)."""
        return (SinkOutput(self._parts.directory, f"pipeline {self._pipeline}", directory=True),)

    async def put(self, group: str, rows: Sequence[ResultRow]) -> None:
        """Append rows to the group's hidden temp file (truncated on the group's first put)."""
        check_group(group)
        if not self._parts.is_open(group):
            self._keys[group] = set()
        seen = self._keys[group]
        lines = []
        for row in rows:
            if row.key in seen:
                continue
            seen.add(row.key)
            lines.append(orjson.dumps(self._shape(row)))
        data = b"\n".join(lines) + b"\n" if lines else b""
        try:
            await anyio.to_thread.run_sync(self._parts.write, group, data, limiter=self._limiter)
        except BaseException:
            self._keys.pop(group, None)  # the replay starts the group over
            raise

    async def flush(self, group: str) -> None:
        """fsync the group's rows and publish them as ``<group>.jsonl``."""
        check_group(group)
        try:
            await anyio.to_thread.run_sync(self._parts.publish, group, limiter=self._limiter)
        finally:
            self._keys.pop(group, None)

    async def aclose(self) -> None:
        """Drop unpublished temp files: their groups were never committed and will be replayed."""
        await anyio.to_thread.run_sync(self._parts.discard_all, limiter=self._limiter)
        self._keys.clear()

    def read_dead_letters(self, *, newest_first: bool = False) -> Iterator[DeadLetter]:
        """
        The rows of every published part file, each with its part file's name as its group.
        Part files are named after chunk ids, so their names sort oldest first.
        """
        directory = self._parts.directory
        parts = sorted(directory.glob("*.jsonl"), reverse=newest_first) \
            if directory.is_dir() else []
        for part in parts:
            rows = self._read_part(part)
            yield from reversed(list(rows)) if newest_first else rows

    def find_rows(self, key: str, *, groups: Sequence[str] | None = None) -> Iterator[FoundRow]:
        """
        The key's rows in the groups' part files (every part file without ``groups``);
        a byte search for the key skips the lines that cannot hold it.
        """
        directory = self._parts.directory
        if groups is None:
            parts = sorted(directory.glob("*.jsonl")) if directory.is_dir() else []
        else:
            parts = [directory / f"{group}.jsonl" for group in groups]
        needle = orjson.dumps(key)
        for part in parts:
            try:
                with part.open("rb") as lines:
                    for line in lines:
                        if needle not in line:
                            continue
                        try:
                            row = orjson.loads(line)
                        except orjson.JSONDecodeError:
                            continue  # a damaged line is not this key's row
                        if isinstance(row, dict) and str(row.get("key")) == key:
                            yield FoundRow(row, str(part), part.stem)
            except OSError:
                continue  # a part not written (yet), or removed meanwhile

    def _read_part(self, part: Path) -> Iterator[DeadLetter]:
        try:
            with part.open("rb") as lines:
                for number, line in enumerate(lines, 1):
                    if not line.strip():
                        continue
                    try:
                        row = orjson.loads(line)
                    except orjson.JSONDecodeError as exc:
                        raise FatalError(f"{self.what}: {part} line {number}: not valid "
                                         f"JSON ({exc})") from None
                    if not isinstance(row, dict):
                        raise FatalError(f"{self.what}: {part} line {number}: not a JSON "
                                         "object")
                    yield DeadLetter(row, part.stem)
        except OSError as exc:
            raise FatalError(f"{self.what}: cannot read {part}: {exc.strerror}") from None

    def _shape(self, row: ResultRow) -> dict[str, Any]:
        out = row.to_dict()
        if self._fields is None:
            return out
        return {name: out[name] for name in self._fields if name in out}


@hookimpl
def register_sinks(register: Any) -> None:
    """The built-in ``jsonl`` sink, also registered as the ``dead_letter`` sink type."""
    register("jsonl", JsonlSink)
    register("dead_letter", JsonlSink)
