"""
The ``sqlite`` sink: upserts rows by key into a documented table.

One connection, used from one worker thread at a time, holds one open
transaction; ``put`` upserts into it and ``flush`` commits it. A replay of a
group upserts the same keys again, so the table ends as if it was written
once. The schema is documented in docs/sinks.md and is part of the API.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing
from datetime import UTC, datetime
from typing import Any

import anyio
import orjson

from batchd.plugins.contract import DeadLetter, FoundRow, PluginContext, Sink, SinkOutput
from batchd.plugins.errors import ConfigError, FatalError, RetriableError
from batchd.plugins.hookspecs import hookimpl
from batchd.plugins.options import Options
from batchd.plugins.records import ResultRow
from batchd.plugins.sinks._modes import output_mode

__all__ = ("DEAD_LETTER_COLUMNS", "RESULT_COLUMNS", "SqliteSink", "register_sinks")

_WHAT = "sqlite sink"
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
_JOURNAL_MODES = ("wal", "delete", "truncate", "persist")

RESULT_COLUMNS: tuple[tuple[str, str], ...] = (
    ("key", "TEXT PRIMARY KEY"),
    ("custom_id", "TEXT"),
    ("status", "TEXT"),
    ("output", "TEXT"),
    ("model", "TEXT"),
    ("input_tokens", "INTEGER"),
    ("output_tokens", "INTEGER"),
    ("cost_usd", "REAL"),
    ("batch_id", "TEXT"),
    ("attempt", "INTEGER"),
    ("updated_at", "TEXT"),
    # JSON text (SQLite's JSON functions read it) for a JSON answer, else NULL; added to a
    # table made before it existed by ALTER TABLE ADD COLUMN.
    ("output_json", "TEXT"),
)
DEAD_LETTER_COLUMNS: tuple[tuple[str, str], ...] = (
    ("key", "TEXT PRIMARY KEY"),
    ("custom_id", "TEXT"),
    ("error_type", "TEXT"),
    ("error_message", "TEXT"),
    ("attempts", "INTEGER"),
    ("history", "TEXT"),
    ("request", "TEXT"),
    ("source", "TEXT"),
    ("batch_id", "TEXT"),
    ("updated_at", "TEXT"),
)


def _json(value: Any) -> str | None:
    return None if value is None else orjson.dumps(value).decode()


def _result_values(row: ResultRow, now: str) -> tuple[Any, ...]:
    return (
        row.key, row.custom_id, row.status, row.output, row.model, row.input_tokens,
        row.output_tokens, row.cost_usd, row.batch_id, row.attempt, now,
        None if row.output_json is None else orjson.dumps(row.output_json).decode(),
    )  # fmt: skip


def _result_values_with_message(row: ResultRow, now: str) -> tuple[Any, ...]:
    return (*_result_values(row, now), _json(row.message))


def _dead_letter_values(row: ResultRow, now: str) -> tuple[Any, ...]:
    return (
        row.key, row.custom_id, row.error_type, row.error_message, row.attempt,
        _json(row.history), _json(row.request), _json(row.source), row.batch_id, now,
    )  # fmt: skip


class SqliteSink(Sink):
    """
    Upserts result rows (``kind = "results"``) or dead-letter rows
    (``kind = "dead_letter"``) into a SQLite table keyed by ``key``.

    Several groups may be put before the first is flushed; they share the
    one transaction, so flushing any of them commits them all (earlier
    durability, never less). If SQLite rolls the transaction back, every
    group in it fails its ``flush`` with :class:`RetriableError` so the
    engine replays it instead of recording rows that are not there.
    """

    def __init__(self, options: dict[str, Any], context: PluginContext) -> None:
        opts = Options(options, context, what=_WHAT)
        path = opts.path("path")
        kind = opts.choice("kind", ("results", "dead_letter"), "results")
        table = opts.text("table", "results" if kind == "results" else "dead_letter")
        if not _IDENTIFIER.fullmatch(table):
            raise opts.error("table", "must be a plain identifier (letters, digits, '_', at "
                                      f"most 63), got {table!r}")
        message = opts.flag("message", False)
        if message and kind == "dead_letter":
            raise opts.error("message", "applies to kind 'results' only")
        journal = opts.text("journal_mode", "wal").lower()
        if journal not in _JOURNAL_MODES:
            raise opts.error("journal_mode", f"must be one of {', '.join(_JOURNAL_MODES)}, "
                                             f"got {journal!r}")
        self._mode = opts.convert("mode", output_mode, None)
        opts.finish()
        self._path = path
        self._table = table
        self._journal = journal.lower()
        self._columns = RESULT_COLUMNS if kind == "results" else DEAD_LETTER_COLUMNS
        self._values: Callable[[ResultRow, str], tuple[Any, ...]] = _dead_letter_values
        if kind == "results":
            self._values = _result_values_with_message if message else _result_values
            if message:
                self._columns = (*RESULT_COLUMNS, ("message", "TEXT"))
        names = [name for name, _ in self._columns]
        updates = ", ".join(f"{name} = excluded.{name}" for name in names[1:])
        self._upsert = (
            f'INSERT INTO "{table}" ({", ".join(names)}) VALUES ({", ".join("?" * len(names))}) '
            f"ON CONFLICT(key) DO UPDATE SET {updates}"
        )
        self._limiter = anyio.CapacityLimiter(1)
        self._db: sqlite3.Connection | None = None
        self._dirty: set[str] = set()  # groups with rows in the open transaction
        self._lost: dict[str, str] = {}  # group -> why its rows were rolled back

    async def open(self) -> None:
        """Create the parent directory, connect, set pragmas, create or check the table."""
        await anyio.to_thread.run_sync(self._open, limiter=self._limiter)

    def outputs(self) -> Sequence[SinkOutput]:
        """The database file; two sinks may share it with different tables."""
        return (SinkOutput(self._path, f"table {self._table}", directory=False),)

    async def put(self, group: str, rows: Sequence[ResultRow]) -> None:
        """Upsert rows inside the open transaction (begun if needed)."""
        await anyio.to_thread.run_sync(self._put, group, rows, limiter=self._limiter)

    async def flush(self, group: str) -> None:
        """Commit the open transaction, which holds every row put for ``group``."""
        await anyio.to_thread.run_sync(self._flush, group, limiter=self._limiter)

    async def aclose(self) -> None:
        """Roll back anything unflushed (it will be replayed) and close; safe twice."""
        await anyio.to_thread.run_sync(self._close, limiter=self._limiter)

    def read_dead_letters(self, *, newest_first: bool = False) -> Iterator[DeadLetter]:
        """
        The table's rows by key (newest first: by ``updated_at``), read-only: a running
        daemon may be writing beside.
        """
        if not self._path.exists():
            return
        order = "updated_at DESC, key" if newest_first else "key"
        try:
            with closing(sqlite3.connect(f"file:{self._path}?mode=ro", uri=True)) as db:
                db.row_factory = sqlite3.Row
                for found in db.execute(f'SELECT * FROM "{self._table}" ORDER BY {order}'):
                    yield DeadLetter(dict(found))
        except sqlite3.Error as exc:
            raise FatalError(f"{_WHAT}: cannot read table {self._table!r} in {self._path}: "
                             f"{exc}") from None

    def find_rows(self, key: str, *, groups: Sequence[str] | None = None) -> Iterator[FoundRow]:
        """The table's row for ``key`` (keyed, so ``groups`` does not matter), read-only."""
        if not self._path.exists():
            return
        where = f"{self._path} table {self._table}"
        try:
            with closing(sqlite3.connect(f"file:{self._path}?mode=ro", uri=True)) as db:
                db.row_factory = sqlite3.Row
                rows = [dict(r) for r in
                        db.execute(f'SELECT * FROM "{self._table}" WHERE key = ?', (key,))]
        except sqlite3.Error:
            return  # no table yet, or a database that is not ours: nothing found
        for row in rows:
            for name in ("history", "request", "source"):  # the dead-letter table's JSON
                if isinstance(row.get(name), str):
                    try:
                        row[name] = orjson.loads(row[name])
                    except orjson.JSONDecodeError:
                        pass
            yield FoundRow(row, where)

    # -- worker-thread side -------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            raise FatalError(f"{_WHAT} {self._path}: used before open() or after aclose()")
        return self._db

    def _open(self) -> None:
        if self._path.is_dir():
            raise ConfigError(f"{_WHAT}: {self._path} is a directory, not a database file")
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
            if self._mode is not None:
                self._path.chmod(self._mode)  # SQLite gives its -wal/-shm files the same
        except (OSError, sqlite3.Error) as exc:
            raise FatalError(f"{_WHAT}: cannot open {self._path}: {exc}") from None
        try:
            db.execute("PRAGMA busy_timeout = 10000")
            mode = db.execute(f"PRAGMA journal_mode = {self._journal}").fetchone()[0]
            if str(mode).lower() != self._journal:
                raise FatalError(
                    f"{_WHAT}: {self._path} refused journal_mode {self._journal} (got {mode})"
                )
            db.execute("PRAGMA synchronous = FULL")
            # 8 MiB: enough for the key index's hot pages; more only grows RSS with the table.
            db.execute("PRAGMA cache_size = -8192")
            self._ensure_table(db)
        except sqlite3.Error as exc:
            db.close()
            raise self._classify(exc, "open") from exc
        except BaseException:
            db.close()
            raise
        self._db = db

    def _ensure_table(self, db: sqlite3.Connection) -> None:
        columns = ", ".join(f"{name} {decl}" for name, decl in self._columns)
        db.execute(f'CREATE TABLE IF NOT EXISTS "{self._table}" ({columns})')
        found = {row[1]: row[5] for row in db.execute(f'PRAGMA table_info("{self._table}")')}
        for added in ("output_json", "message"):  # columns newer than the first schema
            if added not in found and any(name == added for name, _ in self._columns):
                db.execute(f'ALTER TABLE "{self._table}" ADD COLUMN {added} TEXT')
                found[added] = 0
        missing = [name for name, _ in self._columns if name not in found]
        if missing:
            raise FatalError(
                f"{_WHAT}: table {self._table!r} in {self._path} lacks columns "
                f"{', '.join(missing)} (has {', '.join(found)}); use another table name"
            )
        if found["key"] != 1 or sum(1 for pk in found.values() if pk) != 1:
            raise FatalError(
                f"{_WHAT}: table {self._table!r} in {self._path} must have key as its "
                "only PRIMARY KEY column"
            )

    def _put(self, group: str, rows: Sequence[ResultRow]) -> None:
        db = self._connection()
        now = datetime.now(UTC).isoformat(timespec="microseconds")
        values = self._values
        try:
            if not db.in_transaction:
                db.execute("BEGIN")
            self._dirty.add(group)
            db.executemany(self._upsert, [values(row, now) for row in rows])
        except sqlite3.Error as exc:
            self._after_error(db, exc)
            self._lost.pop(group, None)  # this put's own error tells the caller already
            raise self._classify(exc, f"put for group {group}") from exc

    def _flush(self, group: str) -> None:
        db = self._connection()
        if group in self._lost:
            reason = self._lost.pop(group)
            raise RetriableError(
                f"{_WHAT} {self._path}: rows put for group {group} were rolled back "
                f"({reason}); replay the group"
            )
        if group not in self._dirty:
            return
        try:
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            self._after_error(db, exc)
            if group in self._lost:
                self._lost.pop(group)
            raise self._classify(exc, f"commit of group {group}") from exc
        self._dirty.clear()

    def _after_error(self, db: sqlite3.Connection, exc: sqlite3.Error) -> None:
        """If SQLite dropped the transaction, every group in it must be replayed."""
        if not db.in_transaction:
            for lost in self._dirty:
                self._lost[lost] = str(exc)
            self._dirty.clear()

    def _classify(self, exc: sqlite3.Error, doing: str) -> Exception:
        message = f"{_WHAT} {self._path}: {doing} failed: {exc}"
        if getattr(exc, "sqlite_errorname", "") == "SQLITE_NOTADB":  # the input, say: setup
            return ConfigError(f"{message} (the path is a file that is not a SQLite database: "
                               "point the sink at a new or SQLite file)")
        transient = isinstance(exc, sqlite3.OperationalError) and any(
            word in str(exc) for word in ("locked", "busy", "disk I/O", "full")
        )
        return RetriableError(message) if transient else FatalError(message)

    def _close(self) -> None:
        db, self._db = self._db, None
        if db is None:
            return
        try:
            if db.in_transaction:
                db.execute("ROLLBACK")
        finally:
            db.close()
            self._dirty.clear()


@hookimpl
def register_sinks(register: Any) -> None:
    """The built-in ``sqlite`` sink type (``kind = "dead_letter"`` for a dead-letter table)."""
    register("sqlite", SqliteSink)
