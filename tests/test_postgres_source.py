"""The ``postgres`` source against the real PostgreSQL: keyset paging, resume, reconnects."""

from __future__ import annotations

import traceback
from typing import Any

import anyio
import asyncpg
import pytest
import structlog

from batchd.connectors.postgres_source import PostgresSource
from batchd.plugins.contract import PluginContext
from batchd.plugins.errors import ConfigError, RetriableError
from batchd.plugins.manager import source_factory
from batchd.plugins.records import Record
from tests.fixtures.postgres import terminate_backends


async def make_tickets(conn: asyncpg.Connection, schema: str, count: int) -> str:
    """``schema.tickets`` with ids 1..count; every third row already has a category."""
    table = f"{schema}.tickets"
    await conn.execute(
        f"CREATE TABLE {table} (ticket_id bigint PRIMARY KEY, body text, category text)"
    )
    await conn.execute(
        f"INSERT INTO {table} SELECT g, 'body ' || g, CASE WHEN g % 3 = 0 THEN 'bug' END "
        f"FROM generate_series(1, $1::int) AS g",
        count,
    )
    return table


def source(pg_dsn: str, context: PluginContext, **options: Any) -> PostgresSource:
    """A source over ``options`` with the test DSN."""
    return PostgresSource({"dsn": pg_dsn, "key": "ticket_id", **options}, context)


async def drain(src: PostgresSource) -> list[Record]:
    """Every record until the source reports drained, retrying dropped connections."""
    out: list[Record] = []
    while True:
        try:
            page = await src.poll()
        except RetriableError:
            continue
        if page is None:
            return out
        out.extend(page)


@pytest.mark.anyio
class TestKeysetPaging:
    async def test_reads_every_row_once_in_order(
        self, pg_dsn: str, pg_schema: str, conn: asyncpg.Connection, context: PluginContext
    ) -> None:
        """10,000 rows come back exactly once, in key order, in pages of at most page_size."""
        table = await make_tickets(conn, pg_schema, 10_000)
        async with source(pg_dsn, context, table=table, page_size=700) as src:
            await src.start(None)
            pages: list[list[Record]] = []
            while (page := await src.poll()) is not None:
                pages.append(page)
        keys = [r.key for page in pages for r in page]
        assert keys == [str(i) for i in range(1, 10_001)]
        assert max(len(page) for page in pages) == 700
        assert pages[0][0].fields == {"ticket_id": 1, "body": "body 1", "category": None}

    async def test_integer_keys_resume_numerically(
        self, pg_dsn: str, pg_schema: str, conn: asyncpg.Connection, context: PluginContext
    ) -> None:
        """A stored int key 9 resumes at 10, not lexically after '9'."""
        table = await make_tickets(conn, pg_schema, 30)
        async with source(pg_dsn, context, table=table, page_size=9) as src:
            await src.start(None)
            first = await src.poll()
        assert first is not None
        assert first[-1].position == {"key": 9, "key_type": "int"}
        async with source(pg_dsn, context, table=table, page_size=9) as src:
            await src.start(first[-1].position)
            rest = await drain(src)
        assert [r.key for r in rest] == [str(i) for i in range(10, 31)]

    async def test_resume_from_mid_page_position(
        self, pg_dsn: str, pg_schema: str, conn: asyncpg.Connection, context: PluginContext
    ) -> None:
        """Resuming from any record's position yields exactly the records after it."""
        table = await make_tickets(conn, pg_schema, 2_500)
        async with source(pg_dsn, context, table=table, page_size=1000) as src:
            await src.start(None)
            first = await src.poll()
            second = await src.poll()
        assert first is not None and second is not None
        committed = second[499].position
        async with source(pg_dsn, context, table=table, page_size=1000) as src:
            await src.start(committed)
            rest = await drain(src)
        assert [r.key for r in rest] == [str(i) for i in range(1501, 2501)]

    async def test_text_and_timestamp_keys_resume_in_their_own_type(
        self, pg_dsn: str, pg_schema: str, conn: asyncpg.Connection, context: PluginContext
    ) -> None:
        """Text and timestamptz keys round-trip through a JSON position and resume after it."""
        await conn.execute(
            f"CREATE TABLE {pg_schema}.ev (ts timestamptz PRIMARY KEY, name text UNIQUE)"
        )
        await conn.execute(
            f"INSERT INTO {pg_schema}.ev SELECT timestamptz '2026-01-01 00:00:00.5+00' "
            f"+ g * interval '1 minute', 'n' || lpad(g::text, 3, '0') "
            f"FROM generate_series(1, 50) g"
        )
        for key, expected_type in (("ts", "timestamptz"), ("name", "text")):
            opts = {"dsn": pg_dsn, "table": f"{pg_schema}.ev", "key": key, "page_size": 20}
            async with PostgresSource(opts, context) as src:
                await src.start(None)
                page = await src.poll()
            assert page is not None
            position = page[-1].position
            assert position["key_type"] == expected_type
            assert isinstance(position["key"], str)
            async with PostgresSource(opts, context) as src:
                await src.start(position)
                rest = await drain(src)
            assert [r.fields["name"] for r in rest] == [f"n{i:03d}" for i in range(21, 51)]

    async def test_where_filter_limits_rows(
        self, pg_dsn: str, pg_schema: str, conn: asyncpg.Connection, context: PluginContext
    ) -> None:
        """Only rows matching ``where`` are read, still in key order."""
        table = await make_tickets(conn, pg_schema, 100)
        opts = {"table": table, "where": "category IS NULL", "page_size": 10}
        async with source(pg_dsn, context, **opts) as src:
            await src.start(None)
            rows = await drain(src)
        assert [r.key for r in rows] == [str(i) for i in range(1, 101) if i % 3]

    async def test_fields_selects_columns_and_keeps_key(
        self, pg_dsn: str, pg_schema: str, conn: asyncpg.Connection, context: PluginContext
    ) -> None:
        """``fields`` limits the columns; the key column is always included."""
        table = await make_tickets(conn, pg_schema, 3)
        async with source(pg_dsn, context, table=table, fields=["body"]) as src:
            await src.start(None)
            rows = await drain(src)
        assert rows[0].fields == {"ticket_id": 1, "body": "body 1"}

    async def test_query_source(
        self, pg_dsn: str, pg_schema: str, conn: asyncpg.Connection, context: PluginContext
    ) -> None:
        """A SELECT is read as a subquery with computed columns."""
        table = await make_tickets(conn, pg_schema, 50)
        query = f"SELECT ticket_id, upper(body) AS shout FROM {table} WHERE ticket_id > 40;"
        async with source(pg_dsn, context, query=query, page_size=4) as src:
            await src.start(None)
            rows = await drain(src)
        assert [r.key for r in rows] == [str(i) for i in range(41, 51)]
        assert rows[0].fields == {"ticket_id": 41, "shout": "BODY 41"}


@pytest.mark.anyio
class TestRepoll:
    async def test_rows_inserted_after_drain_are_read(
        self, pg_dsn: str, pg_schema: str, conn: asyncpg.Connection, context: PluginContext
    ) -> None:
        """After None, a later poll re-queries from the cursor and returns new rows."""
        table = await make_tickets(conn, pg_schema, 10)
        async with source(pg_dsn, context, table=table, repoll=0) as src:
            await src.start(None)
            assert len(await drain(src)) == 10
            assert await src.poll() is None
            await conn.execute(f"INSERT INTO {table} VALUES (11, 'late', NULL), (12, 'x', NULL)")
            late = await src.poll()
        assert late is not None and [r.key for r in late] == ["11", "12"]

    async def test_repoll_interval_is_respected(
        self, pg_dsn: str, pg_schema: str, conn: asyncpg.Connection, context: PluginContext
    ) -> None:
        """Within ``repoll`` seconds of draining, poll reports drained without querying."""
        table = await make_tickets(conn, pg_schema, 5)
        async with source(pg_dsn, context, table=table, repoll="1h") as src:
            await src.start(None)
            assert len(await drain(src)) == 5
            await conn.execute(f"INSERT INTO {table} VALUES (6, 'late', NULL)")
            assert await src.poll() is None


@pytest.mark.anyio
class TestConnectionLoss:
    async def test_backend_killed_between_polls_loses_nothing(
        self, pg_dsn: str, pg_schema: str, conn: asyncpg.Connection, context: PluginContext
    ) -> None:
        """Killing the idle source backend every few pages still reads each row exactly once."""
        table = await make_tickets(conn, pg_schema, 5_000)
        app = f"batchd:{context.pipeline}:source"
        keys: list[str] = []
        kills = 0
        async with source(pg_dsn, context, table=table, page_size=250) as src:
            await src.start(None)
            while True:
                if len(keys) % 750 == 0:
                    kills += await terminate_backends(conn, app)
                try:
                    page = await src.poll()
                except RetriableError:
                    continue
                if page is None:
                    break
                keys.extend(r.key for r in page)
        assert kills == 7
        assert keys == [str(i) for i in range(1, 5_001)]

    async def test_backend_killed_mid_query_raises_retriable_and_resumes(
        self, pg_dsn: str, pg_schema: str, conn: asyncpg.Connection, context: PluginContext
    ) -> None:
        """A query cut by pg_terminate_backend raises RetriableError; the retry re-reads it."""
        table = await make_tickets(conn, pg_schema, 1_000)
        app = f"batchd:{context.pipeline}:source"
        slow = "(SELECT pg_sleep(0.2)) IS NOT NULL"
        keys: list[str] = []
        failures = 0

        async def kill_soon() -> None:
            await anyio.sleep(0.08)
            await terminate_backends(conn, app)

        async with source(pg_dsn, context, table=table, page_size=250, where=slow) as src:
            await src.start(None)
            for attempt in range(20):
                async with anyio.create_task_group() as tg:
                    if attempt % 2 == 0:
                        tg.start_soon(kill_soon)
                    try:
                        page = await src.poll()
                    except RetriableError as exc:
                        failures += 1
                        assert "lost connection" in str(exc)
                        continue
                if page is None:
                    break
                keys.extend(r.key for r in page)
        assert failures >= 4
        assert keys == [str(i) for i in range(1, 1_001)]


class TestConfig:
    @pytest.mark.parametrize(
        ("options", "option"),
        [
            ({"table": "tickets; DROP TABLE x"}, "postgres source: table: must be a table"),
            ({"table": "a.b.c"}, "table: must be a table name or schema.table"),
            ({"table": "tickets", "key": "id)--"}, "key: must be a column name"),
            ({"table": "tickets", "fields": ["body", "bad name"]}, "fields: must be a column"),
            ({"table": "tickets", "page_size": 0}, "page_size: must be a positive integer"),
            ({"table": "tickets", "repoll": "soon"}, "repoll: expected a duration like"),
            ({"query": "DELETE FROM tickets"}, "query: must be a SELECT statement"),
            ({"table": "tickets", "page_sise": 10},
             r"page_sise: unknown option \(did you mean 'page_size'\?\)"),
            ({"table": "t", "query": "SELECT 1"}, "'table' or option 'query'"),
            ({}, "'table' or option 'query'"),
        ],
    )
    def test_bad_options_name_the_option(
        self, options: dict[str, Any], option: str, context: PluginContext
    ) -> None:
        """Each invalid option raises ConfigError naming that option."""
        opts = {"dsn": "postgresql://x@127.0.0.1/test", "key": "id", **options}
        with pytest.raises(ConfigError, match=option):
            PostgresSource(opts, context)

    def test_env_dsn_must_be_set(
        self, context: PluginContext, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """``dsn = "env:VAR"`` with VAR unset names the variable."""
        monkeypatch.delenv("BATCHD_NO_SUCH_DSN", raising=False)
        opts = {"dsn": "env:BATCHD_NO_SUCH_DSN", "table": "t", "key": "id"}
        with pytest.raises(ConfigError, match="BATCHD_NO_SUCH_DSN"):
            PostgresSource(opts, context)

    def test_registered_as_postgres(self) -> None:
        """The plugin manager resolves type ``postgres`` to this source."""
        assert source_factory("postgres") is PostgresSource

    @pytest.mark.anyio
    async def test_password_never_in_errors_or_logs(
        self, context: PluginContext, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """An unreachable server's error names host and port but never the DSN's password."""
        secret = "An0ther-s3cret"
        monkeypatch.setenv("BATCHD_TEST_SECRET_DSN", f"postgresql://u:{secret}@127.0.0.1:1/t")
        opts = {"dsn": "env:BATCHD_TEST_SECRET_DSN", "table": "t", "key": "id",
                "connect_attempts": 2}
        with structlog.testing.capture_logs() as logs:
            src = PostgresSource(opts, context)
            with pytest.raises(RetriableError) as caught:
                await src.start(None)
            await src.aclose()
        text = "".join(traceback.format_exception(caught.value))
        assert "127.0.0.1:1" in str(caught.value)
        assert logs and secret not in text + repr(logs)
        out = capsys.readouterr()
        assert secret not in out.out + out.err

    @pytest.mark.anyio
    async def test_missing_table_is_a_config_error(
        self, pg_dsn: str, pg_schema: str, context: PluginContext
    ) -> None:
        """A table that does not exist fails at start with a ConfigError."""
        src = source(pg_dsn, context, table=f"{pg_schema}.nope")
        with pytest.raises(ConfigError, match="nope"):
            await src.start(None)
        await src.aclose()
