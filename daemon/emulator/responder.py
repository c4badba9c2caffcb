"""
Deterministic replies: what a succeeded request's message says and costs.

The demo's classifier needs sensible labels without a model, so replies come
from ordered regex rules on the last user message; without a match the reply
echoes the input, so a test can still tell requests apart.
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ("Responder", "Rule", "load_rules")


@dataclass(frozen=True)
class Rule:
    """Reply ``reply`` when ``pattern`` is found in the last user message."""

    pattern: re.Pattern[str]
    reply: str


def load_rules(
    source: str | Path | Sequence[Mapping[str, str]] | Mapping[str, Any] | None,
) -> tuple[list[Rule], str | None]:
    """
    Rules and the optional default reply from a TOML/JSON file or in-memory data.

    A file holds ``[[rules]] pattern = "…" reply = "…"`` (TOML) or a JSON list of
    ``{"pattern", "reply"}`` objects (or ``{"rules": [...], "default": "…"}``).

    Raises:
        ValueError: naming the file and rule at fault.
    """
    if source is None:
        return [], None
    where = "rules"
    data: Any = source
    if isinstance(source, str | Path):
        path = Path(source)
        where = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"{where}: cannot read rules file: {exc.strerror}") from None
        try:
            data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(
                f"{where}: not valid {path.suffix.lstrip('.') or 'JSON'}: {exc}"
            ) from None
    default: Any = None
    if isinstance(data, Mapping):
        default = data.get("default")
        data = data.get("rules", [])
    if default is not None and not isinstance(default, str):
        raise ValueError(f"{where}: default must be a string")
    if not isinstance(data, Sequence) or isinstance(data, str):
        raise ValueError(f"{where}: rules must be a list of {{pattern, reply}} objects")
    rules = []
    for index, entry in enumerate(data):
        if not isinstance(entry, Mapping) or not isinstance(entry.get("pattern"), str):
            raise ValueError(f"{where}: rule {index}: needs a string 'pattern'")
        if not isinstance(entry.get("reply"), str):
            raise ValueError(f"{where}: rule {index}: needs a string 'reply'")
        try:
            pattern = re.compile(entry["pattern"])
        except re.error as exc:
            raise ValueError(
                f"{where}: rule {index}: bad pattern {entry['pattern']!r}: {exc}"
            ) from None
        rules.append(Rule(pattern, entry["reply"]))
    return rules, default


def _block_text(content: Any) -> str:
    """The text of a string or of a list of content blocks."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for block in content:
            if isinstance(block, dict):
                text = block.get("text")
                parts.append(text if isinstance(text, str) else json.dumps(block)[:200])
        return " ".join(parts)
    return ""


def _tokens(chars: int) -> int:
    """The emulator's token estimate: about four characters a token, at least one."""
    return max(1, -(-chars // 4))


class Responder:
    """Builds a succeeded request's ``message`` from its params."""

    def __init__(self, rules: list[Rule], default: str | None) -> None:
        self._rules = rules
        self._default = default

    def reply_for(self, text: str) -> str:
        """The reply text for a last user message."""
        for rule in self._rules:
            if rule.pattern.search(text):
                return rule.reply
        if self._default is not None:
            return self._default
        snippet = " ".join(text.split())[:60]
        return f"Emulated reply to: {snippet}" if snippet else "Emulated reply."

    def message(self, batch_id: str, custom_id: str, params: dict[str, Any]) -> dict[str, Any]:
        """The assistant message the API would return for ``params`` (already validated)."""
        messages: list[dict[str, Any]] = params["messages"]
        last_user = next((m for m in reversed(messages) if m.get("role") == "user"), messages[0])
        reply = self.reply_for(_block_text(last_user.get("content")))
        input_chars = len(_block_text(params.get("system"))) + sum(
            len(_block_text(m.get("content"))) for m in messages
        )
        max_tokens: int = params["max_tokens"]
        output_tokens = _tokens(len(reply))
        stop_reason = "end_turn"
        if output_tokens > max_tokens:
            reply = reply[: max_tokens * 4]
            output_tokens = max_tokens
            stop_reason = "max_tokens"
        digest = hashlib.blake2b(f"{batch_id}/{custom_id}".encode(), digest_size=12).hexdigest()
        return {
            "id": f"msg_01{digest}",
            "type": "message",
            "role": "assistant",
            "model": params["model"],
            "content": [{"type": "text", "text": reply}],
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "usage": {
                "input_tokens": _tokens(input_chars),
                "output_tokens": output_tokens,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
                "service_tier": "batch",
            },
        }
