"""
What the installed SDK's request types allow, as plain names and values.

The strict request rules (strict_params.py) read the allowed fields, the
``type`` variants and the enum values from the SDK's TypedDicts and Literals,
so a new SDK release moves them instead of a hand-kept list going stale. Reading
them means importing ``anthropic.types``: ~2 s and ~90 MB, which the emulator
(and the tests) pay anyway but ``batchd run`` must not carry for a month just to
judge its request once before the first row. So a process that has not imported
the SDK reads the tables from a child process (``python -m`` this module), and
keeps them in the user's cache directory keyed by the SDK's version and files;
the next start reads that file. tests/test_sdk_tables.py checks the two ways
give the same tables.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import subprocess
import sys
import typing
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson

__all__ = ("SdkTables", "read_from_sdk", "sdk_tables")

_CHILD_TIMEOUT = 120.0


@dataclass(frozen=True)
class SdkTables:
    """
    What the installed SDK's types allow (names only: the rules test membership).

    Args:
        fields: top-level fields of a batch row (MessageCreateParamsNonStreaming).
        beta_fields: the same for a batch created through ``client.beta`` (``betas``
            is a header parameter there, never a body field).
        thinking, tool_choices, tools: ``type`` value → that variant's field names.
        role_blocks: message role → the block types its list content may hold.
    """

    fields: frozenset[str]
    beta_fields: frozenset[str]
    thinking: dict[str, frozenset[str]]
    display_values: frozenset[Any]
    tool_choices: dict[str, frozenset[str]]
    tools: dict[str, frozenset[str]]
    output_config: frozenset[str]
    effort_values: frozenset[Any]
    cache_control: frozenset[str]
    ttl_values: frozenset[Any]
    service_tiers: frozenset[Any]
    role_blocks: dict[str, frozenset[str]]

    def to_json(self) -> bytes:
        def plain(value: Any) -> Any:
            if isinstance(value, frozenset):
                return sorted(value, key=str)
            if isinstance(value, dict):
                return {k: plain(v) for k, v in value.items()}
            return value

        return orjson.dumps({k: plain(v) for k, v in asdict(self).items()})

    @classmethod
    def from_json(cls, data: bytes) -> SdkTables:
        raw = orjson.loads(data)
        values: dict[str, Any] = {}
        for name, value in raw.items():
            if isinstance(value, dict):
                values[name] = {k: frozenset(v) for k, v in value.items()}
            else:
                values[name] = frozenset(value)
        return cls(**values)


def _literals(tp: Any, found: set[Any] | None = None) -> set[Any]:
    """Every Literal value inside a (possibly Optional/Union/Iterable) type hint."""
    found = set() if found is None else found
    if typing.get_origin(tp) is typing.Literal:
        found.update(typing.get_args(tp))
    else:
        for arg in typing.get_args(tp):
            _literals(arg, found)
    return found


def _hints(typed_dict: Any) -> dict[str, Any]:
    """A TypedDict's (or a pydantic model's) field types, evaluated."""
    fields = getattr(typed_dict, "model_fields", None)
    if fields is not None:
        return {name: info.annotation for name, info in fields.items()}
    return typing.get_type_hints(typed_dict)


def _members_by_type(union: Any) -> dict[str, frozenset[str]]:
    """``type`` literal → that member's field names, for a Union of TypedDicts."""
    members: dict[str, frozenset[str]] = {}
    for member in typing.get_args(union):
        hints = _hints(member)
        for value in _literals(hints.get("type")):
            members[value] = frozenset(hints)
    return members


def read_from_sdk() -> SdkTables:
    """
    The tables, derived from the SDK's TypedDicts and Literals (imports the SDK).

    Imported here, not at module level: importing the SDK calls
    ``logging.basicConfig`` when ``ANTHROPIC_LOG`` is set.
    """
    from anthropic.types import (
        cache_control_ephemeral_param,
        message_param,
        output_config_param,
        thinking_config_enabled_param,
        thinking_config_param,
        tool_choice_param,
        tool_union_param,
    )
    from anthropic.types import message_create_params as params
    from anthropic.types.beta import message_create_params as beta_params

    role_blocks: dict[str, frozenset[str]] = {}
    for member in typing.get_args(message_param.MessageParam):
        hints = _hints(member)
        blocks: set[str] = set()
        for union in typing.get_args(typing.get_args(hints["content"])[1]):
            for item in typing.get_args(union):
                blocks.update(_literals(_hints(item).get("type")))
        for role in _literals(hints["role"]):
            role_blocks[role] = frozenset(blocks)
    output_config = _hints(output_config_param.OutputConfigParam)
    cache_control = _hints(cache_control_ephemeral_param.CacheControlEphemeralParam)
    enabled = _hints(thinking_config_enabled_param.ThinkingConfigEnabledParam)
    return SdkTables(
        fields=frozenset(params.MessageCreateParamsNonStreaming.__annotations__),
        beta_fields=frozenset(beta_params.MessageCreateParamsNonStreaming.__annotations__)
        - {"betas"},
        thinking=_members_by_type(thinking_config_param.ThinkingConfigParam),
        display_values=frozenset(_literals(enabled["display"])),
        tool_choices=_members_by_type(tool_choice_param.ToolChoiceParam),
        tools=_members_by_type(tool_union_param.ToolUnionParam),
        output_config=frozenset(output_config),
        effort_values=frozenset(_literals(output_config["effort"])),
        cache_control=frozenset(cache_control),
        ttl_values=frozenset(_literals(cache_control["ttl"])),
        service_tiers=frozenset(_literals(_hints(params.MessageCreateParamsBase)["service_tier"])),
        role_blocks=role_blocks,
    )


def _sdk_fingerprint() -> str | None:
    """The installed SDK's version and type files' identity, without importing it."""
    spec = importlib.util.find_spec("anthropic")
    for location in (spec.submodule_search_locations or []) if spec else []:
        types = Path(location) / "types"
        try:
            stamp = [(Path(location) / "_version.py").read_bytes()]
            stamp += [str(p.stat().st_mtime_ns).encode()
                      for p in (types / "message_create_params.py", types / "__init__.py")]
        except OSError:
            continue
        return hashlib.sha256(b"\0".join([location.encode(), *stamp])).hexdigest()[:16]
    return None


def _cache_path(fingerprint: str) -> Path:
    """systemd's CacheDirectory= if the unit has one, else the user's cache directory."""
    base = os.environ.get("CACHE_DIRECTORY", "").split(":")[0] or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "batchd")
    return Path(base) / f"sdk-tables-{fingerprint}.json"


def _from_child() -> SdkTables:
    """The tables as a child process reads them (the SDK's memory goes with it)."""
    child = subprocess.run([sys.executable, "-m", __name__], capture_output=True,
                           timeout=_CHILD_TIMEOUT, env={**os.environ, "ANTHROPIC_LOG": ""})
    if child.returncode != 0:
        tail = child.stderr.decode(errors="replace").strip().splitlines()[-1:]
        raise RuntimeError(f"reading the SDK's request types failed: {' '.join(tail)}")
    return SdkTables.from_json(child.stdout)


@functools.cache
def sdk_tables() -> SdkTables:
    """The tables: from the SDK if this process has it, else the cache, else a child."""
    if "anthropic" in sys.modules:
        return read_from_sdk()
    fingerprint = _sdk_fingerprint()
    path = _cache_path(fingerprint) if fingerprint else None
    if path is not None:
        try:
            return SdkTables.from_json(path.read_bytes())
        except (OSError, ValueError, TypeError):
            pass  # absent, unreadable or from an older layout: read it again
    tables = _from_child()
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            tmp.write_bytes(tables.to_json())
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only home (a hardened unit): read them again next start
    return tables


if __name__ == "__main__":
    sys.stdout.buffer.write(read_from_sdk().to_json())
