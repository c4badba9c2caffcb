"""The csv source: parsing, dialects, byte-offset resume, bad rows and clear errors."""

from __future__ import annotations

import csv
import io
import os
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchd.connectors.csv_source import CsvSource
from batchd.plugins.contract import PluginContext
from batchd.plugins.errors import ConfigError, FatalError
from batchd.plugins.records import Record


def _context(directory: Path) -> PluginContext:
    # Read to the end as ``--until-drained`` does: a last line without a newline counts.
    return PluginContext(pipeline="t", state_dir=directory, config_dir=directory,
                         until_drained=True)


def _write(directory: Path, data: bytes | str, name: str = "tickets.csv") -> Path:
    path = directory / name
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    _settled(path)
    return path


def _settled(path: Path) -> None:
    """Date the file a minute back: it has stopped growing, so its last line is whole."""
    old = time.time() - 60
    os.utime(path, (old, old))


async def _read(
    directory: Path,
    resume: dict[str, Any] | None = None,
    **options: Any,
) -> list[Record]:
    options = {"path": "tickets.csv", "key": "id", **options}
    out: list[Record] = []
    async with CsvSource(options, _context(directory)) as source:
        await source.start(resume)
        while (batch := await source.poll()) is not None:
            assert batch, "poll returned [] for a file source"
            assert len(batch) <= source.max_records
            out.extend(batch)
    return out


def _good(records: list[Record]) -> list[tuple[str, dict[str, Any]]]:
    return [(r.key, r.fields) for r in records if r.error is None]


@pytest.mark.anyio
class TestParsing:
    async def test_multiline_quoted_fields(self, tmp_path: Path) -> None:
        """A quoted field may hold newlines; the next record's line number accounts for them."""
        _write(tmp_path, 'id,body\n1,"one\ntwo\r\nthree"\n2,plain\n')
        records = await _read(tmp_path)
        assert _good(records) == [
            ("1", {"id": "1", "body": "one\ntwo\r\nthree"}),
            ("2", {"id": "2", "body": "plain"}),
        ]
        offset = len(b'id,body\n1,"one\ntwo\r\nthree"\n')
        assert records[0].position == {"line": 2, "row": 0, "offset": offset, "end_line": 4}
        assert records[1].position["line"] == 5

    @pytest.mark.parametrize(
        ("dialect", "text"),
        [
            ("excel", 'id,body\r\n1,"a,b"\r\n2,"say ""hi"""\r\n'),
            ("excel-tab", 'id\tbody\n1\ta,b\n2\t"say ""hi"""\n'),
            ("unix", '"id","body"\n"1","a,b"\n"2","say ""hi"""\n'),
            ("sniff", 'id;body\n1;"a,b"\n2;"say ""hi"""\n'),
            ("sniff", 'id\tbody\n1\ta,b\n2\t"say ""hi"""\n'),
            ("sniff", 'id|body\n1|a,b\n2|"say ""hi"""\n'),
        ],
    )
    async def test_dialects(self, tmp_path: Path, dialect: str, text: str) -> None:
        """Every dialect, including a sniffed one, reads the same two rows."""
        _write(tmp_path, text)
        assert _good(await _read(tmp_path, dialect=dialect)) == [
            ("1", {"id": "1", "body": "a,b"}),
            ("2", {"id": "2", "body": 'say "hi"'}),
        ]

    async def test_delimiter_override(self, tmp_path: Path) -> None:
        """``delimiter`` overrides the dialect's separator."""
        _write(tmp_path, "id;body\n1;x,y\n")
        assert _good(await _read(tmp_path, delimiter=";")) == [("1", {"id": "1", "body": "x,y"})]

    async def test_bom_is_stripped(self, tmp_path: Path) -> None:
        """The default utf-8-sig encoding drops a byte-order mark so the first column matches."""
        _write(tmp_path, b"\xef\xbb\xbfid,body\n1,x\n")
        records = await _read(tmp_path)
        assert _good(records) == [("1", {"id": "1", "body": "x"})]
        assert records[0].position["offset"] == len(b"\xef\xbb\xbfid,body\n1,x\n")

    async def test_bom_with_plain_utf8_names_the_fix(self, tmp_path: Path) -> None:
        """With encoding utf-8 a BOM hides the key column, and the error says what to set."""
        _write(tmp_path, b"\xef\xbb\xbfid,body\n1,x\n")
        with pytest.raises(FatalError, match=r"byte-order mark.*utf-8-sig"):
            await _read(tmp_path, encoding="utf-8")

    async def test_odd_keys_pass_through(self, tmp_path: Path) -> None:
        """Keys with spaces, unicode, slashes and quotes arrive unchanged."""
        keys = [" padded key ", "ключ/ü/1", "a\\b", 'q"uote', "tab\there"]
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["id", "body"])
        writer.writerows([key, "x"] for key in keys)
        _write(tmp_path, buffer.getvalue())
        assert [r.key for r in await _read(tmp_path)] == keys

    async def test_fields_selects_columns(self, tmp_path: Path) -> None:
        """``fields`` limits Record.fields to the listed columns, in that order."""
        _write(tmp_path, "id,a,b,c\n1,x,y,z\n")
        records = await _read(tmp_path, fields=["c", "a"])
        assert list(records[0].fields.items()) == [("c", "z"), ("a", "x")]

    async def test_blank_lines_are_not_rows(self, tmp_path: Path) -> None:
        """Blank lines are skipped; row indexes count data rows only."""
        _write(tmp_path, "id,body\n\n1,x\n\r\n2,y")
        records = await _read(tmp_path)
        assert [(r.position["line"], r.position["row"]) for r in records] == [(3, 0), (5, 1)]

    async def test_batches_then_drained(self, tmp_path: Path) -> None:
        """``poll`` returns at most ``batch`` records, then ``None`` at end of file, repeatedly."""
        _write(tmp_path, "id\n" + "".join(f"{i}\n" for i in range(25)))
        options = {"path": "tickets.csv", "key": "id", "batch": 10}
        async with CsvSource(options, _context(tmp_path)) as s:
            await s.start(None)
            sizes = []
            while (batch := await s.poll()) is not None:
                sizes.append(len(batch))
            assert sizes == [10, 10, 5]
            assert await s.poll() is None


@pytest.mark.anyio
class TestResume:
    async def test_resume_mid_file(self, tmp_path: Path) -> None:
        """Resuming from a record's position yields exactly the records after it."""
        _write(tmp_path, 'id,body\n1,a\n2,"b\nb"\n3,c\n4,d\n')
        everything = await _read(tmp_path)
        rest = await _read(tmp_path, resume=everything[1].position)
        assert rest == everything[2:]
        assert rest[0].position["line"] == 5

    async def test_resume_does_not_reread(self, tmp_path: Path) -> None:
        """The reader seeks to the offset: bytes before it (after the header) are never parsed."""
        _write(tmp_path, b"id,body\n1,\xff\xff broken\n2,ok\n")
        offset = len(b"id,body\n1,\xff\xff broken\n")
        resume = {"line": 2, "row": 0, "offset": offset, "end_line": 2}
        records = await _read(tmp_path, resume=resume)
        assert [(r.key, r.error) for r in records] == [("2", None)]

    async def test_resume_past_replaced_file_fails(self, tmp_path: Path) -> None:
        """A position that is not a record end in this file is a clear error, not garbage rows."""
        _write(tmp_path, "id,body\n1,abc\n")
        for offset in (11, 999):
            with pytest.raises(FatalError, match=r"cannot resume tickets\.csv at byte"):
                await _read(tmp_path, resume={"line": 2, "row": 0, "offset": offset})

    @settings(max_examples=60, deadline=None)
    @given(
        bodies=st.lists(
            st.text(
                alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"),
                max_size=12,
            ),
            max_size=15,
        ),
        dialect=st.sampled_from(["excel", "excel-tab", "unix"]),
    )
    def test_any_split_point_loses_and_repeats_nothing(
        self, bodies: list[str], dialect: str
    ) -> None:
        """For a random CSV and every split point, rows before + rows after resume == all rows."""
        buffer = io.StringIO(newline="")
        writer = csv.writer(buffer, dialect)
        writer.writerow(["id", "body"])
        writer.writerows([f"k{i}", body] for i, body in enumerate(bodies))
        with tempfile.TemporaryDirectory() as name:
            directory = Path(name)
            _write(directory, buffer.getvalue())

            async def check() -> None:
                everything = await _read(directory, dialect=dialect)
                assert _good(everything) == [
                    (f"k{i}", {"id": f"k{i}", "body": body}) for i, body in enumerate(bodies)
                ]
                for split in range(1, len(everything) + 1):
                    after = await _read(directory, everything[split - 1].position, dialect=dialect)
                    assert everything[:split] + after == everything

            anyio.run(check)


@pytest.mark.anyio
class TestBadRows:
    @pytest.mark.parametrize(
        ("row", "key", "reason"),
        [
            (b"7,x,extra", "7", "expected 2 columns, got 3"),
            (b"7", "7", "expected 2 columns, got 1"),
            (b",x", "line-3", "empty key column 'id'"),
            # A bad byte outside the key column leaves the key usable (issue 12, case 13).
            (b"7,caf\xe9", "7", "undecodable bytes for encoding utf-8"),
            (b"7,a\x00b", "7", "NUL byte"),
            (b"7\x00,ab", "line-3", "NUL byte"),
            (b"7,a\rb", "line-3", "unparseable row"),
        ],
    )
    async def test_bad_row_is_an_error_record(
        self, tmp_path: Path, row: bytes, key: str, reason: str
    ) -> None:
        """Each kind of bad row becomes an error record naming file and line; the run continues."""
        _write(tmp_path, b"id,body\n1,ok\n" + row + b"\n2,fine\n")
        records = await _read(tmp_path)
        assert [r.key for r in records] == ["1", key, "2"]
        bad = records[1]
        assert bad.fields == {}
        assert bad.error is not None and bad.error.startswith("tickets.csv line 3: ")
        assert reason in bad.error
        assert bad.position["line"] == 3
        assert records[2].fields == {"id": "2", "body": "fine"}

    async def test_bad_bytes_on_a_continuation_line_name_that_line(self, tmp_path: Path) -> None:
        """Undecodable bytes inside a multi-line field are reported at their own line."""
        _write(tmp_path, b'id,body\n1,"a\nb\xff"\n2,ok\n')
        records = await _read(tmp_path)
        assert records[0].error is not None and "tickets.csv line 3:" in records[0].error
        assert records[1].key == "2"

    @pytest.mark.parametrize("quoted", [False, True])
    async def test_giant_field_is_skipped_with_flat_memory(
        self, tmp_path: Path, quoted: bool
    ) -> None:
        """A 20 MB field over max_field_bytes=1 MiB is one bad row; memory stays flat."""
        giant = b"x" * (10 << 20) + b'\n""\n' + b"y" * (10 << 20) if quoted else b"x" * (20 << 20)
        if quoted:
            giant = b'"' + giant + b'"'
        _write(tmp_path, b"id,body\n1,ok\n2," + giant + b"\n3,after\n4,more\n")
        tracemalloc.start()
        try:
            records = await _read(tmp_path, max_field_bytes=1 << 20)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 12 << 20, f"peak {peak} bytes while skipping a 20 MB field"
        assert [r.key for r in records] == ["1", "2", "3", "4"]  # the key came before it
        assert records[1].error == (
            "tickets.csv line 3: a field is larger than max_field_bytes (1048576)"
        )
        assert records[2].position["line"] == (6 if quoted else 4)

    async def test_field_just_over_limit(self, tmp_path: Path) -> None:
        """A field over max_field_bytes inside a short row is still a bad row naming the column."""
        _write(tmp_path, "id,a,b,c\n1," + "é" * 600 + ",,\n2,,,\n")
        records = await _read(tmp_path, max_field_bytes=1000)
        assert records[0].key == "1"
        assert records[0].error == (
            "tickets.csv line 2: column 'a' is 1200 bytes, over max_field_bytes (1000)"
        )
        assert records[1].error is None

    async def test_unterminated_quote_at_end(self, tmp_path: Path) -> None:
        """A quote left open at end of file is reported instead of swallowing rows silently."""
        _write(tmp_path, 'id,body\n1,"open\n2,x\n')
        records = await _read(tmp_path)
        assert len(records) == 1
        assert records[0].error == "tickets.csv line 2: unterminated quoted field at end of file"


@pytest.mark.anyio
class TestErrors:
    async def test_missing_file(self, tmp_path: Path) -> None:
        """A missing file is a FatalError naming the path, raised at start()."""
        source = CsvSource({"path": "nope.csv", "key": "id"}, _context(tmp_path))
        with pytest.raises(FatalError, match=f"file not found: {tmp_path / 'nope.csv'}"):
            await source.start(None)
        await source.aclose()

    async def test_empty_file(self, tmp_path: Path) -> None:
        """An empty file names itself and says a header is expected."""
        _write(tmp_path, b"")
        with pytest.raises(FatalError, match=r"tickets\.csv is empty: expected a header row"):
            await _read(tmp_path)

    async def test_missing_key_column_lists_columns(self, tmp_path: Path) -> None:
        """A header without the key column lists the columns it has."""
        _write(tmp_path, "ticket,body\n1,x\n")
        with pytest.raises(FatalError, match="no key column 'id'; columns found: 'ticket', 'body'"):
            await _read(tmp_path)

    async def test_other_separator_is_suggested(self, tmp_path: Path) -> None:
        """A semicolon file read as commas has one column; the error says what to set."""
        _write(tmp_path, "id;body\n1;x\n")
        with pytest.raises(FatalError, match="looks ';'-separated: set delimiter = ';'"):
            await _read(tmp_path)

    async def test_missing_field_column(self, tmp_path: Path) -> None:
        """A ``fields`` entry absent from the header is named."""
        _write(tmp_path, "id,body\n1,x\n")
        with pytest.raises(FatalError, match="no field 'subject'"):
            await _read(tmp_path, fields=["subject"])

    def test_unknown_option(self, tmp_path: Path) -> None:
        """An unknown option names the key and lists the valid ones."""
        message = (r"csv source: delimter: unknown option \(did you mean 'delimiter'\?\); "
                   r"valid options: batch, delim")
        with pytest.raises(ConfigError, match=message):
            CsvSource({"path": "a.csv", "key": "id", "delimter": ";"}, _context(tmp_path))

    def test_missing_required_option(self, tmp_path: Path) -> None:
        """A missing ``key`` option is named."""
        with pytest.raises(ConfigError, match="csv source: key: is required"):
            CsvSource({"path": "a.csv"}, _context(tmp_path))

    @pytest.mark.parametrize(
        ("option", "value", "message"),
        [
            ("dialect", "excel2", r"dialect: must be one of .*\(did you mean 'excel'\?\)"),
            ("delimiter", "::", "delimiter: must be one character"),
            ("encoding", "utf-16", "encoding: encoding 'utf-16' is not ASCII-compatible"),
            ("encoding", "klingon", "encoding: unknown encoding"),
            ("batch", 0, "batch: must be a positive integer, got 0"),
            ("max_field_bytes", True, "max_field_bytes: must be a positive integer, got True"),
            ("fields", "body", "fields: must be a non-empty list"),
        ],
    )
    def test_bad_option_values(self, tmp_path: Path, option: str, value: Any, message: str) -> None:
        """Bad option values are rejected when the source is built, before any I/O."""
        with pytest.raises(ConfigError, match=message):
            CsvSource({"path": "a.csv", "key": "id", option: value}, _context(tmp_path))

    async def test_unsniffable_file(self, tmp_path: Path) -> None:
        """When sniffing fails the error says which dialects to set instead."""
        _write(tmp_path, "id\n")
        with pytest.raises(FatalError, match=r"could not detect the CSV dialect of tickets\.csv"):
            await _read(tmp_path, dialect="sniff")

    async def test_relative_path_resolves_against_config_dir(self, tmp_path: Path) -> None:
        """A relative ``path`` is read from the config file's directory, not the cwd."""
        (tmp_path / "sub").mkdir()
        _write(tmp_path / "sub", "id\n1\n", name="data.csv")
        records = await _read(tmp_path, path="sub/data.csv")
        assert [r.key for r in records] == ["1"]
