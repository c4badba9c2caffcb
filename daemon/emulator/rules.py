"""
Reply rules: ordered regexes on the last user message and what the reply then is.

The demo's classifier needs sensible labels without a model, and tests need
refusals, structured replies and tool calls on demand, so a rule may set the
reply text and also how the reply ends (``stop_reason``), the JSON document a
structured-output request gets, a tool call's ``input``, and the thinking
tokens spent.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ("RULE_STOP_REASONS", "Rule", "load_rules")

#: The ``stop_reason`` values a rule may force.
RULE_STOP_REASONS = ("end_turn", "refusal", "model_context_window_exceeded", "pause_turn")
#: ``stop_details.category`` values (the SDK's RefusalStopDetails).
REFUSAL_CATEGORIES = ("cyber", "bio", "frontier_llm", "reasoning_extraction", "general_harms")
_KEYS = frozenset(
    {"pattern", "reply", "stop_reason", "category", "explanation", "json", "tool_input",
     "thinking_tokens"}
)  # fmt: skip


@dataclass(frozen=True)
class Rule:
    """What to answer when ``pattern`` is found in the last user message."""

    pattern: re.Pattern[str]
    reply: str | None = None
    stop_reason: str | None = None
    category: str | None = None
    explanation: str | None = None
    json: dict[str, Any] | None = None
    tool_input: dict[str, Any] | None = None
    thinking_tokens: int | None = None


def _read(path: Path) -> Any:
    where = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"{where}: cannot read rules file: {exc.strerror}") from None
    try:
        return tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{where}: not valid {path.suffix.lstrip('.') or 'JSON'}: {exc}") from None


def _rule(entry: Any, where: str) -> Rule:
    if not isinstance(entry, Mapping) or not isinstance(entry.get("pattern"), str):
        raise ValueError(f"{where}: needs a string 'pattern'")
    unknown = sorted(set(entry) - _KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(_KEYS))})")
    try:
        pattern = re.compile(entry["pattern"])
    except re.error as exc:
        raise ValueError(f"{where}: bad pattern {entry['pattern']!r}: {exc}") from None
    for key in ("reply", "explanation"):
        if key in entry and not isinstance(entry[key], str):
            raise ValueError(f"{where}: {key!r} must be a string")
    stop_reason = entry.get("stop_reason")
    if stop_reason is not None and stop_reason not in RULE_STOP_REASONS:
        raise ValueError(
            f"{where}: stop_reason {stop_reason!r} is not one of {', '.join(RULE_STOP_REASONS)}"
        )
    category = entry.get("category")
    if category is not None and category not in REFUSAL_CATEGORIES:
        raise ValueError(
            f"{where}: category {category!r} is not one of {', '.join(REFUSAL_CATEGORIES)}"
        )
    for key in ("json", "tool_input"):
        if key in entry and not isinstance(entry[key], Mapping):
            raise ValueError(f"{where}: {key!r} must be an object (a table in TOML)")
    thinking = entry.get("thinking_tokens")
    if thinking is not None and (
        isinstance(thinking, bool) or not isinstance(thinking, int) or thinking < 0
    ):
        raise ValueError(f"{where}: thinking_tokens must be a whole number >= 0")
    if not _KEYS.intersection(entry) - {"pattern", "category", "explanation"}:
        raise ValueError(
            f"{where}: needs 'reply' (or one of stop_reason, json, tool_input, thinking_tokens)"
        )
    return Rule(
        pattern=pattern,
        reply=entry.get("reply"),
        stop_reason=stop_reason,
        category=category,
        explanation=entry.get("explanation"),
        json=dict(entry["json"]) if "json" in entry else None,
        tool_input=dict(entry["tool_input"]) if "tool_input" in entry else None,
        thinking_tokens=thinking,
    )


def load_rules(
    source: str | Path | Sequence[Mapping[str, Any]] | Mapping[str, Any] | None,
) -> tuple[list[Rule], str | None]:
    """
    Rules and the optional default reply from a TOML/JSON file or in-memory data.

    A file holds ``[[rules]] pattern = "…" reply = "…"`` (TOML) or a JSON list of
    rule objects (or ``{"rules": [...], "default": "…"}``).

    Raises:
        ValueError: naming the file and rule at fault.
    """
    if source is None:
        return [], None
    where = "rules"
    data: Any = source
    if isinstance(source, str | Path):
        where = str(source)
        data = _read(Path(source))
    default: Any = None
    if isinstance(data, Mapping):
        default = data.get("default")
        data = data.get("rules", [])
    if default is not None and not isinstance(default, str):
        raise ValueError(f"{where}: default must be a string")
    if not isinstance(data, Sequence) or isinstance(data, str):
        raise ValueError(f"{where}: rules must be a list of {{pattern, reply}} objects")
    rules = [_rule(entry, f"{where}: rule {index}") for index, entry in enumerate(data)]
    return rules, default
