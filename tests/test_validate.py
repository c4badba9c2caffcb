"""
``batchd validate`` and ``batchd run`` on a table of broken configs: both exit 2 naming
the key at fault, never a traceback, and they report the very same problems (run's
preflight *is* validate). A good config passes both, and ``--connect`` reaches the
database for real.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from batchd.daemon.cli import main
from batchd.daemon.emulator import EmulatorThread
from examples.tickets.generate import write_tickets
from tests.fixtures.engine import dump_toml
from tests.fixtures.service import REPO

Edit = Callable[[dict[str, Any], Path], None]


def _config(root: Path) -> dict[str, Any]:
    """A working config: tickets.csv in, JSONL and SQLite out, state in state/."""
    return {
        "state_dir": "state",
        "api": {"poll_interval": "0.1s"},
        "pipeline": [{
            "name": "tickets",
            "custom_id": "t-{ticket_id}",
            "source": {"type": "csv", "path": "tickets.csv", "key": "ticket_id"},
            "request": {"model": "claude-haiku-4-5", "max_tokens": 8, "user": "{body}"},
            "batching": {"max_requests": 10, "linger": "0.1s"},
            "sink": [{"type": "sqlite", "path": "out/labels.sqlite"},
                     {"type": "jsonl", "path": "out/labels"}],
            "dead_letter": {"type": "jsonl", "path": "out/dead"},
        }],
    }


def _set(*path: str | int, value: Any) -> Edit:
    def edit(config: dict[str, Any], root: Path) -> None:
        target: Any = config
        for step in path[:-1]:
            target = target.setdefault(step, {}) if isinstance(step, str) else target[step]
        target[path[-1]] = value
    return edit


def _pipe(*path: str | int, value: Any) -> Edit:
    return _set("pipeline", 0, *path, value=value)


def _drop_file(config: dict[str, Any], root: Path) -> None:
    (root / "tickets.csv").unlink()


def _json_answers_with_allowed(how: str) -> Edit:
    """Structured output (or a forced tool call) with an `allowed` list of labels."""
    def edit(config: dict[str, Any], root: Path) -> None:
        pipeline = config["pipeline"][0]
        schema = {"type": "object", "properties": {"label": {"type": "string"}}}
        if how == "output_schema":
            pipeline["request"]["output_schema"] = schema
        else:
            pipeline["request"]["tools"] = [{"name": "label", "input_schema": schema}]
            pipeline["request"]["tool_choice"] = {"type": "tool", "name": "label"}
        pipeline["output"] = {"allowed": ["billing", "bug"]}
    return edit


def _sqlite_path_is_a_directory(config: dict[str, Any], root: Path) -> None:
    (root / "labels.sqlite").mkdir()
    config["pipeline"][0]["sink"][0]["path"] = "labels.sqlite"


def _cache_1h_after_5m(config: dict[str, Any], root: Path) -> None:
    """A tool cached for 5 minutes, then `cache = "1h"` on the system prompt after it."""
    request = config["pipeline"][0]["request"]
    request["system"] = "Classify."
    request["cache"] = "1h"
    request["tools"] = [{"name": "label", "input_schema": {"type": "object"},
                         "cache_control": {"type": "ephemeral", "ttl": "5m"}}]


# (case id, edit, the key the message must name, a phrase it must contain)
BAD: list[tuple[str, Edit, str, str]] = [
    ("log_level typo", _set("log_level", value="verbose"), "log_level", "'verbose'"),
    ("metrics port too big", _set("metrics", "port", value=99999), "port", "99999"),
    ("metrics port negative", _set("metrics", "port", value=-1), "port", "-1"),
    ("metrics address", _set("metrics", "address", value="everywhere"), "address",
     "not an IP address"),
    ("poll_interval zero", _set("api", "poll_interval", value="0s"), "poll_interval", "0s"),
    ("poll_interval words", _set("api", "poll_interval", value="soon"), "poll_interval",
     "'soon'"),
    ("api timeout zero", _set("api", "timeout", value=0), "timeout", "longer than 0s"),
    ("top-level typo", _set("stat_dir", value="x"), "stat_dir", "did you mean 'state_dir'"),
    ("sink type typo", _pipe("sink", 0, "type", value="sqlit"), "sqlit",
     "did you mean 'sqlite'"),
    ("sink option typo", _pipe("sink", 1, "pth", value="x"), "pth", "unknown option"),
    ("source option typo", _pipe("source", "delimitr", value=";"), "delimitr",
     "unknown option"),
    ("source type typo", _pipe("source", "type", value="cvs"), "cvs", "unknown source type"),
    ("source file missing", _drop_file, "tickets.csv", "file not found"),
    ("key column missing", _pipe("source", "key", value="id"), "'id'", "no key column"),
    ("template field typo", _pipe("request", "user", value="{bdy}"), "{bdy}",
     "did you mean {body}"),
    ("custom_id field typo", _pipe("custom_id", value="t-{ticket}"), "custom_id", "{ticket}"),
    ("max_attempts zero", _pipe("max_attempts", value=0), "max_attempts", "at least 1"),
    ("dead-letter ratio", _pipe("max_dead_letter_ratio", value=1.5), "max_dead_letter_ratio",
     "fraction"),
    ("batching zero", _pipe("batching", "max_requests", value=0), "max_requests", "positive"),
    ("temperature", _pipe("request", "temperature", value=2), "temperature", "between 0 and 1"),
    ("pipeline typo", _pipe("max_attemps", value=2), "max_attemps",
     "did you mean 'max_attempts'"),
    ("bad price", _set("prices", "claude-haiku-4-5", value={"input": -1}), "claude-haiku-4-5",
     "input"),
    ("state_dir under a file", _set("state_dir", value="tickets.csv/state"), "state_dir",
     "cannot be written"),
    ("sink path under a file", _pipe("sink", 1, "path", value="tickets.csv/out"), "path",
     "cannot be written"),
    ("sqlite sink path is a directory", _sqlite_path_is_a_directory, "path",
     "is a directory"),
    # What the API would reject in every row (the SDK's params types, batch-only rules):
    # without these checks, every row came back invalid_request_error after the batch ran.
    ("extra unknown field", _pipe("request", "extra", value={"foo": 1}), "extra.foo",
     "Extra inputs are not permitted"),
    ("extra stream", _pipe("request", "extra", value={"stream": True}), "extra.stream",
     "not supported in Message Batches"),
    ("extra speed", _pipe("request", "extra", value={"speed": "fast"}), "extra.speed",
     "not available in Message Batches"),
    ("extra service_tier", _pipe("request", "extra", value={"service_tier": "priority"}),
     "extra.service_tier", "'priority'"),
    ("extra metadata key", _pipe("request", "extra", value={"metadata": {"user": "etl"}}),
     "extra.metadata", "metadata.user"),
    ("server tool type", _pipe("request", "tools", value=[
        {"name": "web_search", "type": "web_searchzz"}]), "tools", "'web_searchzz'"),
    ("tool cache ttl", _pipe("request", "tools", value=[
        {"name": "label", "input_schema": {"type": "object"},
         "cache_control": {"type": "ephemeral", "ttl": "10m"}}]), "tools", "'10m'"),
    ("cache breakpoints out of order", _cache_1h_after_5m, "cache", "1h cache breakpoint"),
    # Every call of the run would fail (400 unknown anthropic-version), or never connect.
    ("api version unknown", _set("api", "version", value="2026-10-22"), "version",
     "'2026-10-22'"),
    ("api base_url not a URL", _set("api", "base_url", value="not a url"), "base_url",
     "'not a url'"),
    # Text rules cannot apply to JSON answers: the labels would silently not be enforced.
    ("allowed with output_schema", _json_answers_with_allowed("output_schema"), "allowed",
     "output_schema"),
    ("allowed with a forced tool", _json_answers_with_allowed("tool_choice"), "allowed",
     "tool_choice"),
    ("api base_url no scheme", _set("api", "base_url", value="127.0.0.1:8765"), "base_url",
     "http://"),
]


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    write_tickets(tmp_path / "tickets.csv", 30, seed=3)
    return tmp_path


def _write(root: Path, edit: Edit | None = None) -> Path:
    config = _config(root)
    if edit is not None:
        edit(config, root)
    path = root / "pipeline.toml"
    path.write_text(dump_toml(config), encoding="utf-8")
    return path


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


class TestBadConfigs:
    @pytest.mark.parametrize(("edit", "key", "phrase"), [case[1:] for case in BAD],
                             ids=[case[0] for case in BAD])
    def test_validate_and_run_agree(self, workspace: Path, capsys: pytest.CaptureFixture[str],
                                    monkeypatch: pytest.MonkeyPatch, edit: Edit, key: str,
                                    phrase: str) -> None:
        """Both commands exit 2, name the key, and print the same problems."""
        monkeypatch.chdir(workspace)
        monkeypatch.setenv("ANTHROPIC_BASE_URL", "http://127.0.0.1:9")  # never reached
        path = _write(workspace, edit)
        code, out, _ = _cli(capsys, "validate", str(path), "--json")
        assert code == 2, out
        report = json.loads(out)
        assert not report["ok"]
        messages = [p["message"] for p in report["problems"]]
        assert any(key in m and phrase in m for m in messages), messages
        assert all(m.startswith(str(path)) or str(path) in m for m in messages), messages

        code, _, err = _cli(capsys, "run", str(path), "--until-drained")
        assert code == 2, err
        assert "Traceback" not in err
        run_lines = [line.removeprefix("batchd: config error: ") for line in err.splitlines()
                     if line.startswith("batchd: config error: ")]
        assert run_lines == messages
        assert not (workspace / "state" / "manifest.jsonl").exists()  # nothing was started

    def test_every_problem_is_listed(self, workspace: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
        """Several mistakes in several tables come back together, not one per run."""
        edits = [case[1] for case in BAD if case[0] in (
            "log_level typo", "metrics port too big", "poll_interval zero", "sink type typo",
            "sink option typo", "template field typo", "pipeline typo")]

        def all_of(config: dict[str, Any], root: Path) -> None:
            for edit in edits:
                edit(config, root)

        path = _write(workspace, all_of)
        code, out, _ = _cli(capsys, "validate", str(path))
        assert code == 2
        for fragment in ("log_level", "port", "poll_interval", "sqlit", "pth: unknown", "{bdy}",
                         "max_attemps"):
            assert fragment in out, out
        assert "7 problems" in out

    def test_json_locates_the_key(self, workspace: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
        """--json gives file, table, key and a suggestion apart."""
        path = _write(workspace, _pipe("sink", 0, "type", value="sqlit"))
        code, out, _ = _cli(capsys, "validate", str(path), "--json")
        assert code == 2
        (problem,) = json.loads(out)["problems"]
        assert problem["file"] == str(path)
        assert problem["table"] == "[[pipeline.sink]] #1 of 'tickets'"
        assert problem["key"] == "type"
        assert problem["hint"] == "did you mean 'sqlite'?"

    def test_metrics_port_in_use(self, workspace: Path, capsys: pytest.CaptureFixture[str],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
        """A port another program holds: validate says so; run stops with exit 2, cleanly."""
        monkeypatch.setenv("ANTHROPIC_BASE_URL", "http://127.0.0.1:9")
        with socket.socket() as held:
            held.bind(("127.0.0.1", 0))
            held.listen()
            port = held.getsockname()[1]
            path = _write(workspace, _set("metrics", "port", value=port))
            code, out, _ = _cli(capsys, "validate", str(path))
            assert code == 2
            assert f"[metrics]: port: cannot listen on 127.0.0.1:{port}" in out
            code, _, err = _cli(capsys, "run", str(path), "--until-drained")
            assert code == 2, err
            assert f"[metrics]: port: cannot listen on 127.0.0.1:{port}" in err
            assert "Traceback" not in err
        assert not (workspace / "state" / "manifest.jsonl").exists()

    def test_real_process_exit_code(self, workspace: Path) -> None:
        """As systemd sees it: the process exits 2 with one line per problem, no traceback."""
        path = _write(workspace, _set("log_level", value="verbose"))
        for command in ("validate", "run", "status", "estimate"):
            proc = subprocess.run([sys.executable, "-m", "batchd.daemon.cli", command, str(path)],
                                  capture_output=True, text=True, cwd=REPO, timeout=60)
            assert proc.returncode == 2, (command, proc.stderr, proc.stdout)
            assert "log_level" in proc.stdout + proc.stderr
            assert "Traceback" not in proc.stderr


class TestGoodConfig:
    def test_ok(self, workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
        path = _write(workspace)
        code, out, _ = _cli(capsys, "validate", str(path))
        assert code == 0, out
        assert out.rstrip().endswith(f"OK: {path}")
        assert not (workspace / "state").exists()  # validate writes nothing
        assert not (workspace / "out").exists()

    def test_unknown_model_price_is_a_warning(self, workspace: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
        path = _write(workspace, _pipe("request", "model", value="claude-future-9"))
        code, out, _ = _cli(capsys, "validate", str(path))
        assert code == 0
        assert "warning:" in out and "claude-future-9" in out


@pytest.fixture
def pg_config(workspace: Path, pg_dsn: str,
              monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], Path]]:
    def make(dsn: str) -> Path:
        monkeypatch.setenv("VALIDATE_TEST_DSN", dsn)
        return _write(workspace, _pipe("sink", value=[
            {"type": "postgres", "dsn": "env:VALIDATE_TEST_DSN", "table": "validate_probe"}]))
    yield make


class TestConnect:
    def test_database_and_api_accept_the_credentials(
        self, pg_config: Callable[[str], Path], pg_dsn: str, emulator: EmulatorThread,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """--connect opens (and closes) a real connection and asks the API once."""
        monkeypatch.setenv("ANTHROPIC_BASE_URL", emulator.base_url)
        monkeypatch.setenv("ANTHROPIC_API_KEY", "test-key")
        path = pg_config(pg_dsn)
        code, out, _ = _cli(capsys, "validate", str(path), "--connect", "--json")
        report = json.loads(out)
        assert code == 0 and report["problems"] == [], report
        assert any("accepts the key" in line for line in report["checked"])

    def test_missing_api_key(self, workspace: Path, capsys: pytest.CaptureFixture[str],
                             monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
        monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
        code, out, _ = _cli(capsys, "validate", str(_write(workspace)), "--connect")
        assert code == 2 and "no API key" in out

    def test_wrong_database_is_named(self, pg_config: Callable[[str], Path], pg_dsn: str,
                                     capsys: pytest.CaptureFixture[str]) -> None:
        bad = pg_dsn.rsplit("/", 1)[0] + "/no_such_database_batchd"
        path = pg_config(bad)
        code, out, _ = _cli(capsys, "validate", str(path), "--connect")
        assert code == 2
        assert "postgres sink" in out and "no_such_database_batchd" in out
        code, out, _ = _cli(capsys, "validate", str(path))  # without --connect: not checked
        assert code == 0, out


def test_an_unreachable_broker_is_one_line(workspace: Path, emulator: EmulatorThread) -> None:
    """A Kafka sink whose broker refuses: one problem line naming the sink, the client's
    error class once, and nothing else on stderr (aiokafka logs the refusal itself)."""
    def kafka_sink(config: dict[str, Any], root: Path) -> None:
        config["pipeline"][0]["sink"] = [{"type": "kafka", "topic": "out",
                                          "bootstrap_servers": "127.0.0.1:9"}]

    path = _write(workspace, kafka_sink)
    env = {**os.environ, "ANTHROPIC_BASE_URL": emulator.base_url, "ANTHROPIC_API_KEY": "k",
           "BATCHD_LOAD_PLUGINS": ""}
    run = subprocess.run([sys.executable, "-m", "batchd.daemon.cli", "validate", str(path),
                          "--connect"], capture_output=True, text=True, env=env, timeout=60,
                         cwd=workspace)
    assert run.returncode == 2, run.stdout + run.stderr
    assert run.stderr == ""
    errors = [line for line in run.stdout.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, run.stdout
    assert "[[pipeline.sink]] #1 of 'tickets'" in errors[0]
    assert errors[0].count("KafkaConnectionError") == 1, errors[0]


class TestEmulatorFlags:
    """The emulator's own flags are configuration too: exit 2, the flag named."""

    @pytest.mark.parametrize(("flags", "named"), [
        (["--port", "99999"], "--port"),
        (["--port", "-1"], "--port"),
        (["--latency", "soon"], "--latency"),
        (["--rules", "/nonexistent/rules.toml"], "rules"),
        (["--queue-limit", "0"], "--queue-limit"),  # every create would be refused forever
        (["--queue-limit", "-5"], "--queue-limit"),
    ])
    def test_bad_flag(self, flags: list[str], named: str) -> None:
        proc = subprocess.run([sys.executable, "-m", "batchd.daemon.cli", "emulator", *flags],
                              capture_output=True, text=True, cwd=REPO, timeout=60)
        assert proc.returncode == 2, proc.stderr
        assert named in proc.stderr and "Traceback" not in proc.stderr

    def test_port_in_use(self) -> None:
        with socket.socket() as held:
            held.bind(("127.0.0.1", 0))
            held.listen()
            port = held.getsockname()[1]
            proc = subprocess.run([sys.executable, "-m", "batchd.daemon.cli", "emulator", "--port",
                                   str(port)], capture_output=True, text=True, cwd=REPO,
                                  timeout=60)
        assert proc.returncode == 2, proc.stderr
        assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr
