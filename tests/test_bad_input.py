"""
Bad input: a broken config or source file stops ``batchd run`` with one line
naming the thing at fault and exit code 2, before anything is written; a bad
*record* is dead-lettered with its reason while every other record goes through.
"""

from __future__ import annotations

import csv
import json
import sqlite3
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from batchd.daemon.cli import main
from batchd.daemon.emulator import EmulatorConfig, EmulatorThread
from batchd.daemon.intake.custom_ids import hashed_custom_id, is_valid_custom_id
from tests.fixtures.emulator import SEED
from tests.fixtures.engine import RULES_PATH, Workspace, describe

EXIT_CONFIG = 2


def run_cli(ws: Workspace, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """``batchd run CONFIG --until-drained`` in this process; returns (exit code, stderr)."""
    code = main(["run", str(ws.config_path), "--until-drained"])
    return code, capsys.readouterr().err.strip()


def written(ws: Workspace) -> list[str]:
    """Everything in the workspace besides the config and the inputs the test wrote."""
    return sorted(
        str(p.relative_to(ws.root)) for p in ws.root.rglob("*")
        if p.name not in ("pipeline.toml", "tickets.csv", "input.csv", "records.jsonl")
        and "logs" not in p.relative_to(ws.root).parts
    )


@pytest.fixture
def config_ws(workspace: Callable[..., Workspace]) -> Workspace:
    """A workspace whose API address goes nowhere: config errors must stop before any call."""
    ws = workspace("http://127.0.0.1:9")
    ws.write_tickets(5)
    return ws


class TestConfigErrors:
    def test_malformed_toml(self, config_ws: Workspace) -> None:
        """A TOML syntax error exits 2 (real subprocess) naming the file and the line."""
        config_ws.write_raw('state_dir = "state"\n[[pipeline]\nname = "x"\n')
        proc = config_ws.run()
        assert proc.returncode == EXIT_CONFIG, describe(proc)
        error = proc.stderr.strip()
        assert "\n" not in error and "Traceback" not in error
        assert str(config_ws.config_path) in error and "not valid TOML" in error
        assert "line 2" in error
        assert written(config_ws) == []

    def test_unknown_key_suggests_the_right_one(
        self, config_ws: Workspace, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A misspelt key names its table and suggests the key that was meant."""
        config_ws.write_config(max_attemps=3)
        code, error = run_cli(config_ws, capsys)
        assert code == EXIT_CONFIG
        assert "\n" not in error
        assert "[[pipeline]] 'tickets'" in error and "max_attemps" in error
        assert "did you mean 'max_attempts'?" in error
        assert written(config_ws) == []

    def test_unknown_key_in_nested_table(
        self, config_ws: Workspace, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A typo inside [pipeline.batching] names that table."""
        text = config_ws.write_config().read_text().replace('"linger" =', '"lingr" =')
        config_ws.write_raw(text)
        code, error = run_cli(config_ws, capsys)
        assert code == EXIT_CONFIG
        assert "batching" in error
        assert "lingr" in error and "did you mean 'linger'?" in error

    def test_nested_table_is_named_like_the_file_writes_it(
        self, config_ws: Workspace, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """The table is called [pipeline.batching] (of 'tickets'), as in the TOML."""
        text = config_ws.write_config().read_text().replace('"linger" =', '"lingr" =')
        config_ws.write_raw(text)
        _, error = run_cli(config_ws, capsys)
        assert "[pipeline.batching] of 'tickets': lingr:" in error

    def test_missing_required_key(
        self, config_ws: Workspace, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A request table without max_tokens says which key is required where."""
        text = config_ws.write_config().read_text().replace('"max_tokens" = 8\n', "")
        assert "max_tokens" not in text
        config_ws.write_raw(text)
        code, error = run_cli(config_ws, capsys)
        assert code == EXIT_CONFIG
        assert "request" in error and "max_tokens: is required" in error
        assert str(config_ws.config_path) in error
        assert written(config_ws) == []

    def test_max_requests_over_the_api_limit(
        self, config_ws: Workspace, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """max_requests = 200000 is refused with the API's limit in the message."""
        config_ws.write_config(max_requests=200_000)
        code, error = run_cli(config_ws, capsys)
        assert code == EXIT_CONFIG
        assert "max_requests" in error and "100,000" in error and "200,000" in error
        assert written(config_ws) == []

    def test_unknown_sink_type_lists_known_types(self, config_ws: Workspace) -> None:
        """An unknown sink type exits 2 listing the sink types that exist, writing no output."""
        text = config_ws.write_config().read_text().replace('"sqlite"', '"sqlit"', 1)
        config_ws.write_raw(text)
        proc = config_ws.run()
        assert proc.returncode == EXIT_CONFIG, describe(proc)
        error = proc.stderr.strip()
        assert "\n" not in error
        assert "[[pipeline.sink]] #1" in error and "'sqlit'" in error
        assert "known:" in error and "sqlite" in error and "jsonl" in error
        assert written(config_ws) == []


class TestSourceFileErrors:
    @pytest.mark.parametrize(
        ("setup", "expected"),
        [
            ("missing", "file not found"),
            ("empty", "is empty"),
            ("no_key", "no key column 'ticket_id'"),
        ],
    )
    def test_names_the_file_and_writes_no_rows(
        self, setup: str, expected: str, config_ws: Workspace
    ) -> None:
        """A missing, empty or keyless CSV exits 2 naming the file, leaving nothing behind."""
        source = {"type": "csv", "path": "input.csv", "key": "ticket_id"}
        config_ws.write_config(source=source)
        path = config_ws.root / "input.csv"
        if setup == "empty":
            path.write_text("")
        elif setup == "no_key":
            path.write_text("id,body\n1,hello\n")
        proc = config_ws.run()
        assert proc.returncode == EXIT_CONFIG, describe(proc)
        error = proc.stderr.strip()
        assert "\n" not in error and "Traceback" not in error
        assert "input.csv" in error and expected in error
        assert written(config_ws) == [], "a bad source left state or sink files behind"


    @pytest.mark.parametrize(
        ("change", "where"),
        [
            ({"user": "Classify: {bdy}"}, "[pipeline.request] user names {bdy}"),
            ({"custom_id": "c-{ticket}"}, "custom_id names {ticket}"),
        ],
    )
    def test_template_field_missing_from_the_header(
        self, change: dict[str, str], where: str, config_ws: Workspace
    ) -> None:
        """A template naming a column the CSV lacks exits 2 before any row is read or sent."""
        config_ws.write_config(**change)
        proc = config_ws.run()
        assert proc.returncode == EXIT_CONFIG, describe(proc)
        error = proc.stderr.strip()
        assert "\n" not in error and "Traceback" not in error
        assert "pipeline.toml" in error and where in error
        assert "fields: 'ticket_id', 'body'" in error
        assert written(config_ws) == [], "a bad template left state or sink files behind"


# -- bad records: dead-lettered one by one, the rest goes through ------------------------

LOOKALIKE = hashed_custom_id("with space")  # a valid key that equals another key's hash
ODD_KEYS = [
    "with space",
    LOOKALIKE,
    "ключ-юникод",
    "a/b/c",
    "emoji-🎫",
    "x" * 100,
    " leading and trailing ",
    'quote"and,comma',
    "plain_valid-key",
]
BIG_KEY = "T-big"
DUP_SAME_CHUNK = "T0000003"
DUP_LATER_CHUNK = "T0000001"


@pytest.fixture(scope="module")
def csv_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workspace]:
    """
    One CSV run holding a 2 MB row, duplicate keys (in the same and in a later
    chunk) and keys no custom_id may hold; ``max_bytes = "1MB"``.
    """
    root = tmp_path_factory.mktemp("bad-records")
    config = EmulatorConfig(rules=RULES_PATH, seed=SEED, state_dir=root / "emulator")
    with EmulatorThread(config) as emulator:
        ws = Workspace(root / "ws", emulator.base_url)
        rows: list[tuple[str, str]] = [
            (f"T{i:07d}", f"I was charged twice, ticket {i}") for i in range(1, 31)
        ]
        rows.insert(5, (DUP_SAME_CHUNK, "The export button crashes the app"))
        rows.append((DUP_LATER_CHUNK, "Please add dark mode"))
        rows.insert(10, (BIG_KEY, "refund " + "x" * 2_000_000))
        rows.extend((key, f"I can't log in to my account ({n})") for n, key in enumerate(ODD_KEYS))
        with (ws.root / "tickets.csv").open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["ticket_id", "body"])
            writer.writerows(rows)
        ws.write_config(custom_id=None, max_bytes="1MB", max_requests=12)
        ws.run_ok()
        yield ws


class TestBadRecords:
    def test_oversized_request_is_dead_lettered(self, csv_run: Workspace) -> None:
        """A 2 MB request under max_bytes = 1MB is dead-lettered request_too_large."""
        out = csv_run.outputs()
        dead = out.dead[BIG_KEY]
        assert dead["error_type"] == "request_too_large"
        assert "max_bytes" in dead["error_message"]
        assert dead["source"]["line"] == 12
        assert BIG_KEY not in out.results

    def test_duplicate_key_keeps_the_first(self, csv_run: Workspace) -> None:
        """A key's second row is dead-lettered duplicate_key; the first row's answer stays."""
        out = csv_run.outputs()
        assert out.results[DUP_SAME_CHUNK] == "billing"  # the first row, not the crash report
        assert out.results[DUP_LATER_CHUNK] == "billing"  # not the later feature request
        for key in (DUP_SAME_CHUNK, DUP_LATER_CHUNK):
            assert out.dead[key]["error_type"] == "duplicate_key"
            assert key in out.dead[key]["error_message"]
        assert out.dead[DUP_SAME_CHUNK]["source"]["line"] == 7
        assert out.jsonl_keys[DUP_LATER_CHUNK] == 1

    def test_everything_else_succeeds(self, csv_run: Workspace) -> None:
        """Apart from those three rows every row has its answer, exactly once."""
        out = csv_run.outputs()
        expected = {f"T{i:07d}" for i in range(1, 31)} | set(ODD_KEYS)
        assert set(out.results) == expected
        assert set(out.dead) == {BIG_KEY, DUP_SAME_CHUNK, DUP_LATER_CHUNK}
        assert set(out.jsonl_keys.values()) == {1}

    def test_odd_keys_round_trip_exactly(self, csv_run: Workspace) -> None:
        """Keys with spaces, unicode, slashes or 100 characters come back byte for byte."""
        out = csv_run.outputs()
        for key in ODD_KEYS:
            assert out.results[key] == "account", key
        ids = _custom_ids(csv_run)
        by_batch: dict[str, list[str]] = {}
        for custom_id, batch_id in ids.values():
            by_batch.setdefault(batch_id, []).append(custom_id)
        for batch_ids in by_batch.values():
            assert len(batch_ids) == len(set(batch_ids)), "custom_id repeated within a batch"
        assert ids["with space"][1] == ids[LOOKALIKE][1]  # the collision happened in one batch
        assert ids["with space"][0] == LOOKALIKE
        assert ids[LOOKALIKE][0] != LOOKALIKE and is_valid_custom_id(ids[LOOKALIKE][0])
        for key in ODD_KEYS:
            if key == LOOKALIKE:
                continue
            expected = key if is_valid_custom_id(key) else hashed_custom_id(key)
            assert ids[key][0] == expected


def _custom_ids(ws: Workspace) -> dict[str, tuple[str, str]]:
    """key → (custom_id, batch_id) as the SQLite sink recorded them."""
    db = sqlite3.connect(ws.sqlite_path)
    try:
        return {k: (c, b) for k, c, b in db.execute("SELECT key, custom_id, batch_id FROM results")}
    finally:
        db.close()


class TestMissingField:
    def test_record_without_a_template_field_is_dead_lettered(
        self, emulator_factory: Callable[..., EmulatorThread], workspace: Callable[..., Workspace]
    ) -> None:
        """A JSONL record lacking a field of ``user`` is dead-lettered shape_error naming it."""
        emulator = emulator_factory(rules=RULES_PATH)
        ws = workspace(emulator.base_url)
        records: list[dict[str, Any]] = []
        for i in range(20):
            record: dict[str, Any] = {"id": f"r{i}", "body": "I was charged twice"}
            if i % 7 != 3:
                record["extra"] = "thanks"
            records.append(record)
        with (ws.root / "records.jsonl").open("w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        ws.write_config(
            source={"type": "jsonl", "path": "records.jsonl", "key": "id"},
            custom_id=None, user="{body} {extra}",
        )
        ws.run_ok()
        out = ws.outputs()
        missing = {f"r{i}" for i in range(20) if i % 7 == 3}
        assert set(out.dead) == missing
        for key in missing:
            assert out.dead[key]["error_type"] == "shape_error"
            assert "'extra'" in out.dead[key]["error_message"]
            assert out.dead[key]["source"]["line"] == int(key[1:]) + 1
        assert set(out.results) == {f"r{i}" for i in range(20)} - missing
        assert emulator.stats()["requests_received"] == 20 - len(missing)
