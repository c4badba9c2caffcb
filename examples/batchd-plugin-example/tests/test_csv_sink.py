"""The example-csv sink on a real directory: files per group, idempotent replays, options."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import batchd
import pytest

from batchd_plugin_example import CsvSink, normalise_label, register_sinks


def _context(tmp_path: Path) -> batchd.PluginContext:
    return batchd.PluginContext(pipeline="notes", state_dir=tmp_path, config_dir=tmp_path)


def _row(key: str, output: str = "billing") -> batchd.ResultRow:
    return batchd.ResultRow(
        key=key, custom_id=f"c-{key}", status="succeeded", pipeline="notes", output=output
    )


def _files(directory: Path) -> list[str]:
    """The directory's files, without the lock that keeps a second batchd out."""
    return sorted(p.name for p in directory.iterdir() if not p.name.startswith(".batchd-"))


def _read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


@pytest.mark.anyio
class TestCsvSink:
    async def test_flush_publishes_one_file_per_group(self, tmp_path: Path) -> None:
        """Rows appear in <group>.csv only after flush, with a header and no temp file left."""
        sink = CsvSink({"path": "out", "columns": ["key", "output"]}, _context(tmp_path))
        async with sink:
            await sink.open()
            await sink.put("notes-000001-a1", [_row("n1"), _row("n2", "bug")])
            assert not (tmp_path / "out" / "notes-000001-a1.csv").exists()
            await sink.flush("notes-000001-a1")
        assert _read(tmp_path / "out" / "notes-000001-a1.csv") == [
            {"key": "n1", "output": "billing"},
            {"key": "n2", "output": "bug"},
        ]
        assert _files(tmp_path / "out") == ["notes-000001-a1.csv"]

    async def test_replayed_group_is_written_once(self, tmp_path: Path) -> None:
        """A group put twice (a replay after a partial attempt) holds each key once."""
        sink = CsvSink({"path": "out", "columns": ["key"]}, _context(tmp_path))
        async with sink:
            await sink.open()
            await sink.put("g1", [_row("a"), _row("b")])
            await sink.put("g1", [_row("a"), _row("b"), _row("c"), _row("c")])
            await sink.flush("g1")
        async with CsvSink({"path": "out", "columns": ["key"]}, _context(tmp_path)) as again:
            await again.open()  # a restarted daemon replays the whole group
            await again.put("g1", [_row("a"), _row("b"), _row("c")])
            await again.flush("g1")
        assert [r["key"] for r in _read(tmp_path / "out" / "g1.csv")] == ["a", "b", "c"]

    async def test_unflushed_group_leaves_nothing(self, tmp_path: Path) -> None:
        """Closing before flush drops the temp file: the group was never committed."""
        sink = CsvSink({"path": "out"}, _context(tmp_path))
        async with sink:
            await sink.open()
            await sink.put("g1", [_row("a")])
        assert _files(tmp_path / "out") == []

    async def test_dead_letter_columns(self, tmp_path: Path) -> None:
        """Dead-letter rows keep their error type and message."""
        row = batchd.ResultRow(
            key="line-2", custom_id="", status="dead_letter", pipeline="notes",
            error_type="bad_record", error_message="n.txt line 2: no key",
        )  # fmt: skip
        columns = ["key", "status", "error_type", "error_message"]
        async with CsvSink({"path": "dead", "columns": columns}, _context(tmp_path)) as sink:
            await sink.open()
            await sink.put("g1", [row])
            await sink.flush("g1")
        assert _read(tmp_path / "dead" / "g1.csv") == [
            {"key": "line-2", "status": "dead_letter", "error_type": "bad_record",
             "error_message": "n.txt line 2: no key"},
        ]  # fmt: skip

    async def test_two_sinks_may_not_share_a_directory(self, tmp_path: Path) -> None:
        """Results and dead letters in one directory would overwrite each other: refused."""
        async with CsvSink({"path": "out"}, _context(tmp_path)) as first:
            await first.open()
            second = CsvSink({"path": "out"}, _context(tmp_path))
            with pytest.raises(batchd.ConfigError, match="is being written by another batchd"):
                await second.open()
            await second.aclose()
        async with CsvSink({"path": "out"}, _context(tmp_path)) as third:
            await third.open()  # free again once the first is closed

    async def test_unsafe_group_name_is_refused(self, tmp_path: Path) -> None:
        """A group name that could leave the directory stops the sink."""
        async with CsvSink({"path": "out"}, _context(tmp_path)) as sink:
            await sink.open()
            with pytest.raises(batchd.FatalError, match="not a safe file name"):
                await sink.put("../escape", [_row("a")])

    async def test_unwritable_directory_is_a_setup_error(self, tmp_path: Path) -> None:
        """A path that cannot be a directory is a ConfigError naming it (exit 2, one line)."""
        (tmp_path / "taken").write_text("a file, not a directory")
        async with CsvSink({"path": "taken/out"}, _context(tmp_path)) as sink:
            with pytest.raises(batchd.ConfigError, match=r"cannot create .*taken/out"):
                await sink.open()


class TestOptionsAndHooks:
    @pytest.mark.parametrize(
        ("options", "message"),
        [
            ({}, "example-csv sink: path: is required"),
            ({"path": "o", "column": ["key"]},
             r"column: unknown option \(did you mean 'columns'\?\)"),
            ({"path": "o", "columns": []}, "columns: must be a non-empty list"),
            ({"path": "o", "columns": ["key", "label"]}, "columns: 'label' is not one of key"),
            ({"path": "o", "columns": ["key", "key"]}, "columns: names 'key' twice"),
        ],
    )
    def test_bad_options_name_the_key(
        self, tmp_path: Path, options: dict[str, Any], message: str
    ) -> None:
        """Every option mistake is a ConfigError naming the key, before any I/O."""
        with pytest.raises(batchd.ConfigError, match=message):
            CsvSink(options, _context(tmp_path))

    def test_registers_its_type(self) -> None:
        """The hook offers the class under the type name a config uses."""
        found: dict[str, Any] = {}
        register_sinks(register=found.__setitem__)
        assert found == {"example-csv": CsvSink}

    @pytest.mark.parametrize(
        ("output", "expected"),
        [("billing.", "billing"), ("`bug`", "bug"), ("**other**", "other"),
         ("billing", None), ("It is billing.", None), ("...", None)],
    )  # fmt: skip
    def test_normalise_label(self, output: str, expected: str | None) -> None:
        """Only decorated one-word answers change; anything else is kept as it is."""
        assert normalise_label(output) == expected
