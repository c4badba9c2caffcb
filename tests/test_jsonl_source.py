"""The jsonl source: records, byte-offset resume, bad lines and clear errors."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from batchd.connectors.jsonl_source import JsonlSource
from batchd.plugins.contract import PluginContext
from batchd.plugins.errors import ConfigError, FatalError
from batchd.plugins.records import Record


def _context(directory: Path) -> PluginContext:
    # Read to the end as ``--until-drained`` does: a last line without a newline counts.
    return PluginContext(pipeline="t", state_dir=directory, config_dir=directory,
                         until_drained=True)


async def _read(
    directory: Path, resume: dict[str, Any] | None = None, **options: Any
) -> list[Record]:
    options = {"path": "items.jsonl", "key": "id", **options}
    path = directory / options["path"]
    if path.exists():  # it has stopped growing: a last line without newline is whole
        old = time.time() - 60
        os.utime(path, (old, old))
    out: list[Record] = []
    async with JsonlSource(options, _context(directory)) as source:
        await source.start(resume)
        while (batch := await source.poll()) is not None:
            assert 0 < len(batch) <= source.max_records
            out.extend(batch)
    return out


@pytest.mark.anyio
class TestReading:
    async def test_objects_become_records(self, tmp_path: Path) -> None:
        """Each object line is a record; numeric keys become strings; blank lines are skipped."""
        (tmp_path / "items.jsonl").write_bytes(
            b'\xef\xbb\xbf{"id": "a/b c", "body": "x"}\n\n{"id": 7, "body": "y", "n": [1]}'
        )
        records = await _read(tmp_path)
        assert [(r.key, r.fields, r.error) for r in records] == [
            ("a/b c", {"id": "a/b c", "body": "x"}, None),
            ("7", {"id": 7, "body": "y", "n": [1]}, None),
        ]
        assert [r.position["line"] for r in records] == [1, 3]
        assert records[-1].position["offset"] == (tmp_path / "items.jsonl").stat().st_size

    async def test_fields_selects_keys(self, tmp_path: Path) -> None:
        """``fields`` keeps only the listed keys that are present."""
        (tmp_path / "items.jsonl").write_text('{"id": 1, "a": 1, "b": 2}\n')
        records = await _read(tmp_path, fields=["b", "zzz"])
        assert records[0].fields == {"b": 2}

    async def test_batches_then_drained(self, tmp_path: Path) -> None:
        """``poll`` returns at most ``batch`` records, then ``None``."""
        (tmp_path / "items.jsonl").write_text("".join(f'{{"id": {i}}}\n' for i in range(7)))
        records = await _read(tmp_path, batch=3)
        assert [r.key for r in records] == [str(i) for i in range(7)]

    async def test_resume_gives_exactly_the_rest(self, tmp_path: Path) -> None:
        """Resuming from any record's position yields exactly the records after it."""
        lines = [f'{{"id": {i}, "t": "{"é" * i}"}}' for i in range(6)]
        (tmp_path / "items.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        everything = await _read(tmp_path)
        for split in range(1, len(everything) + 1):
            after = await _read(tmp_path, everything[split - 1].position)
            assert everything[:split] + after == everything


@pytest.mark.anyio
class TestBadLines:
    @pytest.mark.parametrize(
        ("line", "reason"),
        [
            (b"{not json", "not valid JSON"),
            (b"[1, 2]", "expected a JSON object, got list"),
            (b'{"body": "x"}', "key field 'id' is missing or null"),
            (b'{"id": null}', "key field 'id' is missing or null"),
            (b'{"id": {"a": 1}}', "key field 'id' must be a string or number"),
            (b'{"id": ""}', "key field 'id' is empty"),
            (b'{"id": "\xff"}', "not valid JSON"),
        ],
    )
    async def test_bad_line_is_an_error_record(
        self, tmp_path: Path, line: bytes, reason: str
    ) -> None:
        """A bad line becomes an error record naming file and line; the next line is fine."""
        (tmp_path / "items.jsonl").write_bytes(b'{"id": 1}\n' + line + b'\n{"id": 2}\n')
        records = await _read(tmp_path)
        assert [r.key for r in records] == ["1", "line-2", "2"]
        assert records[1].error is not None
        assert records[1].error.startswith("items.jsonl line 2: ")
        assert reason in records[1].error
        assert records[1].fields == {}

    async def test_overlong_line_is_skipped(self, tmp_path: Path) -> None:
        """A line over max_line_bytes is one bad record (under its key, read before the long
        member) and the following line parses."""
        big = b'{"id": 9, "t": "' + b"x" * 5000 + b'"}'
        (tmp_path / "items.jsonl").write_bytes(big + b'\n{"id": 2}\n')
        records = await _read(tmp_path, max_line_bytes=1000)
        assert [r.key for r in records] == ["9", "2"]
        assert records[0].error == "items.jsonl line 1: line longer than max_line_bytes (1000)"
        assert records[1].position == {"line": 2, "offset": len(big) + 11}


    @pytest.mark.parametrize(
        ("line", "key"),
        [
            (b'{"id": "a-1", "body": "bad \x00 byte"}', "a-1"),  # NUL outside the key
            (b'{"id": "a\x002", "body": "x"}', "line-1"),  # NUL in the key itself
            (b'{"meta": {"id": 1}, "id": 2, "body": "\x00"}', "line-1"),  # two "id"s
            (b'{"body": "no key", "x": \x00}', "line-1"),
        ],
    )
    async def test_unparseable_line_keeps_an_intact_key(
        self, tmp_path: Path, line: bytes, key: str
    ) -> None:
        """A line that is not valid JSON is keyed by its key member when that is intact."""
        (tmp_path / "items.jsonl").write_bytes(line + b"\n")
        (record,) = await _read(tmp_path)
        assert record.key == key and record.error is not None


@pytest.mark.anyio
class TestErrors:
    async def test_missing_file(self, tmp_path: Path) -> None:
        """A missing file is a FatalError naming the path, raised at start()."""
        with pytest.raises(FatalError, match=r"file not found: .*missing\.jsonl"):
            await _read(tmp_path, path="missing.jsonl")

    async def test_resume_beyond_end(self, tmp_path: Path) -> None:
        """A position past the end of a (replaced) file is a clear error."""
        (tmp_path / "items.jsonl").write_text('{"id": 1}\n')
        with pytest.raises(FatalError, match=r"cannot resume items\.jsonl at byte 50"):
            await _read(tmp_path, {"line": 3, "offset": 50})

    def test_unknown_option(self, tmp_path: Path) -> None:
        """An unknown option names the key and lists the valid ones."""
        message = r"jsonl source: dialect: unknown option; valid options: batch, fields"
        with pytest.raises(ConfigError, match=message):
            JsonlSource({"path": "a", "key": "id", "dialect": "x"}, _context(tmp_path))
