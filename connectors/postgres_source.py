"""
The ``postgres`` source: reads a table (or a SELECT) in keyset pages.

Keyset paging (``WHERE key > $last ORDER BY key LIMIT n``) instead of OFFSET or
a server-side cursor because it costs the same at row 10 million as at row 10,
holds no transaction open between polls, and resumes from a single value
stored in the manifest. The price: rows inserted later with a key *smaller*
than the cursor are never seen (see docs/postgres.md).
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import re
import time
import uuid
from collections.abc import Callable
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
from batchd.plugins.contract import PluginContext, Source, SourceSize
from batchd.plugins.errors import ConfigError, FatalError, RetriableError
from batchd.plugins.hookspecs import hookimpl
from batchd.plugins.options import Options
from batchd.plugins.records import Record

__all__ = ("PostgresSource", "register_sources")

OWNER = "postgres source"
log = structlog.get_logger("batchd.postgres")

# key_type label -> (pg type names, JSON value -> Python value for the query parameter)
_INT_TYPES = frozenset({"int2", "int4", "int8", "oid"})
_TEXT_TYPES = frozenset({"text", "varchar", "bpchar", "name", "citext"})
_DECODERS: dict[str, Callable[[Any], Any]] = {
    "int": int,
    "text": str,
    "numeric": decimal.Decimal,
    "float": float,
    "uuid": uuid.UUID,
    "date": dt.date.fromisoformat,
    "timestamp": dt.datetime.fromisoformat,
    "timestamptz": dt.datetime.fromisoformat,
}
_SIMPLE_TYPES = {"numeric": "numeric", "float4": "float", "float8": "float", "uuid": "uuid",
                 "date": "date", "timestamp": "timestamp", "timestamptz": "timestamptz"}


def _key_label(pg_type: str) -> str:
    if pg_type in _INT_TYPES:
        return "int"
    if pg_type in _TEXT_TYPES:
        return "text"
    return _SIMPLE_TYPES.get(pg_type, pg_type)


def _json_key(value: Any) -> Any:
    """The key as stored in a position: ints and strings as-is, the rest as text."""
    if isinstance(value, (int, str, float)) and not isinstance(value, bool):
        return value
    if isinstance(value, (dt.date, dt.datetime)):
        return value.isoformat()
    return str(value)


def _json_safe(value: Any) -> Any:
    """Field values the spool and request templates can carry (JSON types only)."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (dt.date, dt.datetime, dt.time)):
        return value.isoformat()
    if isinstance(value, (decimal.Decimal, uuid.UUID, dt.timedelta)):
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    return str(value)


class PostgresSource(Source):
    """
    A keyset-paged reader of one table or SELECT.

    Args:
        options: the ``[pipeline.source]`` table minus ``type``; see docs/postgres.md.
        context: where the pipeline runs (names the connection in pg_stat_activity).
    """

    # A keyset read yields each key once, and a table that keeps growing runs for months:
    # the duplicate-key ledger forgets its keys after 30 days unless the pipeline's
    # ledger_retention says otherwise (docs/operations.md).
    ledger_retention: float | None = 30 * 86400.0

    def __init__(self, options: dict[str, Any], context: PluginContext) -> None:
        opts = Options(options, context, what=OWNER)
        connection = connection_options(opts)
        self._dsn, self._attempts, self._timeout = (
            connection.dsn, connection.attempts, connection.timeout)
        self._from = self._relation(opts)
        self._key_name: str = opts.text("key")
        self._key = quote_column(opts, "key", self._key_name)
        self._columns = self._select_list(opts)
        where = opts.text("where", None)
        self._where = f"({where}) AND " if where else ""
        self.max_records = opts.integer("page_size", self.max_records, min=1)
        self._repoll: float = opts.duration("repoll", 5.0)
        opts.finish()
        self._app = f"batchd:{context.pipeline}:source"
        self._conn: asyncpg.Connection | None = None
        self._cursor: Any = None
        self._has_cursor = False
        self._key_type = ""
        self._drained_at: float | None = None
        self._started = False

    def _relation(self, opts: Options) -> str:
        has_table, has_query = "table" in opts, "query" in opts
        if has_table == has_query:
            raise opts.error("table", "set exactly one of option 'table' or option 'query'")
        if has_table:
            return quote_table(opts, "table", opts.raw("table"))
        query = opts.text("query").strip().rstrip(";").strip()
        if not re.match(r"(?is)^(select|with|values|table)\b", query):
            raise opts.error("query", "must be a SELECT statement")
        return f"({query})"

    def _select_list(self, opts: Options) -> str:
        fields = opts.strings("fields", None)
        if fields is None:
            return "*"
        names = [quote_column(opts, "fields", name) for name in fields]
        if self._key not in names:
            names.insert(0, self._key)
        return ", ".join(f"s.{name}" for name in names)

    def _sql(self, *, after: bool) -> str:
        cond = f"s.{self._key} > $1" if after else "TRUE"
        return (
            f"SELECT {self._columns} FROM {self._from} AS s "
            f"WHERE {self._where}s.{self._key} IS NOT NULL AND {cond} "
            f"ORDER BY s.{self._key} LIMIT {self.max_records}"
        )

    async def start(self, resume: dict[str, Any] | None) -> None:
        """Connect, learn the key column's type, and place the cursor after ``resume``."""
        await self._connect()
        if resume is not None:
            if resume.get("key_type") != self._key_type or "key" not in resume:
                raise FatalError(
                    f"{OWNER}: stored position {resume!r} does not match key column "
                    f"{self._key_name!r} of type {self._key_type!r}; the table changed under "
                    "the pipeline"
                )
            try:
                self._cursor = _DECODERS[self._key_type](resume["key"])
            except (ValueError, TypeError, decimal.InvalidOperation) as exc:
                message = f"{OWNER}: stored position {resume!r} is unreadable: {exc}"
                raise FatalError(message) from None
            self._has_cursor = True
        self._started = True

    async def _connect(self) -> asyncpg.Connection:
        if self._conn is not None and not self._conn.is_closed():
            return self._conn
        conn = await connect(
            self._dsn, owner=OWNER, application_name=self._app, attempts=self._attempts,
            connect_timeout=self._timeout, read_only=True,
        )
        try:
            key_type = await self._learn_key_type(conn)
        except BaseException:
            await close_quietly(conn)
            raise
        if self._key_type and key_type != self._key_type:
            await close_quietly(conn)
            raise FatalError(f"{OWNER}: key column {self._key_name!r} changed type to {key_type}")
        self._key_type, self._conn = key_type, conn
        return conn

    async def _learn_key_type(self, conn: asyncpg.Connection) -> str:
        sql = f"SELECT s.{self._key} FROM {self._from} AS s WHERE {self._where}FALSE"
        try:
            stmt = await conn.prepare(sql)
        except asyncpg.PostgresError as exc:
            if is_connection_error(exc, conn):
                raise RetriableError(f"{OWNER}: {describe(self._dsn)}: {exc}") from None
            raise ConfigError(
                f"{OWNER}: options 'table'/'query', 'key' or 'where' are wrong: "
                f"{redact(str(exc), self._dsn)}"
            ) from None
        pg_type = stmt.get_attributes()[0].type.name
        label = _key_label(pg_type)
        if label not in _DECODERS:
            raise ConfigError(
                f"{OWNER}: option 'key' column {self._key_name!r} has type {pg_type}; keyset "
                "paging supports integer, text, numeric, float, uuid, date and timestamp keys"
            )
        return label

    async def poll(self) -> list[Record] | None:
        """The next page; ``None`` once a short page showed the table drained (until repoll)."""
        if not self._started:
            raise RuntimeError("PostgresSource.poll() before start()")
        if self._drained_at is not None:
            if time.monotonic() - self._drained_at < self._repoll:
                return None
            self._drained_at = None
        conn = await self._connect()
        try:
            if self._has_cursor:
                rows = await conn.fetch(self._sql(after=True), self._cursor)
            else:
                rows = await conn.fetch(self._sql(after=False))
        except Exception as exc:
            if not is_connection_error(exc, conn):
                if isinstance(exc, asyncpg.PostgresError):
                    raise FatalError(
                        f"{OWNER}: reading {self._from} failed: {redact(str(exc), self._dsn)}"
                    ) from None
                raise
            self._conn = None
            await close_quietly(conn)
            log.warning("postgres source lost its connection", pipeline=self._app,
                        target=describe(self._dsn), error=redact(str(exc), self._dsn))
            raise RetriableError(
                f"{OWNER}: lost connection to {describe(self._dsn)} while reading: "
                f"{type(exc).__name__}: {redact(str(exc), self._dsn)}"
            ) from None
        if len(rows) < self.max_records:
            self._drained_at = time.monotonic()
        if not rows:
            return None
        records = [self._record(row) for row in rows]
        self._cursor = rows[-1][self._key_name]
        self._has_cursor = True
        return records

    def _record(self, row: asyncpg.Record) -> Record:
        key = row[self._key_name]
        position = {"key": _json_key(key), "key_type": self._key_type}
        fields = {name: _json_safe(value) for name, value in row.items()}
        return Record(key=str(key), fields=fields, position=position)

    async def size(self, position: dict[str, Any] | None) -> SourceSize | None:
        """The planner's row estimate for the whole SELECT (``EXPLAIN``; nothing is read)."""
        try:
            conn = await connect(self._dsn, owner=OWNER, application_name=f"{self._app}:size",
                                 attempts=1, connect_timeout=min(self._timeout, 5.0),
                                 read_only=True)
        except Exception:
            return None
        try:
            sql = (f"EXPLAIN (FORMAT JSON) SELECT 1 FROM {self._from} AS s "
                   f"WHERE {self._where}s.{self._key} IS NOT NULL")
            plan = await conn.fetchval(sql)
            rows = (orjson.loads(plan) if isinstance(plan, str) else plan)[0]["Plan"]["Plan Rows"]
            return SourceSize(total=int(rows), unit="rows")
        except Exception:
            return None
        finally:
            await close_quietly(conn)

    async def probe(self) -> None:
        """Connect with the DSN and check the table/query and key column exist."""
        conn = await connect(self._dsn, owner=OWNER, application_name=f"{self._app}:probe",
                             attempts=1, connect_timeout=self._timeout, read_only=True)
        try:
            await self._learn_key_type(conn)
        finally:
            await close_quietly(conn)

    async def aclose(self) -> None:
        """Close the connection; safe to call twice."""
        conn, self._conn = self._conn, None
        await close_quietly(conn)


@hookimpl
def register_sources(register: Any) -> None:
    """The built-in ``postgres`` source type."""
    register("postgres", PostgresSource)
