"""The cluster schema: created, upgraded, and refused when newer than the code."""

from __future__ import annotations

from collections import Counter

import asyncpg
import pytest

from batchd.daemon.cluster.errors import SchemaVersionError
from batchd.daemon.cluster.migrations import LATEST_VERSION, check, migrate, version
from batchd.daemon.cluster.schema import MIGRATIONS, Migration, Sql
from batchd.daemon.wal.manifest_state import ChunkState, PipelineState
from batchd.plugins.errors import ConfigError

TABLES = {"worker", "pipeline", "shard", "chunk", "chunk_range", "event", "key_ledger",
          "spool_block", "create_slot", "limit_counter", "limit_hold", "schema_version",
          "chunk_number", "pipeline_config", "shard_reader", "key_list", "retry_request"}


async def columns(conn: asyncpg.Connection, schema: str, table: str) -> set[str]:
    rows = await conn.fetch(
        "SELECT column_name FROM information_schema.columns"
        " WHERE table_schema = $1 AND table_name = $2", schema, table,
    )
    return {r["column_name"] for r in rows}


@pytest.mark.anyio
class TestMigrate:
    async def test_creates_every_table_in_the_configured_schema(
        self, conn: asyncpg.Connection, pg_schema: str
    ) -> None:
        """migrate() creates the schema's tables and records the latest version."""
        sql = Sql(pg_schema)
        assert await version(conn, sql) is None
        assert await migrate(conn, sql) == (None, LATEST_VERSION)
        rows = await conn.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = $1", pg_schema
        )
        assert {r["table_name"] for r in rows} == TABLES
        assert await check(conn, sql) == LATEST_VERSION

    async def test_creates_a_missing_schema(self, conn: asyncpg.Connection, pg_schema: str) -> None:
        """A schema that does not exist yet is created (batchd cluster init on a fresh DB)."""
        await conn.execute(f'DROP SCHEMA "{pg_schema}"')
        await migrate(conn, Sql(pg_schema))
        assert await check(conn, Sql(pg_schema)) == LATEST_VERSION

    async def test_rows_hold_every_replay_field(
        self, conn: asyncpg.Connection, pg_schema: str
    ) -> None:
        """Chunk and pipeline rows have a column for every ChunkState/PipelineState field."""
        await migrate(conn, Sql(pg_schema))
        assert {f for f in ChunkState.__dataclass_fields__} <= await columns(
            conn, pg_schema, "chunk")
        assert {f for f in PipelineState.__dataclass_fields__} <= await columns(
            conn, pg_schema, "pipeline")

    async def test_is_idempotent(self, conn: asyncpg.Connection, pg_schema: str) -> None:
        """A second init changes nothing."""
        sql = Sql(pg_schema)
        await migrate(conn, sql)
        assert await migrate(conn, sql) == (LATEST_VERSION, LATEST_VERSION)

    async def test_upgrades_an_older_schema(self, conn: asyncpg.Connection, pg_schema: str) -> None:
        """A schema at version N gets exactly the migrations after N."""
        sql = Sql(pg_schema)
        await migrate(conn, sql)
        extra = Migration(LATEST_VERSION + 1, "test column",
                          ("ALTER TABLE {s}.worker ADD COLUMN note text",))
        with pytest.raises(SchemaVersionError, match=f"needs version {LATEST_VERSION + 1}"):
            await check(conn, sql, known=LATEST_VERSION + 1)
        assert await migrate(conn, sql, migrations=(*MIGRATIONS, extra)) == (
            LATEST_VERSION, LATEST_VERSION + 1)
        assert "note" in await columns(conn, pg_schema, "worker")

    async def test_version_6_lists_the_keys_a_version_5_ledger_holds(
        self, conn: asyncpg.Connection, pg_schema: str
    ) -> None:
        """
        An upgraded ledger's keys are listed by chunk (retention finds them there), in
        lists of at most 10,000, its (chunk) index is gone and keys compare bytewise.
        """
        sql = Sql(pg_schema)
        await migrate(conn, sql, migrations=MIGRATIONS[:5])
        await conn.execute(sql(
            "INSERT INTO {s}.key_ledger (pipeline, key, shard, chunk, position)"
            " SELECT 'p', 'k' || i, 's', 'p-' || (i % 2), 'null' FROM generate_series(1, 25000) i"))
        await conn.execute(sql(
            "INSERT INTO {s}.key_ledger VALUES ('q', 'k1', 's', 'q-0', 'null')"))
        assert await migrate(conn, sql) == (5, LATEST_VERSION)
        lists = await conn.fetch(sql(
            "SELECT pipeline, chunk, n, cardinality(keys) AS c FROM {s}.key_list"))
        assert all(r["n"] == r["c"] <= 10000 for r in lists), lists
        per_chunk: Counter[tuple[str, str]] = Counter()
        for r in lists:
            per_chunk[r["pipeline"], r["chunk"]] += r["n"]
        assert per_chunk == {("p", "p-0"): 12500, ("p", "p-1"): 12500, ("q", "q-0"): 1}
        listed = await conn.fetchval(sql(
            "SELECT count(DISTINCT (l.pipeline, k)) FROM {s}.key_list l, unnest(l.keys) k"))
        assert listed == 25001
        assert await conn.fetchval(
            "SELECT count(*) FROM pg_indexes WHERE schemaname = $1 AND indexname = $2",
            pg_schema, "key_ledger_chunk") == 0
        assert await conn.fetchval(
            "SELECT collation_name FROM information_schema.columns WHERE table_schema = $1"
            " AND table_name = 'key_ledger' AND column_name = 'key'", pg_schema) == "C"

    async def test_refuses_a_newer_schema_naming_both_versions(
        self, conn: asyncpg.Connection, pg_schema: str
    ) -> None:
        """Code older than the schema neither migrates nor runs; the message names both."""
        sql = Sql(pg_schema)
        await migrate(conn, sql)
        await conn.execute(f'INSERT INTO "{pg_schema}".schema_version VALUES (99, \'future\')')
        want = f"version 99, newer than this batchd knows \\(version {LATEST_VERSION}\\)"
        with pytest.raises(SchemaVersionError, match=want):
            await migrate(conn, sql)
        with pytest.raises(SchemaVersionError, match=want):
            await check(conn, sql)

    async def test_check_refuses_an_uninitialised_schema(
        self, conn: asyncpg.Connection, pg_schema: str
    ) -> None:
        """A worker pointed at an empty schema is told to run batchd cluster init."""
        with pytest.raises(SchemaVersionError, match="run: batchd cluster init"):
            await check(conn, Sql(pg_schema))

    async def test_concurrent_inits_apply_each_migration_once(
        self, pg_dsn: str, pg_schema: str
    ) -> None:
        """Three workers initialising at once: one applies, the others see it done."""
        import asyncio

        conns = [await asyncpg.connect(pg_dsn) for _ in range(3)]
        try:
            results = await asyncio.gather(*(migrate(c, Sql(pg_schema)) for c in conns))
            assert sorted(r[0] is None for r in results) == [False, False, True]
            count = await conns[0].fetchval(f'SELECT count(*) FROM "{pg_schema}".schema_version')
            assert count == len(MIGRATIONS)
        finally:
            for c in conns:
                await c.close()


class TestSchemaName:
    @pytest.mark.parametrize("bad", ["", "Batchd", "a-b", 'x"; DROP', "1abc", "a" * 64])
    def test_rejects_a_name_that_is_not_a_plain_identifier(self, bad: str) -> None:
        """The schema name is interpolated into SQL, so anything odd is a config error."""
        with pytest.raises(ConfigError, match="cluster schema"):
            Sql(bad)

    def test_qualifies_statements(self) -> None:
        """{s} becomes the quoted schema."""
        assert Sql("batchd")("SELECT * FROM {s}.chunk") == 'SELECT * FROM "batchd".chunk'
