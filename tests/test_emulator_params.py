"""Strict params: what the SDK's MessageCreateParams allows passes, anything else errors the row."""

from __future__ import annotations

from typing import Any

import pytest
from anthropic.types.message_create_params import MessageCreateParamsNonStreaming

from batchd.daemon.emulator import EmulatorThread
from batchd.daemon.emulator.strict_params import sdk_tables
from tests.fixtures.emulator import ended_results, sdk_client

_GOOD: dict[str, Any] = {
    "model": "claude-haiku-4-5",
    "max_tokens": 64,
    "messages": [{"role": "user", "content": "hello"}],
}
_TOOL = {"name": "lookup", "input_schema": {"type": "object"}}


def _verdicts(emulator: EmulatorThread, rows: dict[str, dict[str, Any]], **create: Any) -> Any:
    requests = [{"custom_id": key, "params": {**_GOOD, **params}} for key, params in rows.items()]
    return ended_results(sdk_client(emulator.base_url), requests, **create)


def test_fields_come_from_the_sdk_type() -> None:
    """The allowed top-level fields are exactly the installed SDK's TypedDict keys."""
    assert frozenset(MessageCreateParamsNonStreaming.__annotations__) == sdk_tables().fields
    assert {"output_config", "thinking", "cache_control", "inference_geo"} <= sdk_tables().fields


def test_every_sdk_field_with_a_valid_value_passes(emulator: EmulatorThread) -> None:
    """One row using every optional field the SDK lists (speed excepted) succeeds."""
    params = {
        "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        "thinking": {"type": "enabled", "budget_tokens": 1024, "display": "omitted"},
        "output_config": {"format": {"type": "json_schema", "schema": {"type": "object"}}},
        "tools": [_TOOL],
        "tool_choice": {"type": "auto", "disable_parallel_tool_use": True},
        "cache_control": {"type": "ephemeral", "ttl": "5m"},
        "metadata": {"user_id": "u-1"},
        "stop_sequences": ["END"],
        "service_tier": "standard_only",
        "inference_geo": "global",
        "container": "container_01abc",
        "diagnostics": {"previous_message_id": "msg_01abc"},
        "user_profile_id": "prof_1",
        "workspace_id": "wrkspc_1",
        "stream": False,
        "max_tokens": 2048,
    }
    assert set(params) | set(_GOOD) == sdk_tables().fields - {"speed"}
    results = _verdicts(emulator, {"all": params})
    assert results["all"]["type"] == "succeeded", results["all"]


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({"output_format": {"type": "json_schema", "schema": {}}},
         "output_format: Extra inputs are not permitted"),
        ({"top_logprobs": 3}, "top_logprobs: Extra inputs are not permitted"),
        ({"stream": True}, "stream:"),
        ({"speed": "fast"}, "speed:"),
        ({"speed": "standard"}, "speed:"),
        ({"store": True}, "store:"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"thinking": {"type": "enabled", "budget_tokens": 1000}, "max_tokens": 4096},
         "thinking.enabled.budget_tokens"),
        ({"thinking": {"type": "enabled", "budget_tokens": 2048}, "max_tokens": 2048},
         "thinking.enabled.budget_tokens"),
        ({"thinking": {"type": "enabled"}}, "budget_tokens: Field required"),
        ({"thinking": {"type": "adaptive", "budget_tokens": 2048}},
         "thinking.adaptive.budget_tokens: Extra inputs"),
        ({"thinking": {"type": "sometimes"}}, "thinking.type"),
        ({"thinking": {"type": "adaptive", "display": "full"}}, "thinking.adaptive.display"),
        ({"output_config": {"effort": "extreme"}}, "output_config.effort"),
        ({"output_config": {"verbosity": "low"}}, "output_config.verbosity"),
        ({"output_config": {"format": {"type": "json_object"}}}, "output_config.format.type"),
        ({"output_config": {"format": {"type": "json_schema", "schema": {"type": "array"}}}},
         "output_config.format.schema.type"),
        ({"cache_control": {"type": "ephemeral", "ttl": "10m"}}, "cache_control.ttl"),
        ({"system": [{"type": "text", "text": "s", "cache_control": {"type": "persistent"}}]},
         "system.0.cache_control.type"),
        ({"service_tier": "priority"}, "service_tier"),
        ({"inference_geo": "eu"}, "inference_geo"),
        ({"metadata": {"user_id": "u", "team": "x"}}, "metadata.team"),
        ({"stop_sequences": "END"}, "stop_sequences"),
        ({"tools": [{"input_schema": {"type": "object"}}]}, "tools.0.name"),
        ({"tools": [{"name": "x"}]}, "tools.0.input_schema"),
        ({"tools": [{"name": "bad name", "input_schema": {"type": "object"}}]}, "tools.0.name"),
        ({"tools": [_TOOL, _TOOL]}, "tools.1.name"),
        ({"tools": [{"type": "web_search_29990101", "name": "web_search"}]}, "tools.0.type"),
        ({"tools": [_TOOL], "tool_choice": {"type": "tool", "name": "other"}},
         "tool_choice.tool.name"),
        ({"tool_choice": {"type": "any"}}, "tool_choice.type"),
        ({"tools": [_TOOL], "tool_choice": {"type": "maybe"}}, "tool_choice.type"),
        ({"messages": [{"role": "system", "content": "x"}, {"role": "user", "content": "y"}]},
         "first message"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
        ({"messages": [{"role": "user", "content": [{"type": "hologram"}]}]},
         "messages.0.content.0.type"),
        ({"system": [{"type": "image", "source": {}}]}, "system.0.type"),
        ({"user_profile_id": "prof_2"}, "anthropic-user-profile-id"),
        ({"temperature": 0.5}, "temperature"),
    ],
)  # fmt: skip
def test_bad_params_error_the_row_naming_the_field(
    emulator: EmulatorThread, params: dict[str, Any], needle: str
) -> None:
    results = _verdicts(emulator, {"bad": params, "good": {}}, user_profile_id="prof_1")
    assert results["good"]["type"] == "succeeded"
    result = results["bad"]
    assert result["type"] == "errored", result
    error = result["error"]["error"]
    assert error["type"] == "invalid_request_error"
    assert needle in error["message"], error["message"]


def test_server_tools_and_system_role_messages_pass(emulator: EmulatorThread) -> None:
    """Server tools by their versioned type, and a later system-role message, are accepted."""
    rows = {
        "server": {"tools": [{"type": "web_search_20250305", "name": "web_search"}]},
        "system_role": {"messages": [
            {"role": "user", "content": "a"}, {"role": "system", "content": "b"},
            {"role": "user", "content": "c"}]},
    }  # fmt: skip
    results = _verdicts(emulator, rows)
    assert {r["type"] for r in results.values()} == {"succeeded"}, results


@pytest.mark.parametrize(
    ("ttls", "needle"),
    [(["5m"] * 5, "at most 4"), (["5m", "1h"], "1h cache breakpoint may not come after")],
)
def test_cache_breakpoint_rules(emulator: EmulatorThread, ttls: list[str], needle: str) -> None:
    blocks = [{"type": "text", "text": f"part {i}", "cache_control": {"type": "ephemeral",
                                                                     "ttl": ttl}}
              for i, ttl in enumerate(ttls)]  # fmt: skip
    results = _verdicts(emulator, {"bad": {"system": blocks}})
    assert needle in results["bad"]["error"]["error"]["message"]
