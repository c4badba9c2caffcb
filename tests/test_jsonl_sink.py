"""The jsonl sink: atomic part files, idempotent replays, dead-letter lines."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import orjson
import pytest

from batchd.plugins.contract import PluginContext
from batchd.plugins.errors import ConfigError, FatalError
from batchd.plugins.manager import sink_factory
from batchd.plugins.records import ResultRow
from batchd.plugins.sinks.jsonl import JsonlSink


def _context(directory: Path) -> PluginContext:
    return PluginContext(pipeline="t", state_dir=directory, config_dir=directory)


def _rows(n: int, status: str = "succeeded") -> list[ResultRow]:
    return [
        ResultRow(
            key=f"key {i}/é",
            custom_id=f"c{i}",
            status=status,
            pipeline="t",
            output=f"answer {i}",
            model="claude-haiku-4-5",
            input_tokens=i,
            output_tokens=2 * i,
            batch_id="msgbatch_1",
            error_type="invalid_request_error" if status == "dead_letter" else None,
            error_message="bad" if status == "dead_letter" else None,
            source={"line": i + 2},
        )
        for i in range(n)
    ]


def _lines(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def parts(directory: Path) -> list[str]:
    """The files a reader sees (the hidden ``.batchd-<pipeline>.lock`` owner file aside)."""
    return sorted(p.name for p in directory.iterdir() if not p.name.startswith(".batchd-"))


def _sink(directory: Path, **options: Any) -> JsonlSink:
    return JsonlSink({"path": "out", **options}, _context(directory))


@pytest.mark.anyio
class TestPartFiles:
    async def test_part_file_appears_only_after_flush(self, tmp_path: Path) -> None:
        """Rows sit in a hidden temp file until flush renames it to <group>.jsonl."""
        rows = _rows(3)
        async with _sink(tmp_path) as sink:
            await sink.open()
            await sink.put("tickets-000001-a1", rows)
            assert not (tmp_path / "out" / "tickets-000001-a1.jsonl").exists()
            assert (tmp_path / "out" / ".tickets-000001-a1.jsonl.tmp").exists()
            await sink.flush("tickets-000001-a1")
        assert parts(tmp_path / "out") == ["tickets-000001-a1.jsonl"]
        assert _lines(tmp_path / "out" / "tickets-000001-a1.jsonl") == [r.to_dict() for r in rows]

    async def test_replay_after_crash_leaves_one_copy(self, tmp_path: Path) -> None:
        """A partial put, a 'crash' (new instance), then a full replay: each row exactly once."""
        rows = _rows(10)
        crashed = _sink(tmp_path)
        await crashed.open()
        await crashed.put("g-1", rows[:4])  # never flushed nor closed: the process died
        assert crashed._parts._lock_fd is not None
        os.close(crashed._parts._lock_fd)  # ... and the kernel dropped its directory lock
        async with _sink(tmp_path) as sink:
            await sink.open()
            await sink.put("g-1", rows[:5])
            await sink.put("g-1", rows[5:])
            await sink.flush("g-1")
        assert [line["key"] for line in _lines(tmp_path / "out" / "g-1.jsonl")] == [
            r.key for r in rows
        ]
        assert parts(tmp_path / "out") == ["g-1.jsonl"]

    async def test_replay_of_a_published_group_rewrites_it(self, tmp_path: Path) -> None:
        """Replaying a group that was already flushed replaces the part file whole."""
        async with _sink(tmp_path) as sink:
            await sink.open()
            await sink.put("g-1", _rows(5))
            await sink.flush("g-1")
            await sink.put("g-1", _rows(5))
            await sink.flush("g-1")
        assert len(_lines(tmp_path / "out" / "g-1.jsonl")) == 5

    async def test_in_process_replay_of_an_open_group_skips_written_keys(
        self, tmp_path: Path
    ) -> None:
        """Re-putting rows of a group still open does not duplicate them."""
        rows = _rows(6)
        async with _sink(tmp_path) as sink:
            await sink.open()
            await sink.put("g-1", rows[:3])
            await sink.put("g-1", rows)
            await sink.flush("g-1")
        assert [line["key"] for line in _lines(tmp_path / "out" / "g-1.jsonl")] == [
            r.key for r in rows
        ]

    async def test_close_without_flush_leaves_no_temp_file(self, tmp_path: Path) -> None:
        """aclose drops unpublished temp files: those groups were never committed."""
        async with _sink(tmp_path) as sink:
            await sink.open()
            await sink.put("g-2", _rows(2))
        assert parts(tmp_path / "out") == []

    async def test_fields_option_keeps_listed_keys(self, tmp_path: Path) -> None:
        """``fields`` keeps only the listed keys of each line, in that order."""
        async with _sink(tmp_path, fields=["output", "key", "message"]) as sink:
            await sink.open()
            await sink.put("g", _rows(1))
            await sink.flush("g")
        assert list(_lines(tmp_path / "out" / "g.jsonl")[0].items()) == [
            ("output", "answer 0"),
            ("key", "key 0/é"),
        ]

    @pytest.mark.parametrize("group", ["../evil", "a/b", ".hidden", "a\\b", "", "a..b"])
    async def test_unsafe_group_names_are_refused(self, tmp_path: Path, group: str) -> None:
        """Group names that could leave the directory are refused before any write."""
        async with _sink(tmp_path) as sink:
            await sink.open()
            with pytest.raises(FatalError, match="not a safe file name"):
                await sink.put(group, _rows(1))
        assert parts(tmp_path / "out") == []


@pytest.mark.anyio
class TestDeadLetter:
    async def test_dead_letter_type_writes_dead_letter_lines(self, tmp_path: Path) -> None:
        """The ``dead_letter`` type is the same sink and writes the dead-letter line shape."""
        factory = sink_factory("dead_letter")
        assert factory is JsonlSink
        rows = _rows(2, status="dead_letter")
        async with factory({"path": "dlq"}, _context(tmp_path)) as sink:
            await sink.open()
            await sink.put("g-9", rows)
            await sink.flush("g-9")
        lines = _lines(tmp_path / "dlq" / "g-9.jsonl")
        assert lines == [r.to_dict() for r in rows]
        assert set(lines[0]) == {
            "key", "custom_id", "pipeline", "error_type", "error_message",
            "attempts", "history", "request", "source", "batch_id",
        }  # fmt: skip


class TestOptions:
    def test_unknown_option(self, tmp_path: Path) -> None:
        """An unknown option names the key and lists the valid ones."""
        valid = r"valid options: fields, mode, path"
        with pytest.raises(ConfigError, match=r"jsonl sink: dir: unknown option; " + valid):
            JsonlSink({"path": "x", "dir": "x"}, _context(tmp_path))

    def test_missing_path(self, tmp_path: Path) -> None:
        """``path`` is required, and building the sink creates nothing."""
        with pytest.raises(ConfigError, match="jsonl sink: path: is required"):
            JsonlSink({}, _context(tmp_path))
        JsonlSink({"path": "later"}, _context(tmp_path))
        assert not (tmp_path / "later").exists()


@pytest.mark.anyio
async def test_open_names_a_directory_it_cannot_create(tmp_path: Path) -> None:
    """A path nobody can create (under /proc) is one clean error naming it, no traceback
    of an OSError out of the daemon's start (which systemd would restart in a loop)."""
    sink = JsonlSink({"path": "/proc/batchd-no-such/out"}, _context(tmp_path))
    with pytest.raises(ConfigError) as caught:  # how the host is set up: exit 2, no restarts
        await sink.open()
    assert "jsonl sink" in str(caught.value) and "/proc/batchd-no-such/out" in str(caught.value)
