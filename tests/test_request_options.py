"""
``[pipeline.request]`` options for today's models: each config mistake is a config error
naming file, table and key; what is sent is exactly what the installed SDK's types describe.
"""

from __future__ import annotations

import json
import typing
from pathlib import Path
from typing import Any

import pydantic
import pytest
from anthropic.types.message_create_params import MessageCreateParamsNonStreaming

from batchd.daemon.config import load_config
from batchd.daemon.intake.request_options import SDK_API_VERSION
from batchd.daemon.intake.shaper import Shaper
from batchd.plugins.errors import ConfigError
from batchd.plugins.records import Record
from tests.fixtures.engine import dump_toml

SDK_PARAMS = frozenset(typing.get_type_hints(MessageCreateParamsNonStreaming))
SCHEMA = {
    "type": "object",
    "properties": {"label": {"type": "string", "enum": ["bug", "billing"]},
                   "urgent": {"type": "boolean"}},
    "required": ["label", "urgent"],
    "additionalProperties": False,
}


def write(tmp_path: Path, request: dict[str, Any], api: dict[str, Any] | None = None) -> Path:
    data: dict[str, Any] = {"state_dir": "state"}
    if api:
        data["api"] = api
    data["pipeline"] = [{
        "name": "tickets",
        "source": {"type": "csv", "path": "t.csv", "key": "id"},
        "request": {"model": "claude-haiku-5-5", "max_tokens": 64, "user": "{body}", **request},
        "sink": [{"type": "jsonl", "path": "out"}],
    }]
    path = tmp_path / "pipeline.toml"
    path.write_text(dump_toml(data), encoding="utf-8")
    return path


def shaped(tmp_path: Path, request: dict[str, Any], **api: Any) -> dict[str, Any]:
    config = load_config(write(tmp_path, request, api or None))
    params = Shaper(config.pipelines[0]).params(Record("1", {"body": "printer on fire"}, {}))
    return params


def sdk_check(params: dict[str, Any]) -> None:
    """Every key is one the installed SDK's MessageCreateParams has, and the values fit it."""
    assert set(params) <= SDK_PARAMS, set(params) - SDK_PARAMS
    pydantic.TypeAdapter(MessageCreateParamsNonStreaming).validate_python(params)


class TestConfigErrors:
    @pytest.mark.parametrize(
        ("request_", "key", "words"),
        [
            ({"temperature": 0.2}, "temperature", "2026-10-21"),
            ({"top_p": 0.9}, "top_p", "even at their defaults"),
            ({"top_k": 5}, "top_k", 'version = "2023-06-01"'),
            ({"extra": {"temperature": 0.2}}, "extra.temperature", "own option"),
            ({"output_format": {"type": "json_schema", "schema": SCHEMA}}, "output_format",
             "output_schema"),
            ({"thinking": "enabled"}, "thinking", "budget_tokens = N"),
            ({"thinking": {"budget_tokens": 500}}, "thinking", "at least 1024"),
            ({"thinking": "sometimes"}, "thinking", "not a thinking mode"),
            ({"thinking": {"type": "adaptive", "budget_tokens": 2000}}, "thinking",
             "manual thinking only"),
            ({"effort": "extreme"}, "effort", "low, medium, high, xhigh, max"),
            ({"cache": "10m"}, "cache", '"5m" or "1h"'),
            ({"inference_geo": "eu"}, "inference_geo", '"global" or "us"'),
            ({"output_schema": {"type": "array"}}, "output_schema", "root must be type"),
            ({"output_schema": {"type": "object", "properties": {"a": {"type": "strin"}}}},
             "output_schema", "not a valid JSON Schema at properties/a/type"),
            ({"output_schema": "missing.json"}, "output_schema", "missing.json not found"),
            ({"tools": [{"name": "label"}]}, "tools[0]", "input_schema"),
            ({"tools": [{"name": "x", "input_schema": {"type": "object"}, "colour": 1}]},
             "tools[0]", "unknown key 'colour'"),
            ({"tools": [{"name": "x", "input_schema": {"type": "object"}}],
              "tool_choice": {"type": "tool", "name": "y"}}, "tool_choice", "not one of"),
            ({"tool_choice": "any"}, "tool_choice", "no tools are defined"),
            ({"stop_sequences": ["", "x"]}, "stop_sequences", "non-empty"),
        ],
    )
    def test_each_rule_names_its_key(
        self, tmp_path: Path, request_: dict[str, Any], key: str, words: str
    ) -> None:
        """A bad option is a ConfigError naming the file, the table and the key, and why."""
        with pytest.raises(ConfigError) as info:
            load_config(write(tmp_path, request_))
        message = str(info.value)
        assert str(tmp_path / "pipeline.toml") in message
        assert "[pipeline.request]" in message and "'tickets'" in message
        assert f"{key}:" in message and words in message, message

    def test_sampling_is_allowed_under_the_old_version(self, tmp_path: Path) -> None:
        """[api] version = "2023-06-01" lets temperature through (and it is sent as given)."""
        params = shaped(tmp_path, {"temperature": 1}, version="2023-06-01")
        assert params["temperature"] == 1.0

    @pytest.mark.parametrize(("api", "key"), [({"version": "latest"}, "version"),
                                              ({"tier": "gold"}, "tier"),
                                              ({"queue_limit": 0}, "queue_limit")])
    def test_api_table_rules(self, tmp_path: Path, api: dict[str, Any], key: str) -> None:
        with pytest.raises(ConfigError, match=rf"\[api\]: {key}:"):
            load_config(write(tmp_path, {}, api))

    def test_version_defaults_to_the_sdks(self, tmp_path: Path) -> None:
        """What the installed SDK sends is the default: 2026-10-21 for anthropic 2.x."""
        from anthropic._constants import ANTHROPIC_API_VERSION

        assert load_config(write(tmp_path, {})).api.version == SDK_API_VERSION == "2026-10-21"
        assert SDK_API_VERSION == ANTHROPIC_API_VERSION


class TestShaping:
    def test_output_schema_is_output_config_format(self, tmp_path: Path) -> None:
        """Structured output goes out as output_config.format (never a top-level
        output_format, which the SDK's types do not have)."""
        params = shaped(tmp_path, {"output_schema": SCHEMA, "effort": "low"})
        assert params["output_config"] == {
            "effort": "low", "format": {"type": "json_schema", "schema": SCHEMA}}
        assert "output_format" not in params
        sdk_check(params)

    def test_output_schema_from_a_file(self, tmp_path: Path) -> None:
        """A string names a JSON file beside the config."""
        (tmp_path / "label.schema.json").write_text(json.dumps(SCHEMA))
        params = shaped(tmp_path, {"output_schema": "label.schema.json"})
        assert params["output_config"]["format"]["schema"] == SCHEMA

    @pytest.mark.parametrize(
        ("thinking", "sent"),
        [("disabled", {"type": "disabled"}), ("adaptive", {"type": "adaptive"}),
         ({"budget_tokens": 2048}, {"type": "enabled", "budget_tokens": 2048}),
         ({"type": "adaptive", "display": "omitted"}, {"type": "adaptive", "display": "omitted"})],
    )
    def test_thinking(self, tmp_path: Path, thinking: Any, sent: dict[str, Any]) -> None:
        params = shaped(tmp_path, {"thinking": thinking, "max_tokens": 4096})
        assert params["thinking"] == sent
        sdk_check(params)

    def test_cache_marks_the_system_prompt_and_the_tools(self, tmp_path: Path) -> None:
        """cache = "1h" puts cache_control with the TTL on the system block and the last tool."""
        tools = [{"name": "a", "input_schema": {"type": "object"}},
                 {"name": "b", "input_schema": {"type": "object"}, "description": "B"}]
        params = shaped(tmp_path, {"cache": "1h", "system": "S" * 100, "tools": tools,
                                   "tool_choice": "auto"})
        marker = {"type": "ephemeral", "ttl": "1h"}
        assert params["system"] == [{"type": "text", "text": "S" * 100, "cache_control": marker}]
        assert "cache_control" not in params["tools"][0]
        assert params["tools"][1]["cache_control"] == marker
        assert params["tool_choice"] == {"type": "auto"}
        sdk_check(params)

    def test_legacy_cache_system_means_five_minutes(self, tmp_path: Path) -> None:
        params = shaped(tmp_path, {"cache_system": True, "system": "S"})
        assert params["system"][0]["cache_control"] == {"type": "ephemeral", "ttl": "5m"}

    def test_every_option_together_fits_the_sdk(self, tmp_path: Path) -> None:
        """The whole set at once is still a valid MessageCreateParams for the installed SDK."""
        params = shaped(tmp_path, {
            "system": "Classify.", "thinking": "disabled", "effort": "low",
            "output_schema": SCHEMA, "stop_sequences": ["\n\n"], "cache": "5m",
            "inference_geo": "us", "extra": {"metadata": {"user_id": "u1"}},
        })
        sdk_check(params)
        assert params["inference_geo"] == "us" and params["stop_sequences"] == ["\n\n"]


class TestApiVersionEndToEnd:
    def test_pinned_version_is_sent_logged_and_shown(
        self, emulator_factory: Any, workspace: Any
    ) -> None:
        """[api] version = "2023-06-01" is the anthropic-version of every call, the start-up
        log names it, status shows it, and a model that takes temperature 1 answers."""
        from tests.fixtures.engine import RULES_PATH, describe

        emulator = emulator_factory(rules=RULES_PATH)
        ws = workspace(emulator.base_url)
        ws.write_tickets(30)
        table = ws.pipeline()
        table["request"] = {"model": "claude-haiku-5-5", "max_tokens": 8, "user": "{body}",
                            "thinking": "disabled", "temperature": 1}
        ws.write_raw(dump_toml({"state_dir": "state", "api": {"poll_interval": "0.1s",
                                                              "version": "2023-06-01"},
                                "pipeline": [table]}))
        proc = ws.run()
        assert proc.returncode == 0, describe(proc)
        assert "2023-06-01" in proc.stdout + proc.stderr  # logged at start
        assert set(emulator.stats()["api_versions"]) == {"2023-06-01"}
        assert ws.status()["api_version"] == "2023-06-01"
        assert len(ws.outputs().results) == 30

    def test_default_version_is_the_sdks(self, emulator: Any, workspace: Any) -> None:
        from tests.fixtures.engine import describe

        ws = workspace(emulator.base_url)
        ws.write_tickets(5)
        ws.write_config(allowed=None)
        proc = ws.run()
        assert proc.returncode == 0, describe(proc)
        assert set(emulator.stats()["api_versions"]) == {SDK_API_VERSION}
        assert ws.status()["api_version"] == SDK_API_VERSION


def test_cli_exits_2_naming_the_key(tmp_path: Path) -> None:
    """`batchd run` and `batchd estimate` with temperature under 2026-10-21: exit 2, one line."""
    import subprocess

    from tests.fixtures.engine import BATCHD

    path = write(tmp_path, {"temperature": 0.0})
    (tmp_path / "t.csv").write_text("id,body\n1,hello\n")  # the config's only other mistake
    for command in ("run", "estimate"):
        proc = subprocess.run([*BATCHD, command, str(path)], capture_output=True, text=True,
                              timeout=60, cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
        assert "[pipeline.request] of 'tickets': temperature: API version 2026-10-21" in (
            proc.stderr)
    assert not (tmp_path / "state").exists()
