"""
The options of ``[pipeline.request]`` that today's models take, read and shaped.

Each option is checked for shape when the config is read (a typo in a tool
table, a thinking mode that does not exist, a JSON Schema that is not one), so a
mistake is a config error at start, never a batch of ``invalid_request_error``
rows paid for in time. Whether a *model* accepts an option is a separate question
(:mod:`batchd.daemon.models.preflight`, from the model catalog), because the same request may be
sent to a model named per record.

The API version matters for one rule: ``2026-10-21`` (what SDK 2.x sends) rejects
``temperature``/``top_p``/``top_k`` in every request, even at default values,
and a batch validates its rows only after the whole batch has run, so without
this check every row would come back errored hours later.
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from batchd.plugins.errors import ConfigError

__all__ = (
    "API_VERSIONS",
    "CACHE_TTLS",
    "SAMPLING_KEYS",
    "SDK_API_VERSION",
    "RequestOptions",
    "Thinking",
    "check_extra",
    "check_sampling_version",
    "parse_request_options",
)



def _sdk_api_version() -> str:
    """
    The ``anthropic-version`` the installed SDK sends, read from its ``_constants.py``.

    Read rather than imported: importing ``anthropic`` sets up its own logging when
    ``ANTHROPIC_LOG`` is set, and the config is read before batchd's logging (which
    redacts secrets) is in place.
    """
    spec = importlib.util.find_spec("anthropic")
    for location in (spec.submodule_search_locations or []) if spec else []:
        try:
            text = (Path(location) / "_constants.py").read_text(encoding="utf-8")
        except OSError:
            continue
        found = re.search(r'^ANTHROPIC_API_VERSION\s*=\s*"([^"]+)"', text, re.M)
        if found:
            return found.group(1)
    from anthropic._constants import ANTHROPIC_API_VERSION  # the layout changed: import it

    return ANTHROPIC_API_VERSION


#: What the installed SDK sends as ``anthropic-version`` (the default of ``[api] version``).
SDK_API_VERSION: str = _sdk_api_version()
#: Versions whose rules batchd knows; the newest is what SDK 2.x sends.
API_VERSIONS = ("2023-06-01", "2026-10-21")
#: Sampling parameters that ``2026-10-21`` rejects outright.
SAMPLING_KEYS = ("temperature", "top_p", "top_k")
CACHE_TTLS = ("5m", "1h")
EFFORTS = ("low", "medium", "high", "xhigh", "max")
_THINKING_MODES = ("disabled", "adaptive", "enabled", "between_tools")
_DISPLAYS = ("summarized", "omitted")
_TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,128}$")
# The keys a custom tool may have (SDK types/tool_param.py).
_CUSTOM_TOOL_KEYS = frozenset({
    "name", "input_schema", "description", "cache_control", "strict", "defer_loading",
    "allowed_callers", "input_examples", "eager_input_streaming", "type",
})
_TOOL_CHOICES = ("auto", "any", "tool", "none")
# Keys of `extra` that have their own option: two ways to say one thing is a trap.
_OWN_OPTION = {
    "thinking": "thinking", "output_config": "effort / output_schema",
    "tools": "tools", "tool_choice": "tool_choice", "stop_sequences": "stop_sequences",
    "system": "system", "model": "model", "max_tokens": "max_tokens", "messages": "user",
    "inference_geo": "inference_geo", "output_format": "output_schema",
    "cache_control": "cache", "temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
}


class _Table(Protocol):
    """What :mod:`batchd.daemon.config` hands over: one TOML table with typed getters."""

    data: dict[str, Any]

    def get(self, key: str, kind: Any, default: Any = None) -> Any: ...

    def error(self, key: str, message: str) -> ConfigError: ...


@dataclass(frozen=True, slots=True)
class Thinking:
    """A ``thinking`` setting: the mode, and the budget for manual (``enabled``) thinking."""

    type: str
    budget_tokens: int | None = None
    display: str | None = None

    def param(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type}
        if self.budget_tokens is not None:
            out["budget_tokens"] = self.budget_tokens
        if self.display is not None:
            out["display"] = self.display
        return out

    def describe(self) -> str:
        if self.type == "enabled":
            return f"thinking = {{budget_tokens = {self.budget_tokens}}}"
        return f'thinking = "{self.type}"'


@dataclass(frozen=True, slots=True)
class RequestOptions:
    """Everything ``[pipeline.request]`` adds to a request besides model, user and system."""

    thinking: Thinking | None = None
    effort: str | None = None
    output_schema: dict[str, Any] | None = None
    tools: tuple[dict[str, Any], ...] = ()
    tool_choice: dict[str, Any] | None = None
    cache: str | None = None
    stop_sequences: tuple[str, ...] = ()
    sampling: dict[str, float] = field(default_factory=dict)
    inference_geo: str | None = None

    @property
    def forced_tool(self) -> bool:
        return self.tool_choice is not None and self.tool_choice.get("type") in ("any", "tool")

    def params(self, system: str | None) -> dict[str, Any]:
        """The constant part of every request these options shape (model and messages aside)."""
        out: dict[str, Any] = {}
        cache = {"type": "ephemeral", "ttl": self.cache} if self.cache else None
        if system:
            if cache is not None:
                out["system"] = [{"type": "text", "text": system, "cache_control": cache}]
            else:
                out["system"] = system
        if self.tools:
            tools = [dict(t) for t in self.tools]
            if cache is not None and "cache_control" not in tools[-1]:
                # Tools come first in the cached prefix: the breakpoint after the last one
                # caches them all.
                tools[-1]["cache_control"] = cache
            out["tools"] = tools
        if self.tool_choice is not None:
            out["tool_choice"] = dict(self.tool_choice)
        if self.thinking is not None:
            out["thinking"] = self.thinking.param()
        config: dict[str, Any] = {}
        if self.effort is not None:
            config["effort"] = self.effort
        if self.output_schema is not None:
            config["format"] = {"type": "json_schema", "schema": self.output_schema}
        if config:
            out["output_config"] = config
        if self.stop_sequences:
            out["stop_sequences"] = list(self.stop_sequences)
        if self.inference_geo is not None:
            out["inference_geo"] = self.inference_geo
        out.update(self.sampling)
        return out


def _thinking(table: _Table) -> Thinking | None:
    value = table.get("thinking", (str, dict))
    if value is None:
        return None
    modes = ", ".join(f'"{m}"' for m in ("disabled", "adaptive", "between_tools"))
    if isinstance(value, str):
        if value == "enabled":
            raise table.error("thinking", 'manual thinking needs a budget: thinking = '
                              '{budget_tokens = N} (N >= 1024 and below max_tokens)')
        if value not in _THINKING_MODES:
            raise table.error("thinking", f"{value!r} is not a thinking mode; use {modes} "
                              "or {budget_tokens = N}")
        return Thinking(value)
    unknown = sorted(set(value) - {"type", "budget_tokens", "display"})
    if unknown:
        raise table.error("thinking", f"unknown key {unknown[0]!r} "
                          "(allowed: type, budget_tokens, display)")
    budget = value.get("budget_tokens")
    kind = value.get("type", "enabled" if budget is not None else None)
    if kind not in _THINKING_MODES:
        raise table.error("thinking", f"type {kind!r} is not a thinking mode; use {modes} "
                          "or {budget_tokens = N}")
    display = value.get("display")
    if display is not None and display not in _DISPLAYS:
        raise table.error("thinking", f"display must be one of {', '.join(_DISPLAYS)}, "
                          f"got {display!r}")
    if kind == "enabled":
        if isinstance(budget, bool) or not isinstance(budget, int):
            raise table.error("thinking", f"budget_tokens must be a whole number, got {budget!r}")
        if budget < 1024:
            raise table.error("thinking", f"budget_tokens must be at least 1024 (the API's "
                              f"minimum), got {budget}")
    elif budget is not None:
        raise table.error("thinking", f"budget_tokens applies to manual thinking only, "
                          f"not to type {kind!r}")
    return Thinking(kind, budget, display)


def _output_schema(table: _Table, base_dir: Path) -> dict[str, Any] | None:
    value = table.get("output_schema", (str, dict))
    if value is None:
        return None
    where = "inline"
    if isinstance(value, str):
        path = Path(value).expanduser()
        if not path.is_absolute():
            path = base_dir / path
        where = str(path)
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise table.error("output_schema", f"schema file {path} not found") from None
        except OSError as exc:
            raise table.error("output_schema", f"cannot read {path}: {exc.strerror}") from None
        except ValueError as exc:
            raise table.error("output_schema", f"{path} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise table.error("output_schema", f"a JSON Schema must be an object ({where})")
    if value.get("type") != "object":
        raise table.error("output_schema", f'the schema\'s root must be type = "object" '
                          f"(structured output answers with a JSON object; {where})")
    from jsonschema import exceptions, validators

    try:
        validators.validator_for(value).check_schema(value)
    except exceptions.SchemaError as exc:
        at = "/".join(str(p) for p in exc.path) or "root"
        raise table.error("output_schema", f"not a valid JSON Schema at {at}: "
                          f"{exc.message} ({where})") from None
    return value


def _tools(table: _Table) -> tuple[dict[str, Any], ...]:
    tools = table.get("tools", list, [])
    names: set[str] = set()
    for index, tool in enumerate(tools):
        key = f"tools[{index}]"
        if not isinstance(tool, dict):
            raise table.error(key, "must be a table (a tool definition)")
        name = tool.get("name")
        if not isinstance(name, str) or not _TOOL_NAME.fullmatch(name):
            raise table.error(key, f"name must match [a-zA-Z0-9_-]{{1,128}}, got {name!r}")
        if name in names:
            raise table.error(key, f"tool name {name!r} is used twice")
        names.add(name)
        kind = tool.get("type", "custom")
        if not isinstance(kind, str):
            raise table.error(key, f"type must be a string, got {kind!r}")
        if kind != "custom":
            continue  # a server tool (web_search_…, code_execution_…): the API judges it
        unknown = sorted(set(tool) - _CUSTOM_TOOL_KEYS)
        if unknown:
            raise table.error(key, f"unknown key {unknown[0]!r} for a custom tool "
                              f"(allowed: {', '.join(sorted(_CUSTOM_TOOL_KEYS))})")
        schema = tool.get("input_schema")
        if not isinstance(schema, dict) or schema.get("type") != "object":
            raise table.error(key, 'input_schema must be a table with type = "object"')
        description = tool.get("description")
        if description is not None and not isinstance(description, str):
            raise table.error(key, "description must be a string")
    return tuple(tools)


def _tool_choice(table: _Table, tools: tuple[dict[str, Any], ...]) -> dict[str, Any] | None:
    value = table.get("tool_choice", (str, dict))
    if value is None:
        return None
    choice = {"type": value} if isinstance(value, str) else dict(value)
    kind = choice.get("type")
    if kind not in _TOOL_CHOICES:
        raise table.error("tool_choice", f"type must be one of {', '.join(_TOOL_CHOICES)}, "
                          f"got {kind!r}")
    allowed = {"type", "disable_parallel_tool_use"} | ({"name"} if kind == "tool" else set())
    unknown = sorted(set(choice) - allowed)
    if unknown:
        raise table.error("tool_choice", f"unknown key {unknown[0]!r} for type {kind!r} "
                          f"(allowed: {', '.join(sorted(allowed))})")
    if kind == "tool":
        names = [t.get("name") for t in tools]
        if choice.get("name") not in names:
            raise table.error("tool_choice", f"name {choice.get('name')!r} is not one of the "
                              f"tools ({', '.join(map(str, names)) or 'none defined'})")
    if kind in ("any", "tool") and not tools:
        raise table.error("tool_choice", f"type {kind!r} forces a tool call, but no tools "
                          "are defined")
    return choice


def _sampling(table: _Table) -> dict[str, float]:
    out: dict[str, float] = {}
    temperature = table.get("temperature", (int, float))
    if temperature is not None:
        if not 0 <= temperature <= 1:
            raise table.error("temperature", f"must be between 0 and 1, got {temperature}")
        out["temperature"] = float(temperature)
    top_p = table.get("top_p", (int, float))
    if top_p is not None:
        if not 0 <= top_p <= 1:
            raise table.error("top_p", f"must be between 0 and 1, got {top_p}")
        out["top_p"] = float(top_p)
    top_k = table.get("top_k", int)
    if top_k is not None:
        if top_k < 1:
            raise table.error("top_k", f"must be at least 1, got {top_k}")
        out["top_k"] = top_k
    return out


def parse_request_options(table: _Table, base_dir: Path) -> RequestOptions:
    """
    The options of one ``[pipeline.request]`` table, each checked for shape.

    ``base_dir`` resolves an ``output_schema`` file name (the config file's directory).

    Raises:
        ConfigError: naming the file, table and key at fault.
    """
    if "output_format" in table.data:
        raise table.error("output_format", "the API takes structured output as "
                          "output_config.format; write output_schema = {…} (a JSON Schema, "
                          "or the name of a .json file holding one)")
    effort = table.get("effort", str)
    if effort is not None and effort not in EFFORTS:
        raise table.error("effort", f"must be one of {', '.join(EFFORTS)}, got {effort!r}")
    cache = table.get("cache", (str, bool))
    legacy_cache = table.get("cache_system", bool, False)
    if cache is True or (cache is None and legacy_cache):
        cache = "5m"
    elif cache is False:
        cache = None
    if cache is not None and cache not in CACHE_TTLS:
        raise table.error("cache", f'must be "5m" or "1h" (the cache TTL), got {cache!r}')
    stops = table.get("stop_sequences", list, [])
    if not all(isinstance(s, str) and s for s in stops):
        raise table.error("stop_sequences", "must be a list of non-empty strings")
    geo = table.get("inference_geo", str)
    if geo is not None and geo not in ("global", "us"):
        raise table.error("inference_geo", f'must be "global" or "us", got {geo!r}')
    tools = _tools(table)
    options = RequestOptions(
        thinking=_thinking(table),
        effort=effort,
        output_schema=_output_schema(table, base_dir),
        tools=tools,
        tool_choice=_tool_choice(table, tools),
        cache=cache,
        stop_sequences=tuple(stops),
        sampling=_sampling(table),
        inference_geo=geo,
    )
    return options


def check_extra(table: _Table, extra: Mapping[str, Any]) -> None:
    """``extra`` may add what batchd has no option for, never bypass an option's checks."""
    for key in extra:
        if key in _OWN_OPTION:
            raise table.error(f"extra.{key}", f"has its own option; set "
                              f"{_OWN_OPTION[key]} in [pipeline.request] instead")


def check_sampling_version(sampling: Mapping[str, Any], version: str, where: str) -> None:
    """
    Under ``2026-10-21`` any sampling parameter is rejected (even at its default value).

    Raises:
        ConfigError: naming the key and the rule.
    """
    if version < "2026-10-21":
        return
    for key in SAMPLING_KEYS:
        if key in sampling:
            raise ConfigError(
                f"{where}: {key}: API version {version} rejects temperature, top_p and top_k "
                "in every request, even at their defaults (every row would come back "
                "invalid_request_error); remove it, or pin [api] version = \"2023-06-01\" "
                "to send it to a model that still takes it"
            )
