"""
Thinking: whether a request thinks, and how many output tokens that costs.

Several current models think when ``thinking`` is omitted, and thinking
tokens are spent against ``max_tokens`` before any text (H55, TT): a
classifier with a tight ``max_tokens`` can get no text at all. Replies model
that with fixed, documented costs so a test can predict them exactly
(docs/emulator.md, api-contract.md).
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from typing import Any

from batchd.daemon.models.catalog import ModelInfo

__all__ = ("ADAPTIVE_TOKENS", "ThinkingPlan", "effective_effort", "plan_thinking", "thinking_type")

#: Thinking tokens an adaptive-thinking reply spends at each effort.
ADAPTIVE_TOKENS = {"low": 32, "medium": 128, "high": 512, "xhigh": 1024, "max": 2048}
_ON = frozenset({"enabled", "adaptive"})


def thinking_type(params: dict[str, Any], info: ModelInfo) -> str:
    """The thinking type in force: the one asked for, else the model's default."""
    thinking = params.get("thinking")
    if isinstance(thinking, dict) and isinstance(thinking.get("type"), str):
        return str(thinking["type"])
    return info.thinking_default


def effective_effort(params: dict[str, Any], info: ModelInfo) -> str:
    """The effort in force: the one asked for, else the model's default (``high`` if none)."""
    config = params.get("output_config")
    if isinstance(config, dict) and isinstance(config.get("effort"), str):
        return str(config["effort"])
    return info.effort_default or "high"


@dataclass(frozen=True)
class ThinkingPlan:
    """How many tokens a reply thinks, and whether the thinking text is shown."""

    tokens: int
    omitted: bool

    @property
    def on(self) -> bool:
        return self.tokens > 0


def plan_thinking(
    params: dict[str, Any], info: ModelInfo, rule_tokens: int | None = None
) -> ThinkingPlan:
    """
    The thinking this request does.

    ``enabled`` spends half its ``budget_tokens``; ``adaptive`` spends
    `ADAPTIVE_TOKENS` at the effort in force; a reply rule's
    ``thinking_tokens`` replaces either (0: no thinking block). ``disabled``
    and ``between_tools`` (a single turn has no tools between which to think)
    do not think.
    """
    kind = thinking_type(params, info)
    if kind not in _ON:
        return ThinkingPlan(0, omitted=False)
    thinking = params.get("thinking")
    display = thinking.get("display") if isinstance(thinking, dict) else None
    if rule_tokens is not None:
        tokens = rule_tokens
    elif kind == "enabled" and isinstance(thinking, dict):
        tokens = int(thinking.get("budget_tokens", 0)) // 2
    else:
        tokens = ADAPTIVE_TOKENS[effective_effort(params, info)]
    return ThinkingPlan(tokens, omitted=display == "omitted")


def signature(seed: str) -> str:
    """An opaque, stable signature for a thinking block."""
    digest = hashlib.blake2b(seed.encode(), digest_size=48).digest()
    return base64.b64encode(digest).decode()


def thinking_block(plan: ThinkingPlan, prompt: str, seed: str) -> dict[str, Any]:
    """The ``thinking`` block a reply starts with (text "" when display is omitted)."""
    if plan.omitted:
        text = ""
    else:
        snippet = " ".join(prompt.split())[:80]
        text = f"The user wrote: {snippet}. I should answer briefly." if snippet else "Thinking."
    return {"type": "thinking", "thinking": text, "signature": signature(seed)}
