"""
``Source.size`` and ``probe`` of the built-in sources, against a real file, a real
PostgreSQL and a real Kafka-protocol broker; and the progress arithmetic built on it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import asyncpg
import pytest

from batchd.connectors.csv_source import CsvSource
from batchd.connectors.postgres_source import PostgresSource
from batchd.daemon.ops.progress import MonotonicFraction, progress_of
from batchd.plugins.contract import PluginContext, SourceSize
from batchd.plugins.errors import BatchdError
from examples.tickets.generate import write_tickets
from tests.fixtures.kafka import unique_name
from tests.test_kafka_source import make_source, read_until_drained, seed

pytestmark = pytest.mark.anyio


def _context(tmp_path: Path) -> PluginContext:
    return PluginContext(pipeline="tickets", state_dir=tmp_path, config_dir=tmp_path)


class TestProgressOf:
    def test_bytes_scale_rows_read_to_the_whole_file(self) -> None:
        size = SourceSize(total=1000, unit="bytes", done=250)
        got = progress_of(rows_read=30, rows_done=15, rows_pending=15, size=size)
        assert got == {"basis": "bytes", "rows_total": 120, "fraction": 0.125}

    def test_whole_file_read_is_exact(self) -> None:
        size = SourceSize(total=1000, unit="bytes", done=1000)
        assert progress_of(100, 100, 0, size)["rows_total"] == 100

    def test_rows_estimate_never_below_what_is_known(self) -> None:
        size = SourceSize(total=50, unit="rows")
        assert progress_of(80, 70, 10, size) == {"basis": "rows", "rows_total": 80,
                                                 "fraction": 0.875}

    def test_unknown_size_is_rows_read(self) -> None:
        assert progress_of(40, 10, 30, None) == {"basis": "rows read", "rows_total": 40,
                                                 "fraction": 0.25}

    def test_measured_earlier_keeps_its_pairing(self) -> None:
        """Size measured when 30 rows were read; 60 are read now: the scale stays 30:250."""
        size = SourceSize(total=1000, unit="bytes", done=250)
        assert progress_of(60, 20, 40, size, rows_at_size=30)["rows_total"] == 120

    def test_monotonic(self) -> None:
        shown = MonotonicFraction()
        assert [shown.update(f) for f in (0.1, 0.3, 0.28, 0.5)] == [0.1, 0.3, 0.3, 0.5]


class TestFileSize:
    async def test_csv_bytes_and_offset(self, tmp_path: Path) -> None:
        write_tickets(tmp_path / "t.csv", 50)
        source = CsvSource({"path": "t.csv", "key": "ticket_id"}, _context(tmp_path))
        total = (tmp_path / "t.csv").stat().st_size
        assert await source.size(None) == SourceSize(total, "bytes", 0)
        await source.start(None)
        records = await source.poll()
        assert records
        size = await source.size(records[9].position)
        assert size is not None and 0 < (size.done or 0) < total
        assert size.done == records[9].position["offset"]
        await source.aclose()

    async def test_missing_file_is_unknown(self, tmp_path: Path) -> None:
        source = CsvSource({"path": "nope.csv", "key": "id"}, _context(tmp_path))
        assert await source.size(None) is None


class TestPostgres:
    async def test_row_estimate_and_probe(self, pg_dsn: str, tmp_path: Path) -> None:
        table = f"size_{unique_name('t').replace('-', '_')}"
        conn = await asyncpg.connect(pg_dsn)
        try:
            await conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, body text)")
            await conn.execute(f"INSERT INTO {table} SELECT g, 'x' FROM generate_series(1, "
                               "5000) g")
            await conn.execute(f"ANALYZE {table}")
            options: dict[str, Any] = {"dsn": pg_dsn, "table": table, "key": "id"}
            source = PostgresSource(options, _context(tmp_path))
            size = await source.size(None)
            assert size is not None and size.unit == "rows" and size.done is None
            assert 4000 <= size.total <= 6000
            await source.probe()
            wrong = PostgresSource({**options, "key": "nope"}, _context(tmp_path))
            with pytest.raises(BatchdError, match="nope"):
                await wrong.probe()
        finally:
            await conn.execute(f"DROP TABLE IF EXISTS {table}")
            await conn.close()


class TestKafka:
    async def test_offsets_and_probe(self, kafka_bootstrap: str) -> None:
        """
        The test broker (tansu, in memory) answers ListOffsets with an end offset of 1
        per partition whatever it holds, so the figures are checked for shape and
        consistency here, not against the message count a real Kafka would give.
        """
        topic = unique_name("size")
        await seed(kafka_bootstrap, topic, 30, partitions=3)
        source = make_source(kafka_bootstrap, topic, unique_name("g"))
        size = await source.size(None)
        assert size is not None and size.unit == "messages" and size.done == 0
        assert size.total > 0
        await source.probe()
        await source.start(None)
        try:
            records = await read_until_drained(source)
        finally:
            await source.aclose()
        assert len(records) == 30
        after = await source.size(records[-1].position)
        assert after is not None and after.total == size.total
        assert 0 < (after.done or 0) <= after.total
        missing = make_source(kafka_bootstrap, unique_name("absent"), unique_name("g"))
        with pytest.raises(BatchdError, match="do not exist"):
            await missing.probe()
