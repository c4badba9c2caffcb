"""
A request's prompt as the emulator sees it: units of text in cache order, and token counts.

Prompt caching, the context-window check and ``usage.input_tokens`` all need
the same picture of the prompt: tools, then system, then messages (the order
the API caches in, PC), each block a unit with its size and its
``cache_control``. The token estimate is the emulator's one rule: about four
characters a token, at least one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import orjson

__all__ = (
    "PromptUnit",
    "block_text",
    "has_cache_marker",
    "last_user_text",
    "prompt_chars",
    "prompt_units",
    "tokens",
)

_NON_TEXT_CHARS = 200


def tokens(chars: int) -> int:
    """The emulator's token estimate: about four characters a token, at least one."""
    return max(1, -(-chars // 4))


def block_text(content: Any) -> str:
    """The text of a string or of a list of content blocks (non-text blocks abbreviated)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(_unit_text(block) for block in content if isinstance(block, dict))
    return ""


def _unit_text(block: dict[str, Any]) -> str:
    text = block.get("text")
    return text if isinstance(text, str) else json.dumps(block)[:_NON_TEXT_CHARS]


def last_user_text(messages: list[dict[str, Any]]) -> str:
    """The text of the last user message (what reply rules match against)."""
    for message in reversed(messages):
        if message.get("role") == "user":
            return block_text(message.get("content"))
    return block_text(messages[0].get("content")) if messages else ""


@dataclass(frozen=True, slots=True)
class PromptUnit:
    """One cacheable unit: its size, its identity for the cache key, and its marker's TTL."""

    chars: int
    key: bytes
    ttl: str | None


def _ttl(block: Any) -> str | None:
    control = block.get("cache_control") if isinstance(block, dict) else None
    if not isinstance(control, dict):
        return None
    ttl = control.get("ttl")
    return ttl if isinstance(ttl, str) else "5m"


def _no_identity(_block: Any) -> bytes:
    return b""


def _identity(block: Any) -> bytes:
    """The block without its cache marker: moving a marker does not change the prefix."""
    if isinstance(block, str):
        return block.encode()
    if isinstance(block, dict) and "cache_control" in block:
        block = {k: v for k, v in block.items() if k != "cache_control"}
    return orjson.dumps(block, option=orjson.OPT_SORT_KEYS)


def prompt_units(params: dict[str, Any], *, keys: bool = True) -> list[PromptUnit]:
    """
    The prompt's units in cache order: each tool, each system block, each message block.

    Top-level ``cache_control`` marks the last unit (PC: "the last cacheable
    block") unless it already carries a marker. ``keys=False`` skips building
    the cache identities when only sizes are wanted.
    """
    identity = _identity if keys else _no_identity
    units: list[PromptUnit] = []
    for tool in params.get("tools") or ():
        units.append(PromptUnit(len(orjson.dumps(tool)), identity(tool), _ttl(tool)))
    system = params.get("system")
    if isinstance(system, str):
        if system:
            units.append(PromptUnit(len(system), identity(system), None))
    elif isinstance(system, list):
        for block in system:
            if isinstance(block, dict):
                units.append(PromptUnit(len(_unit_text(block)), identity(block), _ttl(block)))
    for message in params.get("messages") or ():
        role = str(message.get("role")).encode() + b":" if keys else b""
        content = message.get("content")
        if isinstance(content, str):
            units.append(PromptUnit(len(content), role + identity(content), None))
        elif isinstance(content, list):
            for block in content:
                if isinstance(block, dict):
                    units.append(
                        PromptUnit(len(_unit_text(block)), role + identity(block), _ttl(block))
                    )
    top = params.get("cache_control")
    if isinstance(top, dict) and units and units[-1].ttl is None:
        last = units[-1]
        ttl = top.get("ttl") if isinstance(top.get("ttl"), str) else "5m"
        units[-1] = PromptUnit(last.chars, last.key, ttl)
    return units


def prompt_chars(params: dict[str, Any]) -> int:
    """
    The prompt's size in characters, as ``usage.input_tokens`` counts it.

    The same sum as over `prompt_units`, without building them: this runs for
    every request of every batch, twice.
    """
    total = 0
    for tool in params.get("tools") or ():
        total += len(orjson.dumps(tool))
    system = params.get("system")
    if isinstance(system, str):
        total += len(system)
    elif isinstance(system, list):
        total += sum(len(_unit_text(block)) for block in system if isinstance(block, dict))
    for message in params.get("messages") or ():
        content = message.get("content")
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):
            total += sum(len(_unit_text(block)) for block in content if isinstance(block, dict))
    return total


def has_cache_marker(params: dict[str, Any]) -> bool:
    """Whether any ``cache_control`` is set (only then is the prompt cache consulted)."""
    if params.get("cache_control") is not None:
        return True
    for tool in params.get("tools") or ():
        if isinstance(tool, dict) and tool.get("cache_control") is not None:
            return True
    system = params.get("system")
    if isinstance(system, list) and _any_marked(system):
        return True
    for message in params.get("messages") or ():
        content = message.get("content")
        if isinstance(content, list) and _any_marked(content):
            return True
    return False


def _any_marked(blocks: list[Any]) -> bool:
    return any(isinstance(b, dict) and b.get("cache_control") is not None for b in blocks)
