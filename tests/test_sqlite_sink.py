"""The sqlite sink: documented schema, idempotent upserts, message column, dead-letter kind."""

from __future__ import annotations

import re
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

import orjson
import pytest

from batchd.plugins.contract import PluginContext
from batchd.plugins.errors import ConfigError, FatalError, RetriableError
from batchd.plugins.records import ResultRow
from batchd.plugins.sinks.sqlite import SqliteSink

DOC = Path(__file__).resolve().parents[1] / "docs" / "sinks.md"


def _context(directory: Path) -> PluginContext:
    return PluginContext(pipeline="t", state_dir=directory, config_dir=directory)


def _rows(n: int, output: str = "answer", status: str = "succeeded") -> list[ResultRow]:
    return [
        ResultRow(
            key=f"k{i}",
            custom_id=f"c{i}",
            status=status,
            pipeline="t",
            output=f"{output} {i}",
            model="claude-haiku-4-5",
            input_tokens=10 + i,
            output_tokens=i,
            cost_usd=0.5 * i,
            batch_id="msgbatch_1",
            attempt=2,
            message={"id": f"msg_{i}", "content": [{"type": "text", "text": "x"}]},
            error_type="overloaded_error",
            error_message="retries exhausted",
            history=[{"attempt": 1}, {"attempt": 2}],
            request={"max_tokens": 5},
            source={"line": i + 2},
        )
        for i in range(n)
    ]


def _sink(directory: Path, **options: Any) -> SqliteSink:
    return SqliteSink({"path": "db/out.db", **options}, _context(directory))


def _table(directory: Path, sql: str) -> list[tuple[Any, ...]]:
    with closing(sqlite3.connect(directory / "db" / "out.db")) as db:
        return db.execute(sql).fetchall()


async def _write(sink: SqliteSink, group: str, rows: list[ResultRow]) -> None:
    async with sink:
        await sink.open()
        for start in range(0, len(rows), 3):
            await sink.put(group, rows[start : start + 3])
        await sink.flush(group)


def _documented_columns(marker: str) -> list[tuple[str, str]]:
    text = DOC.read_text()
    block = text.split(f"<!-- schema:{marker} -->", 1)[1].split("```sql", 1)[1].split("```", 1)[0]
    found = re.findall(r"^\s{4}(\w+)\s+(TEXT PRIMARY KEY|TEXT|INTEGER|REAL)", block, re.M)
    return [(name, decl) for name, decl in found]


def _actual_columns(directory: Path, table: str) -> list[tuple[str, str]]:
    info = _table(directory, f'PRAGMA table_info("{table}")')
    return [(name, f"{kind} PRIMARY KEY" if pk else kind) for _, name, kind, _, _, pk in info]


@pytest.mark.anyio
class TestResults:
    async def test_schema_matches_the_doc(self, tmp_path: Path) -> None:
        """The table the sink creates is exactly the one docs/sinks.md documents."""
        await _write(_sink(tmp_path), "g", _rows(1))
        documented = _documented_columns("results")
        assert len(documented) == 12
        assert _actual_columns(tmp_path, "results") == documented

    async def test_rows_land_as_documented(self, tmp_path: Path) -> None:
        """Each row's fields land in their columns; updated_at is ISO 8601 UTC."""
        await _write(_sink(tmp_path), "g", _rows(2))
        got = _table(tmp_path, "SELECT * FROM results ORDER BY key")
        assert [row[:10] for row in got] == [
            ("k0", "c0", "succeeded", "answer 0", "claude-haiku-4-5", 10, 0, 0.0, "msgbatch_1", 2),
            ("k1", "c1", "succeeded", "answer 1", "claude-haiku-4-5", 11, 1, 0.5, "msgbatch_1", 2),
        ]
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}\+00:00", got[0][10])

    async def test_replaying_a_group_is_idempotent(self, tmp_path: Path) -> None:
        """The same group written twice (a crash replay) leaves the same table."""
        await _write(_sink(tmp_path), "g-1", _rows(10))
        first = _table(tmp_path, "SELECT * FROM results ORDER BY key")
        await _write(_sink(tmp_path), "g-1", _rows(10))
        second = _table(tmp_path, "SELECT * FROM results ORDER BY key")
        assert [row[:10] for row in second] == [row[:10] for row in first]
        assert len(second) == 10

    async def test_upsert_replaces_values(self, tmp_path: Path) -> None:
        """A later write of a key updates its row instead of adding one."""
        await _write(_sink(tmp_path), "g-1", _rows(3, output="old"))
        await _write(_sink(tmp_path), "g-2", _rows(2, output="new"))
        assert _table(tmp_path, "SELECT key, output FROM results ORDER BY key") == [
            ("k0", "new 0"),
            ("k1", "new 1"),
            ("k2", "old 2"),
        ]

    async def test_unflushed_rows_are_not_committed(self, tmp_path: Path) -> None:
        """Rows put but never flushed are rolled back at close: the group will be replayed."""
        async with _sink(tmp_path) as sink:
            await sink.open()
            await sink.put("g-1", _rows(4))
        assert _table(tmp_path, "SELECT count(*) FROM results") == [(0,)]

    async def test_message_column(self, tmp_path: Path) -> None:
        """``message = true`` adds a message column (also to an existing table) holding JSON."""
        await _write(_sink(tmp_path), "g-0", _rows(1))
        await _write(_sink(tmp_path, message=True), "g-1", _rows(2))
        columns = _actual_columns(tmp_path, "results")
        assert columns[-1] == ("message", "TEXT")
        stored = _table(tmp_path, "SELECT message FROM results ORDER BY key")
        assert [orjson.loads(m) for (m,) in stored] == [r.message for r in _rows(2)]

    async def test_wal_and_full_sync(self, tmp_path: Path) -> None:
        """The database is in WAL mode by default; journal_mode can be changed."""
        await _write(_sink(tmp_path), "g", _rows(1))
        assert _table(tmp_path, "PRAGMA journal_mode") == [("wal",)]
        await _write(_sink(tmp_path, journal_mode="delete", table="other"), "g", _rows(1))
        assert _table(tmp_path, "PRAGMA journal_mode") == [("delete",)]

    async def test_existing_table_without_columns_is_refused(self, tmp_path: Path) -> None:
        """An unrelated table of the same name is an error naming the missing columns."""
        (tmp_path / "db").mkdir()
        with closing(sqlite3.connect(tmp_path / "db" / "out.db")) as db:
            db.execute("CREATE TABLE results (key TEXT PRIMARY KEY, body TEXT)")
        sink = _sink(tmp_path)
        with pytest.raises(FatalError, match="lacks columns custom_id, status"):
            await sink.open()
        await sink.aclose()

    async def test_flush_never_reports_rolled_back_rows(self, tmp_path: Path) -> None:
        """When the disk fills mid-transaction, a flush either commits a group or raises."""
        sink = _sink(tmp_path)
        await sink.open()
        await sink.put("small", _rows(3))
        assert sink._db is not None  # white-box: make this connection's database "full"
        pages = sink._db.execute("PRAGMA page_count").fetchone()[0]
        sink._db.execute(f"PRAGMA max_page_count = {pages + 2}")
        with pytest.raises(RetriableError, match="full"):
            await sink.put("big", _rows(200, output="x" * 4000))
        try:
            await sink.flush("small")
        except RetriableError as exc:
            assert "replay the group" in str(exc)
        else:
            assert _table(tmp_path, "SELECT count(*) FROM results") == [(3,)]
        await sink.aclose()


@pytest.mark.anyio
class TestDeadLetter:
    async def test_dead_letter_kind(self, tmp_path: Path) -> None:
        """``kind = "dead_letter"`` makes the documented dead-letter table with JSON columns."""
        rows = _rows(2, status="dead_letter")
        await _write(_sink(tmp_path, kind="dead_letter"), "g", rows)
        assert _actual_columns(tmp_path, "dead_letter") == _documented_columns("dead_letter")
        got = _table(tmp_path, "SELECT * FROM dead_letter ORDER BY key")
        assert got[1][:5] == ("k1", "c1", "overloaded_error", "retries exhausted", 2)
        assert orjson.loads(got[1][5]) == [{"attempt": 1}, {"attempt": 2}]
        assert orjson.loads(got[1][6]) == {"max_tokens": 5}
        assert orjson.loads(got[1][7]) == {"line": 3}


class TestOptions:
    @pytest.mark.parametrize(
        ("options", "message"),
        [
            ({"table": "results; DROP"}, "sqlite sink: table: must be a plain identifier"),
            ({"table": "9lives"}, "table: must be a plain identifier"),
            ({"kind": "both"}, "kind: must be one of results, dead_letter, got 'both'"),
            ({"message": "yes"}, "message: must be true or false, got 'yes'"),
            ({"kind": "dead_letter", "message": True}, "message: applies to kind 'results' only"),
            ({"journal_mode": "memory"}, "journal_mode: must be one of wal, delete"),
            ({"tabel": "x"},
             r"tabel: unknown option \(did you mean 'table'\?\); valid options: journal_mode, "
             "kind"),
        ],
    )
    def test_bad_options(self, tmp_path: Path, options: dict[str, Any], message: str) -> None:
        """Bad options are refused when the sink is built, naming the key."""
        with pytest.raises(ConfigError, match=message):
            _sink(tmp_path, **options)

    def test_missing_path(self, tmp_path: Path) -> None:
        """``path`` is required and nothing is created before open()."""
        with pytest.raises(ConfigError, match="sqlite sink: path: is required"):
            SqliteSink({}, _context(tmp_path))
        _sink(tmp_path)
        assert not (tmp_path / "db").exists()
