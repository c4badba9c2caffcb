"""
Hostile operator, part 2: the input changes under batchd, or holds rows that cannot
be shaped.

Issue 12, cases 2, 7, 8 and 13: a CSV replaced by another of the same shape, a row
half-written while batchd reads, a JSON field too deep to serialise, and dead letters
that must keep the record's real key.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from batchd.connectors.csv_source import CsvSource
from batchd.connectors.jsonl_source import JsonlSource
from batchd.daemon.emulator import EmulatorThread
from batchd.plugins.contract import PluginContext
from tests.fixtures.engine import RULES_PATH, Workspace, describe, dump_toml
from tests.fixtures.hostile import (
    assert_nothing_lost,
    assert_paid_once,
    one_line,
    start_daemon,
    stop_daemon,
    wait_for,
)

pytestmark = pytest.mark.timeout(180)


def fixed_width_csv(path: Path, prefix: str, rows: int) -> list[str]:
    """Rows of one exact width, so a saved byte offset lands on a row end in any such file."""
    keys = [f"{prefix}{n:07d}" for n in range(1, rows + 1)]
    bodies = ("I was charged twice so please refund", "The export button crashes the app")
    lines = ["ticket_id,body"] + [f"{key},{bodies[n % 2]:<40}" for n, key in enumerate(keys)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return keys


def write_config(ws: Workspace, **pipeline: Any) -> None:
    """The usual test config, with room in ``max_tokens`` for the emulator's echo reply."""
    data = {"state_dir": "state", "api": {"poll_interval": "0.1s", "poll_jitter": 0.1},
            "pipeline": [ws.pipeline(**pipeline)]}
    data["pipeline"][0]["request"]["max_tokens"] = 64
    ws.write_raw(dump_toml(data))


def result_outputs(ws: Workspace) -> dict[str, str]:
    if not ws.sqlite_path.exists():
        return {}
    with closing(sqlite3.connect(f"file:{ws.sqlite_path}?mode=ro", uri=True)) as db:
        try:
            return dict(db.execute("SELECT key, output FROM results"))
        except sqlite3.OperationalError:  # the sink has not created its table yet
            return {}


class TestReplacedFile:
    def test_replaced_csv_is_refused_at_resume(
        self, emulator_factory: Callable[..., EmulatorThread],
        workspace: Callable[..., Workspace],
    ) -> None:
        """Case 2: a new file of the same row shape where the half-read one was: refused with
        one line naming the file and what changed; the original put back finishes once."""
        emulator = emulator_factory(rules=RULES_PATH)
        ws = workspace(emulator.base_url)
        source = ws.root / "tickets.csv"
        keys = fixed_width_csv(source, "T", 200)
        original = source.read_bytes()
        ws.write_config(max_requests=50, linger="60s", max_in_flight=2)
        ws.crash("after_source_commit:1")

        fixed_width_csv(source, "U", 200)  # replaced: same shape, other rows
        refused = ws.run()
        assert refused.returncode == 2, describe(refused)
        error = one_line(refused)
        assert str(source) in error and "replaced" in error

        source.write_bytes(original)
        ws.run_ok()
        assert_paid_once(emulator, expected=[f"t-{k}" for k in keys])
        assert_nothing_lost(ws, keys)
        assert not any(k.startswith("U") for k in ws.outputs().results)


class TestHalfWrittenLine:
    def test_daemon_reads_a_last_line_only_once_it_is_complete(
        self, emulator_factory: Callable[..., EmulatorThread],
        workspace: Callable[..., Workspace],
    ) -> None:
        """Case 7: a row appended while batchd reads (`…,second appen`) is read once its newline
        arrives: answered with its whole text, and no dead letter for its tail."""
        emulator = emulator_factory()  # no rules: the reply echoes the message
        ws = workspace(emulator.base_url)
        source = ws.root / "tickets.csv"
        source.write_text("ticket_id,body\nT0000001,first row\nT0000002,another row\n"
                          "T0000003,second appen", encoding="utf-8")
        write_config(ws, max_requests=50, linger="0.1s", allowed=None)
        daemon = start_daemon(ws)
        try:
            wait_for(lambda: len(result_outputs(ws)) >= 2, "the complete rows answered")
            with source.open("a", encoding="utf-8") as f:
                f.write("d row\nT0000004,a later row\n")
            wait_for(lambda: len(result_outputs(ws)) >= 4, "the appended rows answered")
        finally:
            code = stop_daemon(daemon)
        assert code == 0
        outputs = result_outputs(ws)
        assert outputs["T0000003"] == "Emulated reply to: second append row"
        assert ws.outputs().dead == {}
        assert_paid_once(emulator, expected=[f"t-T000000{n}" for n in range(1, 5)])

    def test_until_drained_reads_an_unterminated_last_line(
        self, emulator_factory: Callable[..., EmulatorThread],
        workspace: Callable[..., Workspace],
    ) -> None:
        """Case 7: with --until-drained, a last line without a newline is read once the file
        has stopped growing."""
        emulator = emulator_factory()
        ws = workspace(emulator.base_url)
        (ws.root / "tickets.csv").write_text(
            "ticket_id,body\nT0000001,first row\nT0000002,no newline here", encoding="utf-8"
        )
        write_config(ws, allowed=None)
        ws.run_ok()
        assert result_outputs(ws)["T0000002"] == "Emulated reply to: no newline here"
        assert_paid_once(emulator, expected=["t-T0000001", "t-T0000002"])


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["csv", "jsonl"])
async def test_an_unfinished_last_record_is_held_until_its_newline(
    tmp_path: Path, kind: str
) -> None:
    """Case 7 at the source: in daemon mode a last record without its newline is not read —
    a CSV quoted field spanning lines included — and is read whole once it is finished."""
    context = PluginContext(pipeline="t", state_dir=tmp_path, config_dir=tmp_path)
    if kind == "csv":
        path = tmp_path / "in.csv"
        path.write_bytes(b'id,body\n1,"first\nline"\n2,"second\nhal')
        source: CsvSource | JsonlSource = CsvSource({"path": "in.csv", "key": "id"}, context)
        tail, body = b'f done"\n', "second\nhalf done"
    else:
        path = tmp_path / "in.jsonl"
        path.write_bytes(b'{"id": 1, "body": "first"}\n{"id": 2, "body": "second ha')
        source = JsonlSource({"path": "in.jsonl", "key": "id"}, context)
        tail, body = b'lf done"}\n', "second half done"
    async with source:
        await source.start(None)
        assert [r.key for r in await source.poll() or []] == ["1"]
        assert await source.poll() is None
        with path.open("ab") as f:
            f.write(tail)
        (record,) = await source.poll() or []
        assert (record.key, record.fields["body"], record.error) == ("2", body, None)
        assert record.position["offset"] == path.stat().st_size


class TestUnshapeableRecords:
    def test_a_record_too_deep_to_serialise_is_its_own_dead_letter(
        self, emulator_factory: Callable[..., EmulatorThread],
        workspace: Callable[..., Workspace],
    ) -> None:
        """Case 8: a JSONL field nested 300 deep parses but cannot be rendered: that record is a
        dead letter, the good rows of its chunk are answered, exit 0."""
        emulator = emulator_factory(rules=RULES_PATH)
        ws = workspace(emulator.base_url)
        deep: Any = "bottom"
        for _ in range(300):
            deep = [deep]
        records = [{"id": f"r{n}", "body": "please refund the invoice"} for n in range(1, 21)]
        records[4]["body"] = deep
        (ws.root / "records.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in records), encoding="utf-8"
        )
        ws.write_config(source={"type": "jsonl", "path": "records.jsonl", "key": "id"},
                        custom_id=None, max_requests=50)
        ws.run_ok()
        out = ws.outputs()
        assert set(out.dead) == {"r5"}
        assert out.dead["r5"]["error_type"] == "shape_error"
        assert set(out.results) == {r["id"] for r in records} - {"r5"}
        assert_paid_once(emulator)


class TestDeadLetterKeys:
    def test_oversized_and_nul_fields_keep_the_real_key(
        self, emulator_factory: Callable[..., EmulatorThread],
        workspace: Callable[..., Workspace],
    ) -> None:
        """Case 13: a row with a field over max_field_bytes or a NUL byte outside the key column
        is dead-lettered under its real key, not `line-N`."""
        emulator = emulator_factory(rules=RULES_PATH)
        ws = workspace(emulator.base_url)
        big = "x" * 5000
        (ws.root / "tickets.csv").write_text(
            "ticket_id,body\n"
            "T0000001,fine\n"
            f"T0000002,{big}\n"
            "T0000003,has a \x00 NUL\n"
            "T0000004,fine too\n",
            encoding="utf-8",
        )
        ws.write_config(source={"type": "csv", "path": "tickets.csv", "key": "ticket_id",
                                "max_field_bytes": 1000})
        ws.run_ok()
        out = ws.outputs()
        assert set(out.dead) == {"T0000002", "T0000003"}, out.dead
        assert "max_field_bytes" in out.dead["T0000002"]["error_message"]
        assert "NUL" in out.dead["T0000003"]["error_message"]
        assert set(out.results) == {"T0000001", "T0000004"}
        assert_paid_once(emulator)


class TestGarbageHeader:
    @pytest.mark.parametrize("head", [b"\xff\xfe\x00t\x00i\x00c", b"ticket_id,bo\x00dy\n"])
    def test_a_csv_whose_header_is_garbage_is_one_line(
        self, emulator_factory: Callable[..., EmulatorThread],
        workspace: Callable[..., Workspace], head: bytes,
    ) -> None:
        """A CSV whose first line is undecodable or holds a NUL (a binary file at the path,
        a UTF-16 export): exit 2 with one line naming the file's header, not an
        AttributeError traceback; nothing sent."""
        emulator = emulator_factory(rules=RULES_PATH)
        ws = workspace(emulator.base_url)
        (ws.root / "tickets.csv").write_bytes(head + b"\nT0000001,refund me\n")
        ws.write_config()
        proc = ws.run()
        assert proc.returncode == 2, describe(proc)
        error = one_line(proc)
        assert "tickets.csv line 1" in error and "header" in error, error
        assert emulator.stats()["batches_created"] == 0
