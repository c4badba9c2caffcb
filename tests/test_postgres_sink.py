"""The ``postgres`` sink against the real PostgreSQL: upserts, write-back, replays, secrets."""

from __future__ import annotations

import traceback
from collections.abc import Sequence
from typing import Any

import asyncpg
import pytest
import structlog

from batchd.connectors._pg import redact
from batchd.plugins.contract import PluginContext
from batchd.plugins.errors import ConfigError, RetriableError
from batchd.plugins.manager import sink_factory
from batchd.plugins.records import ResultRow
from batchd.plugins.sinks.postgres import PostgresSink
from tests.fixtures.postgres import terminate_backends


def rows(start: int, stop: int, output: str = "label", **extra: Any) -> list[ResultRow]:
    """Succeeded rows with keys ``start..stop-1``."""
    return [
        ResultRow(key=str(i), custom_id=f"c{i}", status="succeeded", pipeline="p",
                  output=f"{output}{i}", model="claude-haiku-4-5", input_tokens=i,
                  output_tokens=2, cost_usd=i / 1000, batch_id="msgbatch_1", **extra)
        for i in range(start, stop)
    ]


async def put_in_chunks(sink: PostgresSink, group: str, items: Sequence[ResultRow],
                        size: int = 500) -> None:
    """Put ``items`` the way the engine streams a batch: in slices."""
    for i in range(0, len(items), size):
        await sink.put(group, items[i:i + size])


async def snapshot(conn: asyncpg.Connection, table: str) -> list[tuple[Any, ...]]:
    """Every row of ``table`` in key order, updated_at included."""
    return [tuple(r) for r in await conn.fetch(f"SELECT * FROM {table} ORDER BY key")]


@pytest.mark.anyio
class TestResultsMode:
    async def test_creates_the_documented_table(
        self, pg_dsn: str, pg_schema: str, conn: asyncpg.Connection, context: PluginContext
    ) -> None:
        """open() creates the results table with the documented columns and types."""
        table = f"{pg_schema}.results"
        async with PostgresSink({"dsn": pg_dsn, "table": table, "message": True}, context) as s:
            await s.open()
        cols = await conn.fetch(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = $1 AND table_name = 'results' ORDER BY ordinal_position",
            pg_schema,
        )
        assert [(c["column_name"], c["data_type"]) for c in cols] == [
            ("key", "text"), ("custom_id", "text"), ("status", "text"), ("output", "text"),
            ("model", "text"), ("input_tokens", "integer"), ("output_tokens", "integer"),
            ("cost_usd", "double precision"), ("batch_id", "text"), ("attempt", "integer"),
            ("updated_at", "timestamp with time zone"), ("output_json", "jsonb"),
            ("message", "jsonb"),
        ]

    async def test_replayed_group_leaves_the_same_table(
        self, pg_dsn: str, pg_schema: str, conn: asyncpg.Connection, context: PluginContext
    ) -> None:
        """Writing a group twice leaves an identical table, updated_at included."""
        table = f"{pg_schema}.results"
        async with PostgresSink({"dsn": pg_dsn, "table": table}, context) as sink:
            await sink.open()
            await put_in_chunks(sink, "b1", rows(0, 2_000))
            await sink.flush("b1")
            first = await snapshot(conn, table)
            await put_in_chunks(sink, "b1", rows(0, 2_000))
            await sink.flush("b1")
            second = await snapshot(conn, table)
        assert len(first) == 2_000
        assert first == second
        assert first[1][:4] == ("1", "c1", "succeeded", "label1")

    async def test_partial_then_full_group_is_exact(
        self, pg_dsn: str, pg_schema: str, conn: asyncpg.Connection, context: PluginContext
    ) -> None:
        """A committed partial group followed by the full replay gives each key once, updated."""
        table = f"{pg_schema}.results"
        async with PostgresSink({"dsn": pg_dsn, "table": table}, context) as sink:
            await sink.open()
            await sink.put("b1", rows(0, 300, output="old"))
            await sink.flush("b1")
            await sink.put("b1", rows(0, 1_000))
            await sink.put("b1", rows(999, 1_000, output="last"))
            await sink.flush("b1")
        got = await conn.fetch(f"SELECT key, output FROM {table}")
        outputs = {r["key"]: r["output"] for r in got}
        assert len(got) == 1_000
        assert outputs["5"] == "label5"
        assert outputs["999"] == "last999"

    async def test_unflushed_group_is_invisible(
        self, pg_dsn: str, pg_schema: str, conn: asyncpg.Connection, context: PluginContext
    ) -> None:
        """Rows put but never flushed (a crash) leave no trace."""
        table = f"{pg_schema}.results"
        async with PostgresSink({"dsn": pg_dsn, "table": table}, context) as sink:
            await sink.open()
            await sink.put("b1", rows(0, 100))
        assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 0

    async def test_message_and_nul_bytes_are_stored(
        self, pg_dsn: str, pg_schema: str, conn: asyncpg.Connection, context: PluginContext
    ) -> None:
        """The message lands as JSONB; NUL characters PostgreSQL cannot hold become U+FFFD."""
        table = f"{pg_schema}.results"
        row = rows(0, 1, message={"content": [{"type": "text", "text": "a\x00b"}]})[0]
        row.output = "a\x00b"
        async with PostgresSink({"dsn": pg_dsn, "table": table, "message": True}, context) as s:
            await s.open()
            await s.put("b1", [row])
            await s.flush("b1")
        got = await conn.fetchrow(f"SELECT output, message->'content'->0->>'text' AS t "
                                  f"FROM {table}")
        assert tuple(got) == ("a\ufffdb", "a\ufffdb")

    async def test_dead_letter_kind(
        self, pg_dsn: str, pg_schema: str, conn: asyncpg.Connection, context: PluginContext
    ) -> None:
        """kind = dead_letter writes error, attempts, history, request and source."""
        table = f"{pg_schema}.dead"
        row = ResultRow(key="7", custom_id="c7", status="dead_letter", pipeline="p",
                        error_type="invalid_request_error", error_message="bad", attempt=3,
                        history=[{"attempt": 1, "error_type": "overloaded_error"}],
                        request={"model": "m"}, source={"key": 7}, batch_id="msgbatch_9")
        opts = {"dsn": pg_dsn, "table": table, "kind": "dead_letter"}
        async with PostgresSink(opts, context) as sink:
            await sink.open()
            await sink.put("b9", [row])
            await sink.flush("b9")
        got = await conn.fetchrow(f"SELECT key, error_type, attempts, history->0->>'error_type' "
                                  f"AS h, source->>'key' AS s, batch_id FROM {table}")
        assert tuple(got) == ("7", "invalid_request_error", 3, "overloaded_error", "7",
                              "msgbatch_9")

    async def test_existing_table_without_columns_is_rejected(
        self, pg_dsn: str, pg_schema: str, conn: asyncpg.Connection, context: PluginContext
    ) -> None:
        """An existing table lacking documented columns fails open() naming them."""
        await conn.execute(f"CREATE TABLE {pg_schema}.r (key text PRIMARY KEY, output text)")
        sink = PostgresSink({"dsn": pg_dsn, "table": f"{pg_schema}.r"}, context)
        with pytest.raises(ConfigError, match="custom_id"):
            await sink.open()
        await sink.aclose()


async def make_user_table(conn: asyncpg.Connection, schema: str, count: int) -> str:
    """The operator's ``tickets`` table with ids 0..count-1 and no labels yet."""
    table = f"{schema}.tickets"
    await conn.execute(f"CREATE TABLE {table} (ticket_id bigint PRIMARY KEY, body text, "
                       f"category varchar(40), category_model text, cost numeric)")
    await conn.execute(f"INSERT INTO {table} SELECT g, 'b' FROM generate_series(0, $1::int) g",
                       count - 1)
    return table


def update_options(dsn: str, table: str, **extra: Any) -> dict[str, Any]:
    """Update mode writing output, model and cost back by ticket_id."""
    return {"dsn": dsn, "mode": "update", "table": table, "key": "ticket_id",
            "set": {"category": "output", "category_model": "model", "cost": "cost_usd"},
            **extra}


@pytest.mark.anyio
class TestUpdateMode:
    async def test_writes_back_and_counts_missing_keys(
        self, pg_dsn: str, pg_schema: str, conn: asyncpg.Connection, context: PluginContext
    ) -> None:
        """Matching rows get their columns set; unknown keys are counted and logged."""
        table = await make_user_table(conn, pg_schema, 100)
        with structlog.testing.capture_logs() as logs:
            async with PostgresSink(update_options(pg_dsn, table), context) as sink:
                await sink.open()
                await put_in_chunks(sink, "b1", rows(0, 103), size=40)
                await sink.flush("b1")
        got = await conn.fetch(f"SELECT * FROM {table} ORDER BY ticket_id")
        assert [r["category"] for r in got] == [f"label{i}" for i in range(100)]
        assert got[7]["category_model"] == "claude-haiku-4-5"
        assert str(got[7]["cost"]) == "0.007"
        assert sink.missing_keys == 3
        warning = next(e for e in logs if e["event"].startswith("postgres sink: keys matched"))
        assert warning["missing"] == 3 and warning["sample"] == ["100", "101", "102"]

    async def test_replay_is_idempotent_and_explicit_key_type_works(
        self, pg_dsn: str, pg_schema: str, conn: asyncpg.Connection, context: PluginContext
    ) -> None:
        """The same group twice gives the same table; key_type overrides the looked-up type."""
        table = await make_user_table(conn, pg_schema, 50)
        async with PostgresSink(update_options(pg_dsn, table, key_type="bigint"), context) as s:
            await s.open()
            for _ in range(2):
                await s.put("b1", rows(0, 50))
                await s.flush("b1")
                snap = [tuple(r) for r in await conn.fetch(f"SELECT * FROM {table} ORDER BY 1")]
        assert s.missing_keys == 0
        assert snap[49][2] == "label49"

    async def test_unknown_target_column_fails_open(
        self, pg_dsn: str, pg_schema: str, conn: asyncpg.Connection, context: PluginContext
    ) -> None:
        """A ``set`` column the table lacks is a ConfigError at open naming it."""
        table = await make_user_table(conn, pg_schema, 1)
        opts = {**update_options(pg_dsn, table), "set": {"label": "output"}}
        sink = PostgresSink(opts, context)
        with pytest.raises(ConfigError, match="label"):
            await sink.open()
        await sink.aclose()

    @pytest.mark.parametrize("key_type", ["bigint OR TRUE", "nosuchtype"])
    async def test_key_type_must_be_a_known_type(
        self, key_type: str, pg_dsn: str, pg_schema: str, conn: asyncpg.Connection,
        context: PluginContext,
    ) -> None:
        """A key_type the database cannot parse as a type fails open, touching no row."""
        table = await make_user_table(conn, pg_schema, 5)
        sink = PostgresSink(update_options(pg_dsn, table, key_type=key_type), context)
        with pytest.raises(ConfigError, match="'key_type'"):
            await sink.open()
        await sink.aclose()
        assert await conn.fetchval(f"SELECT count(category) FROM {table}") == 0

    @pytest.mark.parametrize(
        ("change", "option"),
        [
            ({"set": {"category": "body"}}, "set.category"),
            ({"set": {"bad col": "output"}}, "set.bad col"),
            ({"set": {}}, "set: must be a table like"),
            ({"key": "id;--"}, "key: must be a column name"),
            ({"table": "x y"}, "table: must be a table name"),
            ({"key_type": "int; drop"}, "key_type: must be a type name"),
            ({"message": True}, "message: applies only to mode = 'results'"),
            ({"mode": "merge"}, "mode: must be one of results, update, got 'merge'"),
        ],
    )
    async def test_bad_options_name_the_option(
        self, change: dict[str, Any], option: str, context: PluginContext
    ) -> None:
        """Each invalid option raises ConfigError naming it, before any I/O."""
        opts = {**update_options("postgresql://x@127.0.0.1:1/db", "tickets"), **change}
        with pytest.raises(ConfigError, match=option):
            PostgresSink(opts, context)


@pytest.mark.anyio
class TestConnectionLoss:
    async def test_killed_mid_group_then_replayed_is_exact(
        self, pg_dsn: str, pg_schema: str, conn: asyncpg.Connection, context: PluginContext
    ) -> None:
        """A backend killed mid-group makes flush raise RetriableError; the replay is exact."""
        table = f"{pg_schema}.results"
        app = f"batchd:{context.pipeline}:sink"
        group = rows(0, 5_000)
        async with PostgresSink({"dsn": pg_dsn, "table": table}, context) as sink:
            await sink.open()
            await sink.put("b1", group[:1_000])
            await sink.put("b1", group[1_000:2_000])
            assert await terminate_backends(conn, app) == 1
            await put_in_chunks(sink, "b1", group[2_000:])
            with pytest.raises(RetriableError, match="put again"):
                await sink.flush("b1")
            assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 0
            with pytest.raises(RetriableError, match="put its rows again"):
                await sink.flush("b1")
            await put_in_chunks(sink, "b1", group)
            await sink.flush("b1")
        got = await conn.fetch(f"SELECT key, output FROM {table} ORDER BY key::int")
        assert [(r["key"], r["output"]) for r in got] == [(str(i), f"label{i}")
                                                          for i in range(5_000)]

    async def test_killed_before_commit_then_replayed_is_exact(
        self, pg_dsn: str, pg_schema: str, conn: asyncpg.Connection, context: PluginContext
    ) -> None:
        """A backend killed between the last put and flush: RetriableError, then exact replay."""
        table = await make_user_table(conn, pg_schema, 1_000)
        app = f"batchd:{context.pipeline}:sink"
        async with PostgresSink(update_options(pg_dsn, table), context) as sink:
            await sink.open()
            await put_in_chunks(sink, "b1", rows(0, 1_000))
            assert await terminate_backends(conn, app) == 1
            with pytest.raises(RetriableError, match="lost connection"):
                await sink.flush("b1")
            assert await conn.fetchval(f"SELECT count(category) FROM {table}") == 0
            await put_in_chunks(sink, "b1", rows(0, 1_000))
            await sink.flush("b1")
        labels = [r[0] for r in await conn.fetch(f"SELECT category FROM {table} ORDER BY 1")]
        assert sorted(labels) == sorted(f"label{i}" for i in range(1_000))
        assert sink.missing_keys == 0

    async def test_idle_connection_killed_between_groups_is_replaced(
        self, pg_dsn: str, pg_schema: str, conn: asyncpg.Connection, context: PluginContext
    ) -> None:
        """A connection killed while idle is replaced silently when the next group starts."""
        table = f"{pg_schema}.results"
        app = f"batchd:{context.pipeline}:sink"
        async with PostgresSink({"dsn": pg_dsn, "table": table}, context) as sink:
            await sink.open()
            await sink.put("b1", rows(0, 10))
            await sink.flush("b1")
            assert await terminate_backends(conn, app) == 1
            await sink.put("b2", rows(10, 20))
            await sink.flush("b2")
        assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 20


@pytest.mark.anyio
class TestSecrets:
    async def test_password_never_in_errors_or_logs(
        self, pg_schema: str, context: PluginContext, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A DSN's password appears in no exception text, traceback or log event."""
        secret = "s3cr3t-Pa55word"
        dsn = f"postgresql://postgres:{secret}@127.0.0.1:1/test"
        opts = {"dsn": dsn, "table": f"{pg_schema}.r", "connect_attempts": 2}
        with structlog.testing.capture_logs() as logs:
            sink = PostgresSink(opts, context)
            with pytest.raises(RetriableError) as caught:
                await sink.open()
            await sink.aclose()
        text = "".join(traceback.format_exception(caught.value))
        assert "127.0.0.1:1" in str(caught.value)
        assert secret not in text
        assert logs and secret not in repr(logs)
        out = capsys.readouterr()
        assert secret not in out.out + out.err

    def test_redact_covers_urls_and_keywords(self) -> None:
        """redact() hides URL passwords and password= values, and the DSN's own password."""
        assert redact("postgresql://u:pw@h/db") == "postgresql://u:***@h/db"
        assert redact("host=h password='a b' user=u") == "host=h password=*** user=u"
        assert redact("failed: hunter2!", "postgresql://u:hunter2!@h/db") == "failed: ***"

    def test_registered_as_postgres(self) -> None:
        """The plugin manager resolves sink type ``postgres`` to this sink."""
        assert sink_factory("postgres") is PostgresSink
