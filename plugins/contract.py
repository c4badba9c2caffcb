"""
The source and sink contracts every connector implements, built-in or not.

They follow Kafka Connect's SourceTask/SinkTask: the framework owns positions
and commits; a source only reads and acknowledges, a sink only writes and
makes what it wrote durable.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self, runtime_checkable

from batchd.plugins.records import Record, ResultRow

__all__ = (
    "DeadLetter", "DeadLetterReader", "FoundRow", "PluginContext", "RowFinder", "Sink",
    "SinkFactory", "SinkOutput", "Source", "SourceFactory", "SourceSize",
)


@dataclass(frozen=True, slots=True)
class PluginContext:
    """
    What the engine tells a plugin about where it runs.

    ``until_drained`` is set under ``batchd run --until-drained``: the run ends once
    the source is read, so a file source may take a last line without a newline once
    the file stops growing (in daemon mode such a line may still be being written).

    ``config_file`` and ``table`` say where the plugin's option table was written
    (``pipeline.toml`` and ``[[pipeline.sink]] #1 of 'tickets'``) when the engine built
    the plugin from a config file; :class:`batchd.Options` names them in every message.
    """

    pipeline: str
    state_dir: Path
    config_dir: Path
    until_drained: bool = False
    config_file: Path | None = None
    table: str | None = None

    def resolve_path(self, value: str | Path) -> Path:
        """Relative paths in a config file are relative to that file."""
        path = Path(value).expanduser()
        return path if path.is_absolute() else (self.config_dir / path)


@dataclass(frozen=True, slots=True)
class SourceSize:
    """
    How big a source is, so progress can be shown against the whole of it.

    ``unit`` is what ``total`` and ``done`` count: ``"bytes"`` (a file), ``"rows"``
    (a table's estimate) or ``"messages"`` (a topic's offsets). ``done`` is how much of
    it lies at or before the position asked about; ``None`` when the unit is rows and
    the engine's own count of rows read is the better figure.
    """

    total: int
    unit: str
    done: int | None = None


class _Closeable(abc.ABC):
    """An async context manager whose exit calls :meth:`aclose` (anyio's AsyncResource)."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Release connections and files; must be safe to call twice."""


class Source(_Closeable):
    """
    Reads records for one pipeline.

    Lifecycle:

    1. The factory validates its options and raises :class:`ConfigError`
       naming the key at fault. It does no I/O.
    2. ``await start(resume)``: ``resume`` is the position of the last record
       the engine has durably sealed into a chunk (``None``: from the start).
       The source continues *after* it.
    3. ``await poll()`` is called repeatedly. It returns a list of records in
       source order, ``[]`` when nothing is ready yet, or ``None`` when the
       source is drained for now (end of file, no more rows, zero lag). It
       must return promptly (at most ~1 s) and be cancellable.
    4. ``await commit(position)``: every record at or before ``position`` (in
       the order ``poll`` returned them) is terminal — written to a sink or
       dead-lettered. Sources with an external cursor (consumer offsets, a
       status column) advance it here; the default does nothing because the
       manifest already holds the position.
    5. ``await aclose()``.

    Raise :class:`RetriableError` for a dropped connection: the engine backs
    off and calls again. Records are yielded at most ``max_records`` at a time
    so memory stays flat however large the source is.
    """

    max_records: int = 1000
    # Seconds the engine's duplicate-key ledger remembers a key read from this source,
    # unless the pipeline sets ``ledger_retention``; None: forever. A file must catch a
    # duplicate anywhere in it; a stream that runs for months would grow it without end.
    ledger_retention: float | None = None
    # Whether a second instance may read records again beside the running one (to rebuild
    # a lost spool file). A consumer-group member may not: it would take partitions away.
    rereadable: bool = True

    @abc.abstractmethod
    async def start(self, resume: dict[str, Any] | None) -> None:
        """Open the source and position it just after ``resume``."""

    @abc.abstractmethod
    async def poll(self) -> list[Record] | None:
        """Next records, ``[]`` for none yet, ``None`` for drained."""

    async def commit(self, position: dict[str, Any]) -> None:
        """Acknowledge everything up to and including ``position``."""

    def field_names(self) -> Sequence[str] | None:
        """
        The fields every record will carry, once ``start`` has returned; None if unknown.

        A source with a schema (a CSV header, a table's columns) returns it, and the
        engine then refuses at start a template naming a field no record can have —
        instead of dead-lettering every record for it. The default knows nothing.
        """
        return None

    async def size(self, position: dict[str, Any] | None) -> SourceSize | None:
        """
        The source's size and how much of it lies up to ``position``; None if unknown.

        Progress (``batchd status``, the dashboard, ``batchd run`` in a terminal) is shown
        against this instead of the rows read so far. Called whether or not the source
        was started, every half minute or so, from a separate task: it must not move the
        source's position and should answer within a few seconds. The default knows
        nothing; rows read are shown then.
        """
        return None

    async def probe(self) -> None:
        """
        Check that the system behind the source accepts the connection and credentials.

        ``batchd validate --connect`` calls it on a source that was never started; it
        must read and change nothing. Raise :class:`ConfigError` (or ``FatalError``)
        naming what is wrong. The default does nothing: a file source has no server.
        """

    def identity(self, position: dict[str, Any]) -> dict[str, Any] | None:
        """
        What identifies the data behind ``position`` (a file's inode, size, hashes), or None.

        The engine stores it with the position it seals and hands it back inside the
        ``resume`` position; a source that returns one checks it in :meth:`start` and
        refuses (raising :class:`~batchd.plugins.errors.FatalError` naming what changed) to
        resume in data that is no longer what was read. Called once per chunk.
        """
        return None


@dataclass(frozen=True, slots=True)
class SinkOutput:
    """
    A local file or directory a sink writes, so the engine can refuse collisions at start.

    Two outputs collide when their paths are equal and their ``scope`` is equal (a jsonl
    directory is shared safely by pipelines with different names, a SQLite file by
    different tables), or when one wants a directory where the other wants a file.
    """

    path: Path
    scope: str
    directory: bool


class Sink(_Closeable):
    """
    Writes terminal outcomes, idempotently, keyed by ``ResultRow.key``.

    Lifecycle:

    1. The factory validates its options (no I/O).
    2. ``await open()``: connect, create tables or directories.
    3. ``await put(group, rows)`` one or more times per group. A group is one
       batch's worth of outcomes (its id is stable across replays, so a part
       file or transaction can be named after it). ``put`` may buffer.
    4. ``await flush(group)``: returns only when every row put for the group
       is durable. Only then does the engine record the batch as committed.
    5. ``await aclose()``.

    A replay after a crash sends the same group again, possibly after a
    partial first attempt: the result must be as if it was written once
    (upsert by key, part file rewritten whole, idempotent producer).
    """

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect and prepare (create tables, directories)."""

    @abc.abstractmethod
    async def put(self, group: str, rows: Sequence[ResultRow]) -> None:
        """Accept rows for ``group``; may buffer."""

    @abc.abstractmethod
    async def flush(self, group: str) -> None:
        """Make everything put for ``group`` durable."""

    async def probe(self) -> None:
        """
        Check that the system behind the sink accepts the connection and credentials.

        ``batchd validate --connect`` calls it on a sink that was never opened; it must
        create and write nothing. The default does nothing.
        """

    def outputs(self) -> Sequence[SinkOutput]:
        """The local paths this sink writes (none for a database or a broker)."""
        return ()


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """
    One dead letter read back from where a sink stored it.

    ``row`` is the stored row (``ResultRow.to_dict()``'s dead-letter fields at least:
    ``key``, ``error_type``, ``error_message``, ``batch_id``). ``group`` is the group it
    was written under (a part file's name) when the storage keeps it; None lets the
    engine find it from ``batch_id``. The engine needs the group to hide a dead letter
    whose key was sent again later (``batchd dead-letters retry``).
    """

    row: dict[str, Any]
    group: str | None = None


@runtime_checkable
class DeadLetterReader(Protocol):
    """
    The optional capability of a sink that can read its dead letters back.

    ``batchd dead-letters list`` and ``retry`` (and the dashboard) use it on the
    pipeline's ``[pipeline.dead_letter]`` sink; a sink without it gets a message naming
    its type. The engine never names a concrete sink: any plugin may offer it.
    """

    def read_dead_letters(self, *, newest_first: bool = False) -> Iterator[DeadLetter]:
        """
        Every stored dead letter, oldest first where the storage knows an order.

        With ``newest_first`` the newest come first and the caller (the dashboard) stops
        after a few, so read lazily from the newest end. Called on a sink that was never
        opened, possibly beside the daemon writing to the same storage, from a plain
        thread: open read-only, and create, lock or change nothing. Storage that does not
        exist yet holds no dead letters (yield nothing).
        """
        ...


@dataclass(frozen=True, slots=True)
class FoundRow:
    """
    One stored row for a key, found by :meth:`RowFinder.find_rows`.

    ``where`` tells an operator where to look for it themselves (a file, a table);
    ``group`` is the group it was written under when the storage keeps it (a part
    file's name), which ``batchd show`` uses to name the chunk that read a bad row.
    """

    row: dict[str, Any]
    where: str
    group: str | None = None


@runtime_checkable
class RowFinder(Protocol):
    """
    The optional capability of a sink that can look a key up in what it stored.

    ``batchd show CONFIG KEY`` and the dashboard's key page use it on every sink of the
    pipeline and on its dead-letter sink; a sink without it gets a note saying it cannot
    be searched. The engine never names a concrete sink: any plugin may offer it.
    """

    def find_rows(self, key: str, *, groups: Sequence[str] | None = None) -> Iterator[FoundRow]:
        """
        Every stored row whose ``key`` is ``key``.

        ``groups`` are the groups the key was sent in (its chunk and retry chunks) when
        the engine knows them: storage laid out by group may look only there; ``None``
        means any group (dead letters: a retried key's old ones sit in other groups).
        Called like ``read_dead_letters``: on a sink never opened, beside a running
        daemon, from a plain thread; read only, and yield nothing for missing storage.
        """
        ...


class SourceFactory(Protocol):
    """Builds a source from its config table (``type`` removed)."""

    def __call__(self, options: dict[str, Any], context: PluginContext) -> Source: ...


class SinkFactory(Protocol):
    """Builds a sink from its config table (``type`` removed)."""

    def __call__(self, options: dict[str, Any], context: PluginContext) -> Sink: ...
