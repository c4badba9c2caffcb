"""
The TOML config and the human units in it: every mistake names the file,
the table and the key, and a valid file gives the documented defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from batchd.daemon.config import MAX_BATCH_BYTES, load_config
from batchd.daemon.durations import parse_duration, parse_size
from batchd.plugins.errors import ConfigError
from tests.fixtures.engine import Workspace, dump_toml

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tickets" / "pipeline.toml"


def write(tmp_path: Path, api: dict[str, Any] | None = None, top: dict[str, Any] | None = None,
          **pipeline: Any) -> Path:
    """A config like the demo's with changes; returns its path."""
    ws = Workspace(tmp_path)
    data: dict[str, Any] = {"state_dir": "state", **(top or {})}
    if api is not None:
        data["api"] = api
    data["pipeline"] = [ws.pipeline(**pipeline)]
    return ws.write_raw(dump_toml(data))


def error_of(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    return message


class TestDurations:
    @pytest.mark.parametrize(
        ("text", "seconds"),
        [("30", 30.0), (1.5, 1.5), (0, 0.0), ("500ms", 0.5), ("30s", 30.0), ("5m", 300.0),
         ("24h", 86400.0), ("29d", 29 * 86400.0), (" 2 s ", 2.0), ("0.05s", 0.05)],
    )
    def test_parses(self, text: str | float, seconds: float) -> None:
        """Bare numbers are seconds; ms, s, m, h and d scale them."""
        assert parse_duration(text) == pytest.approx(seconds)

    @pytest.mark.parametrize("text", ["30 sec", "-1s", "1w", "", "s", True, -3, float("inf"),
                                      float("nan")])
    def test_refuses(self, text: Any) -> None:
        """Anything else names itself in the error."""
        with pytest.raises(ValueError, match="poll_interval"):
            parse_duration(text, what="poll_interval")


class TestSizes:
    @pytest.mark.parametrize(
        ("text", "size"),
        [(1048576, 1048576), ("200MB", 200_000_000), ("256MiB", 256 * 2**20), ("1kb", 1000),
         ("1.5GB", 1_500_000_000), ("10 B", 10), ("7", 7)],
    )
    def test_parses(self, text: str | int, size: int) -> None:
        """Decimal (MB) and binary (MiB) units, case-insensitive."""
        assert parse_size(text) == size

    @pytest.mark.parametrize("text", ["12 bytes", "1TB", "-5", -5, False, "MB"])
    def test_refuses(self, text: Any) -> None:
        """Unknown units, negatives and booleans are errors naming the setting."""
        with pytest.raises(ValueError, match="max_bytes"):
            parse_size(text, what="max_bytes")


class TestLoad:
    def test_demo_config_loads(self) -> None:
        """The shipped example is valid, with its paths relative to its own directory."""
        config = load_config(EXAMPLE)
        assert config.state_dir == EXAMPLE.parent / "state"
        (pipeline,) = config.pipelines
        assert pipeline.batching.max_requests == 1000 and pipeline.batching.linger == 5.0
        assert config.api.poll_interval == 30.0
        assert [s.type for s in pipeline.sinks] == ["sqlite", "jsonl"]

    def test_default_polling_is_calm(self, tmp_path: Path) -> None:
        """Without [api], polls land every 30-60 s (45 s with a third of jitter)."""
        api = load_config(write(tmp_path)).api
        low = api.poll_interval * (1 - api.poll_jitter)
        high = api.poll_interval * (1 + api.poll_jitter)
        assert (round(low), round(high)) == (30, 60)

    def test_units_in_the_file(self, tmp_path: Path) -> None:
        """Durations and sizes written by hand become seconds and bytes."""
        path = write(tmp_path, api={"poll_interval": "250ms", "not_found_window": "2m"},
                     max_bytes="1MB", linger="2s")
        config = load_config(path)
        assert config.api.poll_interval == 0.25 and config.api.not_found_window == 120.0
        assert config.pipelines[0].batching.max_bytes == 1_000_000
        assert config.pipelines[0].batching.linger == 2.0

    def test_state_dir_override(self, tmp_path: Path) -> None:
        """--state-dir (systemd's StateDirectory) wins over the file."""
        config = load_config(write(tmp_path), state_dir=tmp_path / "elsewhere")
        assert config.state_dir == tmp_path / "elsewhere"

    def test_default_dead_letter(self, tmp_path: Path) -> None:
        """Without [pipeline.dead_letter], dead letters go to JSONL under
        STATE/dead-letters/<name> (the state dir is where the service may write)."""
        text = write(tmp_path).read_text()
        text = text.split("\n[pipeline.dead_letter]")[0] + "\n"
        path = tmp_path / "pipeline.toml"
        path.write_text(text)
        config = load_config(path)
        dead = config.pipelines[0].dead_letter
        expected = str(config.state_dir / "dead-letters" / "tickets")
        assert (dead.type, dead.options) == ("jsonl", {"path": expected})


class TestErrors:
    def test_max_bytes_over_the_api_limit(self, tmp_path: Path) -> None:
        """256MiB is more than the API's 256 MB per batch."""
        message = error_of(write(tmp_path, max_bytes="256MiB"))
        assert "max_bytes" in message and f"{MAX_BATCH_BYTES:,}" in message

    def test_bad_size_names_the_key(self, tmp_path: Path) -> None:
        """A size with an unknown unit names max_bytes and shows an example."""
        message = error_of(write(tmp_path, max_bytes="12 parsecs"))
        assert "max_bytes" in message and "'200MB'" in message

    def test_bad_duration_names_the_key(self, tmp_path: Path) -> None:
        """A duration typo in [api] names the key."""
        message = error_of(write(tmp_path, api={"poll_interval": "fast"}))
        assert "poll_interval" in message and "fast" in message

    def test_max_requests_limit(self, tmp_path: Path) -> None:
        """max_requests above 100,000 or below 1 is refused."""
        assert "100,000" in error_of(write(tmp_path, max_requests=200_000))
        assert "must be positive" in error_of(write(tmp_path, max_requests=0))

    def test_boolean_is_not_a_number(self, tmp_path: Path) -> None:
        """max_attempts = true is a type error, not 1."""
        assert "max_attempts" in error_of(write(tmp_path, max_attempts=True))

    def test_api_key_in_file_is_refused(self, tmp_path: Path) -> None:
        """Secrets never come from the config file."""
        message = error_of(write(tmp_path, api={"api_key": "sk-ant-secret"}))
        assert "ANTHROPIC_API_KEY" in message and "sk-ant-secret" not in message

    def test_unknown_top_level_key(self, tmp_path: Path) -> None:
        """A misspelt top-level key suggests the real one."""
        message = error_of(write(tmp_path, top={"stat_dir": "x"}))
        assert "did you mean 'state_dir'?" in message

    def test_bad_pipeline_name(self, tmp_path: Path) -> None:
        """A pipeline name names files, so slashes and spaces are refused."""
        assert "name" in error_of(write(tmp_path, name="my pipeline/1"))

    def test_duplicate_pipeline_names(self, tmp_path: Path) -> None:
        """Two pipelines may not share a name."""
        ws = Workspace(tmp_path)
        path = ws.write_raw(dump_toml({"pipeline": [ws.pipeline(), ws.pipeline()]}))
        assert "'tickets' is used twice" in error_of(path)

    def test_template_with_attribute_access(self, tmp_path: Path) -> None:
        """Templates take plain field names only."""
        assert "plain field name" in error_of(write(tmp_path, user="{body.upper}"))

    def test_missing_config_file(self, tmp_path: Path) -> None:
        """A config path that does not exist says so."""
        assert "config file not found" in error_of(tmp_path / "nope.toml")
