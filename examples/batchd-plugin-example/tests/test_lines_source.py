"""The example-lines source on real files: keys, positions, resume, bad lines, options."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import batchd
import pytest

from batchd_plugin_example import LinesSource, register_sources


def _context(tmp_path: Path) -> batchd.PluginContext:
    """As under ``batchd run --until-drained``: a last line without a newline is read too
    (a daemon holds it back until its newline arrives)."""
    return batchd.PluginContext(pipeline="notes", state_dir=tmp_path, config_dir=tmp_path,
                                until_drained=True)


async def _read_all(
    source: batchd.Source, resume: dict[str, Any] | None = None
) -> list[batchd.Record]:
    """Every record, the way batchd drives a source: start, poll until None, close."""
    records: list[batchd.Record] = []
    async with source:
        await source.start(resume)
        while (batch := await source.poll()) is not None:
            records.extend(batch)
    return records


@pytest.mark.anyio
class TestLinesSource:
    async def test_prefix_keys_and_positions(self, tmp_path: Path) -> None:
        """Each non-empty line is one record keyed by its prefix, positioned after the line."""
        (tmp_path / "notes.txt").write_bytes(b"n1: refund me\n\n  \nn2: it crashed\n")
        source = LinesSource({"path": "notes.txt", "key": "prefix"}, _context(tmp_path))
        records = await _read_all(source)
        assert [(r.key, r.fields, r.position) for r in records] == [
            ("n1", {"text": "refund me"}, {"line": 1, "offset": 14}),
            ("n2", {"text": "it crashed"}, {"line": 4, "offset": 33}),
        ]

    async def test_hash_keys_are_stable(self, tmp_path: Path) -> None:
        """Hash keys depend on the text only, not on line endings or the line number."""
        (tmp_path / "a.txt").write_bytes(b"hello world\r\n")
        (tmp_path / "b.txt").write_bytes(b"\n\nhello world")
        first = await _read_all(LinesSource({"path": "a.txt"}, _context(tmp_path)))
        second = await _read_all(LinesSource({"path": "b.txt"}, _context(tmp_path)))
        expected = hashlib.sha256(b"hello world").hexdigest()[:16]
        assert [r.key for r in first] == [r.key for r in second] == [expected]

    async def test_resume_continues_after_position(self, tmp_path: Path) -> None:
        """Starting at a record's position yields exactly the records after it."""
        lines = b"".join(b"k%d: line %d\n" % (i, i) for i in range(50))
        (tmp_path / "n.txt").write_bytes(lines)
        options = {"path": "n.txt", "key": "prefix", "batch": 7}
        everything = await _read_all(LinesSource(options, _context(tmp_path)))
        rest = await _read_all(LinesSource(options, _context(tmp_path)), everything[19].position)
        assert [r.key for r in rest] == [f"k{i}" for i in range(20, 50)]
        assert rest[0].position["line"] == 21

    async def test_resume_refuses_a_changed_file(self, tmp_path: Path) -> None:
        """A position that is not a line end means the file changed: stop, naming the file."""
        (tmp_path / "n.txt").write_bytes(b"a: 1\nb: 2\n")
        source = LinesSource({"path": "n.txt", "key": "prefix"}, _context(tmp_path))
        with pytest.raises(batchd.FatalError, match=r"cannot resume n\.txt at byte 3"):
            await _read_all(source, {"line": 1, "offset": 3})

    async def test_bad_lines_become_error_records(self, tmp_path: Path) -> None:
        """Bad bytes, a missing key and an overlong line are error records; reading goes on."""
        data = b"ok: fine\nno colon\nbad: \xff\xfe\n" + b"x" * 5000 + b"\nlast: one\n"
        (tmp_path / "n.txt").write_bytes(data)
        options = {"path": "n.txt", "key": "prefix", "max_line_bytes": 1000}
        records = await _read_all(LinesSource(options, _context(tmp_path)))
        assert [(r.key, r.error) for r in records] == [
            ("ok", None),
            ("line-2", "n.txt line 2: expected 'KEY: TEXT' (no ':' or an empty key)"),
            ("line-3", "n.txt line 3: not valid UTF-8 (byte 6 of the line)"),
            ("line-4", "n.txt line 4: line longer than max_line_bytes (1000)"),
            ("last", None),
        ]
        assert records[3].position == {"line": 4, "offset": len(data) - len(b"last: one\n")}

    async def test_missing_file_is_fatal(self, tmp_path: Path) -> None:
        """A missing file stops the pipeline with its full path."""
        source = LinesSource({"path": "nope.txt"}, _context(tmp_path))
        with pytest.raises(batchd.FatalError, match=r"file not found: .*nope\.txt"):
            await _read_all(source)


class TestOptions:
    @pytest.mark.parametrize(
        ("options", "message"),
        [
            ({}, "example-lines source: path: is required"),
            ({"path": "x", "keys": "hash"}, r"keys: unknown option \(did you mean 'key'\?\)"),
            ({"path": "x", "key": "md5"}, "key: must be one of hash, prefix, got 'md5'"),
            ({"path": "x", "batch": 0}, "batch: must be a positive integer, got 0"),
            ({"path": "x", "max_line_bytes": True}, "max_line_bytes: must be a positive"),
        ],
    )
    def test_bad_options_name_the_key(
        self, tmp_path: Path, options: dict[str, Any], message: str
    ) -> None:
        """Every option mistake is a ConfigError naming the key, before any I/O."""
        with pytest.raises(batchd.ConfigError, match=message):
            LinesSource(options, _context(tmp_path))

    def test_registers_its_type(self) -> None:
        """The hook offers the class under the type name a config uses."""
        found: dict[str, Any] = {}
        register_sources(register=found.__setitem__)
        assert found == {"example-lines": LinesSource}
