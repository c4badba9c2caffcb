"""
The ``postgres`` sink: one transaction per group, so ``flush`` is a COMMIT.

Rows put for a group are COPYed into a temp table inside that group's open
transaction (fast, and nothing of the group is held in memory), and ``flush``
applies them with one statement and commits:

- ``mode = "results"``: upsert into a results (or dead-letter) table that the
  sink creates, keyed by ``key``.
- ``mode = "update"``: ``UPDATE`` the operator's own table, setting columns
  from row fields; keys that match no row are counted in ``missing_keys``.

Both are idempotent, so replaying a group is harmless. If the connection
drops while a group is open its transaction is gone: later ``put`` calls for
that group are ignored and ``flush`` raises :class:`RetriableError`; the engine
must then send the group again from its first row (the sink contract's
replay). ``flush`` never reports a group durable unless its COMMIT succeeded.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson
import structlog

from batchd.connectors._pg import (
    close_quietly,
    connect,
    connection_options,
    describe,
    is_connection_error,
    quote_column,
    quote_table,
    redact,
)
from batchd.plugins.contract import PluginContext, Sink
from batchd.plugins.errors import ConfigError, FatalError, RetriableError
from batchd.plugins.hookspecs import hookimpl
from batchd.plugins.options import Options
from batchd.plugins.records import ResultRow

__all__ = ("DEAD_LETTER_COLUMNS", "RESULTS_COLUMNS", "PostgresSink", "register_sinks")

OWNER = "postgres sink"
STAGE = "pg_temp.batchd_stage"
log = structlog.get_logger("batchd.postgres")

#: The documented results table (``message JSONB`` is added when ``message = true``).
#: ``output_json`` came later: a table made before it gets it by ALTER TABLE ADD COLUMN.
RESULTS_COLUMNS: tuple[tuple[str, str], ...] = (
    ("key", "TEXT"), ("custom_id", "TEXT"), ("status", "TEXT"), ("output", "TEXT"),
    ("model", "TEXT"), ("input_tokens", "INTEGER"), ("output_tokens", "INTEGER"),
    ("cost_usd", "DOUBLE PRECISION"), ("batch_id", "TEXT"), ("attempt", "INTEGER"),
    ("output_json", "JSONB"),
)
#: The documented dead-letter table (``kind = "dead_letter"``).
DEAD_LETTER_COLUMNS: tuple[tuple[str, str], ...] = (
    ("key", "TEXT"), ("custom_id", "TEXT"), ("error_type", "TEXT"), ("error_message", "TEXT"),
    ("attempts", "INTEGER"), ("history", "JSONB"), ("request", "JSONB"), ("source", "JSONB"),
    ("batch_id", "TEXT"),
)
#: Row fields that ``set`` may copy into the operator's table in update mode.
UPDATE_FIELDS: dict[str, str] = {
    "output": "TEXT", "model": "TEXT", "status": "TEXT", "cost_usd": "DOUBLE PRECISION",
    "input_tokens": "INTEGER", "output_tokens": "INTEGER", "batch_id": "TEXT",
    "attempt": "INTEGER", "custom_id": "TEXT", "output_json": "JSONB",
}
_TYPE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_ .\"]*(\(\d+(,\s*\d+)?\))?(\[\])?$")


def _text(value: str | None) -> str | None:
    """PostgreSQL text cannot hold NUL; it becomes U+FFFD rather than failing the group."""
    return value.replace("\x00", "\ufffd") if value and "\x00" in value else value


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return _text(value)
    if isinstance(value, list):
        return [_scrub(item) for item in value]
    if isinstance(value, dict):
        return {_scrub(k): _scrub(v) for k, v in value.items()}
    return value


def _json(value: Any) -> str | None:
    if value is None:
        return None
    text = orjson.dumps(value).decode()
    return orjson.dumps(_scrub(value)).decode() if "\\u0000" in text else text


@dataclass(slots=True)
class _Group:
    """One group's open transaction, rows staged so far, and why it broke (if it did)."""

    conn: asyncpg.Connection
    tx: Any
    seq: int = 0
    broken: str | None = None


class PostgresSink(Sink):
    """
    Writes result rows to PostgreSQL, one transaction per group.

    Args:
        options: the ``[[pipeline.sink]]`` table minus ``type``; see docs/postgres.md.
        context: where the pipeline runs (names the connections in pg_stat_activity).

    Attributes:
        missing_keys: update mode only; how many keys matched no row so far.
    """

    def __init__(self, options: dict[str, Any], context: PluginContext) -> None:
        opts = Options(options, context, what=OWNER)
        connection = connection_options(opts)
        self._dsn, self._attempts, self._timeout = (
            connection.dsn, connection.attempts, connection.timeout)
        self.mode: str = opts.choice("mode", ("results", "update"), "results")
        self._app = f"batchd:{context.pipeline}:sink"
        self.missing_keys = 0
        self._groups: dict[str, _Group] = {}
        self._lost: set[str] = set()
        self._idle: list[asyncpg.Connection] = []
        if self.mode == "results":
            self._init_results(opts)
        else:
            self._init_update(opts)
        opts.finish()

    def _init_results(self, opts: Options) -> None:
        for name in ("key", "set", "key_type"):
            if name in opts:
                raise opts.error(name, "applies only to mode = 'update'")
        self.kind: str = opts.choice("kind", ("results", "dead_letter"), "results")
        default = "batchd_results" if self.kind == "results" else "batchd_dead_letters"
        self._table = quote_table(opts, "table", opts.text("table", default))
        with_message = opts.flag("message", False)
        if with_message and self.kind == "dead_letter":
            raise opts.error("message", "applies only to kind = 'results'")
        columns = RESULTS_COLUMNS if self.kind == "results" else DEAD_LETTER_COLUMNS
        self._columns = columns + ((("message", "JSONB"),) if with_message else ())
        self._message = with_message

    def _init_update(self, opts: Options) -> None:
        for name in ("kind", "message"):
            if name in opts:
                raise opts.error(name, "applies only to mode = 'results'")
        self.kind = "update"
        self._table = quote_table(opts, "table", opts.text("table"))
        self._key_name = opts.text("key")
        self._key = quote_column(opts, "key", self._key_name)
        mapping = opts.get("set", dict)
        if not mapping:
            raise opts.error("set", "must be a table like {category = \"output\"} mapping "
                                    "columns to row fields")
        for column, source in mapping.items():
            quote_column(opts, f"set.{column}", column)
            if source not in UPDATE_FIELDS:
                raise opts.error(f"set.{column}", "must name a row field "
                                                  f"({', '.join(UPDATE_FIELDS)}), got {source!r}")
        self._set: dict[str, str] = dict(mapping)
        key_type = opts.text("key_type", None)
        if key_type is not None and not _TYPE_NAME.match(key_type):
            raise opts.error("key_type", f"must be a type name like 'bigint', got {key_type!r}")
        self._key_type: str | None = key_type
        fields = list(dict.fromkeys(self._set.values()))
        self._columns = (("key", "TEXT"), *((name, UPDATE_FIELDS[name]) for name in fields))

    # -- lifecycle ---------------------------------------------------------------

    async def probe(self) -> None:
        """Connect with the DSN, then hang up: nothing is created or written."""
        conn = await connect(self._dsn, owner=OWNER, application_name=f"{self._app}:probe",
                             attempts=1, connect_timeout=self._timeout)
        await close_quietly(conn)

    async def open(self) -> None:
        """Connect, create the results table or check the target table's columns."""
        conn = await self._acquire()
        try:
            if self.mode == "results":
                await self._prepare_results(conn)
            else:
                await self._prepare_update(conn)
        except asyncpg.PostgresError as exc:
            await close_quietly(conn)
            if is_connection_error(exc, conn):
                raise RetriableError(f"{OWNER}: lost connection to {describe(self._dsn)} "
                                     "while opening") from None
            raise ConfigError(f"{OWNER}: preparing {self._table} failed: "
                              f"{redact(str(exc), self._dsn)}") from None
        except BaseException:
            await close_quietly(conn)
            raise
        self._idle.append(conn)
        cols = ", ".join(f'"{name}" {pg_type}' for name, pg_type in self._columns)
        self._stage_ddl = f"CREATE TEMP TABLE batchd_stage (seq INTEGER, {cols}) ON COMMIT DROP"
        self._stage_columns = ["seq", *(name for name, _ in self._columns)]

    async def _table_columns(self, conn: asyncpg.Connection) -> dict[str, str]:
        rows = await conn.fetch(
            "SELECT a.attname, format_type(a.atttypid, a.atttypmod) AS type "
            "FROM pg_attribute a WHERE a.attrelid = to_regclass($1) "
            "AND a.attnum > 0 AND NOT a.attisdropped",
            self._table,
        )
        return {row["attname"]: row["type"] for row in rows}

    async def _prepare_results(self, conn: asyncpg.Connection) -> None:
        cols = ", ".join(f"{name} {pg_type}" for name, pg_type in self._columns
                         if name not in ("key", "message", "output_json"))
        try:
            await conn.execute(
                f"CREATE TABLE IF NOT EXISTS {self._table} (key TEXT PRIMARY KEY, {cols}, "
                "updated_at TIMESTAMPTZ NOT NULL DEFAULT now())"
            )
        except asyncpg.UniqueViolationError:
            pass  # another sink created it at the same moment
        # A results table from before output_json existed gains it (NULL for text answers).
        await conn.execute(f"ALTER TABLE {self._table} ADD COLUMN IF NOT EXISTS output_json JSONB")
        if self._message:
            await conn.execute(f"ALTER TABLE {self._table} ADD COLUMN IF NOT EXISTS message JSONB")
        have = await self._table_columns(conn)
        missing = [name for name, _ in self._columns if name not in have]
        if "updated_at" not in have:
            missing.append("updated_at")
        if missing:
            raise ConfigError(f"{OWNER}: option 'table' names {self._table}, which exists but "
                              f"lacks column(s) {', '.join(missing)}")
        names = [name for name, _ in self._columns]
        col_list = ", ".join(names)
        updates = ", ".join(f"{n} = EXCLUDED.{n}" for n in names if n != "key")
        changed = ", ".join(f"dst.{n}" for n in names if n != "key")
        excluded = ", ".join(f"EXCLUDED.{n}" for n in names if n != "key")
        self._apply_sql = (
            f"INSERT INTO {self._table} AS dst ({col_list}, updated_at) "
            f"SELECT DISTINCT ON (key) {col_list}, now() FROM {STAGE} ORDER BY key, seq DESC "
            f"ON CONFLICT (key) DO UPDATE SET {updates}, updated_at = EXCLUDED.updated_at "
            f"WHERE ({changed}) IS DISTINCT FROM ({excluded})"
        )

    async def _prepare_update(self, conn: asyncpg.Connection) -> None:
        have = await self._table_columns(conn)
        if not have:
            raise ConfigError(f"{OWNER}: option 'table': table {self._table} does not exist")
        wanted = [self._key_name, *self._set]
        absent = [name for name in wanted if name not in have]
        if absent:
            raise ConfigError(f"{OWNER}: option 'set'/'key': table {self._table} has no "
                              f"column(s) {', '.join(absent)}")
        key_type: str | None = have[self._key_name]
        if self._key_type is not None:
            try:
                key_type = await conn.fetchval("SELECT format_type(to_regtype($1), NULL)",
                                               self._key_type)
            except asyncpg.PostgresError:
                key_type = None
            if key_type is None:
                raise ConfigError(f"{OWNER}: option 'key_type': {self._key_type!r} is not a "
                                  "type this database knows")
        sets = ", ".join(f'"{col}" = v.{src}::{have[col]}' for col, src in self._set.items())
        fields = ", ".join(dict.fromkeys(self._set.values()))
        self._apply_sql = (
            f"WITH v AS (SELECT DISTINCT ON (key) key, {fields} FROM {STAGE} "
            f"ORDER BY key, seq DESC), "
            f"u AS (UPDATE {self._table} AS dst SET {sets} FROM v "
            f"WHERE dst.{self._key} = v.key::{key_type} RETURNING v.key) "
            f"SELECT count(*)::int AS missing, (array_agg(v.key ORDER BY v.key))[1:10] AS sample "
            f"FROM v WHERE NOT EXISTS (SELECT 1 FROM u WHERE u.key = v.key)"
        )

    # -- connections ---------------------------------------------------------------

    async def _acquire(self) -> asyncpg.Connection:
        while self._idle:
            conn = self._idle.pop()
            if not conn.is_closed():
                return conn
        return await connect(self._dsn, owner=OWNER, application_name=self._app,
                             attempts=self._attempts, connect_timeout=self._timeout)

    async def _release(self, conn: asyncpg.Connection) -> None:
        if conn.is_closed() or len(self._idle) >= 2:
            await close_quietly(conn)
        else:
            self._idle.append(conn)

    async def _begin(self) -> _Group:
        """A new group transaction; a dead pooled connection is replaced transparently."""
        for attempt in range(1, self._attempts + 1):
            conn = await self._acquire()
            try:
                tx = conn.transaction()
                await tx.start()
                await conn.execute(self._stage_ddl)
                return _Group(conn=conn, tx=tx)
            except Exception as exc:
                await close_quietly(conn)
                if not is_connection_error(exc, conn) or attempt == self._attempts:
                    raise self._error(exc, "starting a group", conn) from None
        raise AssertionError("unreachable")

    def _error(self, exc: BaseException, doing: str,
               conn: asyncpg.Connection | None = None) -> Exception:
        text = f"{type(exc).__name__}: {redact(str(exc), self._dsn)}"
        if isinstance(exc, RetriableError | FatalError | ConfigError):
            return exc
        if is_connection_error(exc, conn):
            return RetriableError(f"{OWNER}: lost connection to {describe(self._dsn)} "
                                  f"while {doing}: {text}")
        return FatalError(f"{OWNER}: {doing} on {self._table} failed: {text}")

    # -- rows ----------------------------------------------------------------------

    def _tuple(self, seq: int, row: ResultRow) -> tuple[Any, ...]:
        if self.kind == "update":
            return (seq, row.key, *(_text(getattr(row, f)) if UPDATE_FIELDS[f] == "TEXT"
                                    else _json(getattr(row, f)) if UPDATE_FIELDS[f] == "JSONB"
                                    else getattr(row, f) for f in self._stage_columns[2:]))
        if self.kind == "dead_letter":
            return (seq, _text(row.key), _text(row.custom_id), _text(row.error_type),
                    _text(row.error_message), row.attempt, _json(row.history),
                    _json(row.request), _json(row.source), row.batch_id)
        base = (seq, _text(row.key), _text(row.custom_id), row.status, _text(row.output),
                row.model, row.input_tokens, row.output_tokens, row.cost_usd, row.batch_id,
                row.attempt, _json(row.output_json))
        return (*base, _json(row.message)) if self._message else base

    async def put(self, group: str, rows: Sequence[ResultRow]) -> None:
        """Stage ``rows`` in the group's transaction (COPY); nothing is visible until flush."""
        if not rows:
            return
        g = self._groups.get(group)
        if g is None:
            self._lost.discard(group)  # a fresh start of the group: the replay
            g = self._groups[group] = await self._begin()
        if g.broken:
            return  # the transaction is gone; flush will ask for a replay
        records = [self._tuple(g.seq + i, row) for i, row in enumerate(rows)]
        try:
            await g.conn.copy_records_to_table("batchd_stage", records=records,
                                               columns=self._stage_columns)
        except Exception as exc:
            error = self._error(exc, f"staging group {group}", g.conn)
            if not isinstance(error, RetriableError):
                await self._abandon(group)
                raise error from None
            g.broken = str(error)
            await close_quietly(g.conn)
            log.warning("postgres sink lost its connection", sink=self._app, group=group,
                        error=g.broken)
            return
        g.seq += len(rows)

    async def flush(self, group: str) -> None:
        """Apply and COMMIT the group; returns only once the commit succeeded."""
        g = self._groups.pop(group, None)
        if g is None:
            if group in self._lost:
                raise RetriableError(f"{OWNER}: group {group} was lost with its connection; "
                                     "put its rows again from the first")
            return
        if g.broken:
            self._lost.add(group)
            raise RetriableError(f"{g.broken}; group {group} must be put again from its first row")
        try:
            result = await g.conn.fetchrow(self._apply_sql) if self.kind == "update" else None
            if self.kind != "update":
                await g.conn.execute(self._apply_sql)
            await g.tx.commit()
        except Exception as exc:
            error = self._error(exc, f"writing group {group}", g.conn)
            await close_quietly(g.conn)
            if isinstance(error, RetriableError):
                self._lost.add(group)
            raise error from None
        await self._release(g.conn)
        if result is not None and result["missing"]:
            self.missing_keys += result["missing"]
            log.warning("postgres sink: keys matched no row", sink=self._app, group=group,
                        table=self._table, missing=result["missing"], sample=result["sample"])

    async def _abandon(self, group: str) -> None:
        g = self._groups.pop(group, None)
        if g is None:
            return
        try:
            await g.tx.rollback()
        except Exception:
            await close_quietly(g.conn)
            return
        await self._release(g.conn)

    async def aclose(self) -> None:
        """Roll back unflushed groups and close every connection; safe to call twice."""
        for group in list(self._groups):
            g = self._groups.pop(group)
            await close_quietly(g.conn)
        idle, self._idle = self._idle, []
        for conn in idle:
            await close_quietly(conn)


@hookimpl
def register_sinks(register: Any) -> None:
    """The built-in ``postgres`` sink type."""
    register("postgres", PostgresSink)
