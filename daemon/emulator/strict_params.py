"""
Strict Messages params for a batch row, as the installed SDK's types define them.

The API rejects a field it does not know ("Extra inputs are not permitted")
and a value outside its enum or range; a batch reports that as the row's
``invalid_request_error`` when the batch ends. The allowed top-level fields
and the enum values are read from the SDK's TypedDicts and Literals
(``anthropic/types/message_create_params.py`` and friends, see sdk_tables.py),
so a new SDK release moves the emulator with it instead of a hand-kept list
going stale.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from batchd.daemon.emulator.sdk_tables import SdkTables, sdk_tables
from batchd.daemon.emulator.versions import ApiVersion

__all__ = ("BATCH_REJECTED", "SdkTables", "allowed_fields", "check_strict", "sdk_tables")

_CUSTOM_TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,128}$")
_MAX_MESSAGES = 100_000


#: Params the API takes on /v1/messages but not in a batch row (BATCH), and why.
BATCH_REJECTED: dict[str, str] = {
    "speed": "fast mode (speed) is not available in Message Batches",
    "store": "store is not supported in Message Batches",
    "previous_thread_event_id": "previous_thread_event_id is not supported in Message Batches",
    "cache_hint": "cache_hint is not supported in Message Batches",
    "context_hint": "context_hint is not supported in Message Batches",
    "research_preview_2026_02": "research previews are not available in Message Batches",
}
_INFERENCE_GEOS = frozenset({"global", "us"})


def allowed_fields(version: ApiVersion, beta: bool) -> frozenset[str]:
    """The top-level params a row may carry under ``version`` (``beta``: created via beta)."""
    tables = sdk_tables()
    return (tables.beta_fields if beta else tables.fields) | version.legacy_params


class _Invalid(Exception):
    """One problem, its message naming the field."""


def _extra(where: str) -> _Invalid:
    return _Invalid(f"{where}: Extra inputs are not permitted")


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _Invalid(f"{where}: Input should be an object")
    return value


def _only(value: Mapping[str, Any], allowed: Any, where: str) -> None:
    for key in value:
        if key not in allowed:
            raise _extra(f"{where}.{key}")


def _choice(value: Any, allowed: Any, where: str) -> None:
    if value not in allowed:
        shown = ", ".join(repr(v) for v in sorted(allowed, key=str))
        raise _Invalid(f"{where}: Input should be one of {shown}, got {value!r}")


def _string(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"{where}: Input should be a valid string")
    return value


def _integer(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Invalid(f"{where}: Input should be a valid integer, got {value!r}")
    return value


def _cache_control(value: Any, where: str) -> None:
    if value is None:
        return
    control = _object(value, where)
    _only(control, sdk_tables().cache_control, where)
    _choice(control.get("type"), {"ephemeral"}, f"{where}.type")
    if control.get("ttl") is not None:
        _choice(control["ttl"], sdk_tables().ttl_values, f"{where}.ttl")


def _text_blocks(value: Any, where: str) -> None:
    """``system``: a string or a list of text blocks."""
    if isinstance(value, str):
        return
    if not isinstance(value, list):
        raise _Invalid(f"{where}: Input should be a string or a list of text blocks")
    for index, block in enumerate(value):
        here = f"{where}.{index}"
        block = _object(block, here)
        _choice(block.get("type"), {"text"}, f"{here}.type")
        _string(block.get("text"), f"{here}.text")
        _cache_control(block.get("cache_control"), f"{here}.cache_control")


def _messages(value: Any) -> None:
    if value is None:
        raise _Invalid("messages: Field required")
    if not isinstance(value, list) or not value:
        raise _Invalid("messages: at least one message is required")
    if len(value) > _MAX_MESSAGES:
        raise _Invalid(f"messages: at most {_MAX_MESSAGES} messages are allowed")
    last = len(value) - 1
    for position, message in enumerate(value):
        where = f"messages.{position}"
        if not isinstance(message, dict):
            raise _Invalid(f"{where}: expected an object with role and content")
        role = message.get("role")
        role_blocks = sdk_tables().role_blocks
        if role not in role_blocks:
            roles = ", ".join(repr(r) for r in sorted(role_blocks))
            raise _Invalid(f"{where}.role: Input should be one of {roles}, got {role!r}")
        content = message.get("content")
        if isinstance(content, list):
            allowed = role_blocks[role]
            for index, block in enumerate(content):
                if not isinstance(block, dict) or not isinstance(block.get("type"), str):
                    raise _Invalid(f"{where}.content.{index}: every block needs a type")
                if block["type"] not in allowed:
                    raise _Invalid(
                        f"{where}.content.{index}.type: {block['type']!r} is not a "
                        f"{role} content block type"
                    )
                _cache_control(block.get("cache_control"), f"{where}.content.{index}.cache_control")
        elif not isinstance(content, str):
            raise _Invalid(f"{where}.content: Input should be a string or a list of blocks")
        final_assistant = position == last and role == "assistant"
        empty = content == [] or (isinstance(content, str) and not content.strip())
        if empty and not final_assistant:
            raise _Invalid(
                "messages: all messages must have non-empty content except for the "
                "optional final assistant message"
            )
    if value[0].get("role") != "user":
        raise _Invalid('messages: first message must use the "user" role')


def _thinking(value: Any, max_tokens: int) -> None:
    thinking = _object(value, "thinking")
    tables = sdk_tables()
    kind = str(thinking.get("type"))
    _choice(thinking.get("type"), tables.thinking, "thinking.type")
    _only(thinking, tables.thinking[kind], f"thinking.{kind}")
    if thinking.get("display") is not None:
        _choice(thinking["display"], tables.display_values, f"thinking.{kind}.display")
    if kind == "enabled":
        if "budget_tokens" not in thinking:
            raise _Invalid("thinking.enabled.budget_tokens: Field required")
        budget = _integer(thinking["budget_tokens"], "thinking.enabled.budget_tokens")
        if budget < 1024:
            raise _Invalid(
                f"thinking.enabled.budget_tokens: Input should be greater than or equal to "
                f"1024, got {budget}"
            )
        if budget >= max_tokens:
            raise _Invalid(
                f"thinking.enabled.budget_tokens: `max_tokens` must be greater than "
                f"`thinking.budget_tokens` ({max_tokens} <= {budget})"
            )


def _output_config(value: Any) -> None:
    config = _object(value, "output_config")
    tables = sdk_tables()
    _only(config, tables.output_config, "output_config")
    if config.get("effort") is not None:
        _choice(config["effort"], tables.effort_values, "output_config.effort")
    if config.get("format") is not None:
        _format(config["format"], "output_config.format")


def _format(value: Any, where: str) -> None:
    fmt = _object(value, where)
    _only(fmt, {"type", "schema"}, where)
    _choice(fmt.get("type"), {"json_schema"}, f"{where}.type")
    schema = _object(fmt.get("schema"), f"{where}.schema")
    if schema.get("type", "object") != "object":
        raise _Invalid(f"{where}.schema.type: the root of an output schema must be an object")


def _tools(value: Any) -> set[str]:
    """Check ``tools`` and return their names."""
    if not isinstance(value, list):
        raise _Invalid("tools: Input should be a list")
    names: set[str] = set()
    for index, tool in enumerate(value):
        where = f"tools.{index}"
        tool = _object(tool, where)
        kind = tool.get("type") or "custom"
        tools = sdk_tables().tools
        if kind not in tools:
            raise _Invalid(f"{where}.type: unknown tool type {kind!r}")
        _only(tool, tools[kind], where)
        name = _string(tool.get("name"), f"{where}.name")
        if kind == "custom":
            if not _CUSTOM_TOOL_NAME.fullmatch(name):
                raise _Invalid(f"{where}.name: {name!r} does not match ^[a-zA-Z0-9_-]{{1,128}}$")
            schema = _object(tool.get("input_schema"), f"{where}.input_schema")
            if schema.get("type") != "object":
                raise _Invalid(f"{where}.input_schema.type: Input should be 'object'")
        if name in names:
            raise _Invalid(f"{where}.name: tool names must be unique, {name!r} is repeated")
        names.add(name)
        _cache_control(tool.get("cache_control"), f"{where}.cache_control")
    return names


def _tool_choice(value: Any, tool_names: set[str] | None) -> None:
    choice = _object(value, "tool_choice")
    choices = sdk_tables().tool_choices
    kind = str(choice.get("type"))
    _choice(choice.get("type"), choices, "tool_choice.type")
    _only(choice, choices[kind], f"tool_choice.{kind}")
    if kind in ("any", "tool") and not tool_names:
        raise _Invalid(f"tool_choice.type: {kind!r} requires `tools` to be given")
    if kind == "tool":
        name = _string(choice.get("name"), "tool_choice.tool.name")
        if tool_names is not None and name not in tool_names:
            raise _Invalid(f"tool_choice.tool.name: no tool named {name!r} in `tools`")


def _sampling_ranges(params: Mapping[str, Any]) -> None:
    for name, low, high in (("temperature", 0.0, 1.0), ("top_p", 0.0, 1.0)):
        value = params.get(name)
        if value is None:
            continue
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or not low <= value <= high:
            raise _Invalid(f"{name}: must be a number within {low:g}..{high:g}, got {value!r}")
    if params.get("top_k") is not None:
        if _integer(params["top_k"], "top_k") < 0:
            raise _Invalid(f"top_k: must be >= 0, got {params['top_k']}")


def check_strict(
    params: dict[str, Any],
    version: ApiVersion,
    *,
    beta: bool = False,
    user_profile_id: str | None = None,
    workspace_id: str | None = None,
) -> str | None:
    """
    The message for the first schema problem of a row's params, or None.

    ``user_profile_id``/``workspace_id`` are the batch's headers: a row whose
    body field names another one is errored (SDK `batches.create` docstring).
    """
    try:
        _check(params, version, beta, user_profile_id, workspace_id)
    except _Invalid as problem:
        return str(problem)
    return None


def _check(
    params: dict[str, Any],
    version: ApiVersion,
    beta: bool,
    user_profile_id: str | None,
    workspace_id: str | None,
) -> None:
    allowed = allowed_fields(version, beta)
    for key in params:
        if key in BATCH_REJECTED:
            raise _Invalid(f"{key}: {BATCH_REJECTED[key]}")
        if key not in allowed and key not in version.removed_params:
            raise _extra(key)
    model = params.get("model")
    if model is None:
        raise _Invalid("model: Field required")
    if not isinstance(model, str) or not model:
        raise _Invalid("model: Input should be a non-empty string")
    if "max_tokens" not in params:
        raise _Invalid("max_tokens: Field required")
    max_tokens = _integer(params["max_tokens"], "max_tokens")
    if max_tokens < 1:
        raise _Invalid(f"max_tokens: must be an integer >= 1 in a batch, got {max_tokens}")
    _messages(params.get("messages"))
    if params.get("stream"):
        raise _Invalid("stream: streaming is not supported in Message Batches")
    if params.get("system") is not None:
        _text_blocks(params["system"], "system")
    if params.get("thinking") is not None:
        _thinking(params["thinking"], max_tokens)
    if params.get("output_config") is not None:
        _output_config(params["output_config"])
    if version.output_format_alias and params.get("output_format") is not None:
        _format(params["output_format"], "output_format")
    tool_names = _tools(params["tools"]) if params.get("tools") is not None else None
    if params.get("tool_choice") is not None:
        _tool_choice(params["tool_choice"], tool_names)
    _cache_control(params.get("cache_control"), "cache_control")
    if params.get("service_tier") is not None:
        _choice(params["service_tier"], sdk_tables().service_tiers, "service_tier")
    if params.get("inference_geo") is not None:
        _choice(params["inference_geo"], _INFERENCE_GEOS, "inference_geo")
    if params.get("metadata") is not None:
        metadata = _object(params["metadata"], "metadata")
        _only(metadata, {"user_id"}, "metadata")
        if metadata.get("user_id") is not None:
            _string(metadata["user_id"], "metadata.user_id")
    stops = params.get("stop_sequences")
    if stops is not None and (
        not isinstance(stops, list) or not all(isinstance(s, str) for s in stops)
    ):
        raise _Invalid("stop_sequences: Input should be a list of strings")
    _sampling_ranges(params)
    for key, header in (("user_profile_id", user_profile_id), ("workspace_id", workspace_id)):
        value = params.get(key)
        if value is not None:
            _string(value, key)
            if header is not None and value != header:
                raise _Invalid(
                    f"{key}: {value!r} conflicts with the batch's anthropic-"
                    f"{key.replace('_', '-').removesuffix('-id')}-id header {header!r}"
                )
