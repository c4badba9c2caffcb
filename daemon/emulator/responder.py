"""
Deterministic replies: what a succeeded request's message says, and what it costs.

Replies come from ordered regex rules on the last user message (see `rules`);
without a match the reply echoes the input, so a test can still tell requests
apart. Around that text the message is built as today's models build it:
thinking first and spent against ``max_tokens`` (`thinking`), a schema-valid
JSON document for structured output (`schema_instance`), a ``tool_use`` block
for a forced tool choice, ``stop_sequences`` honoured, refusals with
``stop_details``, and usage split by the prompt cache (`cache`) with every
field of the SDK's ``Usage``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import orjson

from batchd.daemon.emulator.cache import CacheUse, PromptCache
from batchd.daemon.emulator.prompt import (
    has_cache_marker,
    last_user_text,
    prompt_chars,
    prompt_units,
    tokens,
)
from batchd.daemon.emulator.rules import Rule, load_rules
from batchd.daemon.emulator.schema_instance import schema_instance
from batchd.daemon.emulator.thinking import ThinkingPlan, plan_thinking, thinking_block
from batchd.daemon.models.catalog import Catalog, ModelInfo

__all__ = ("Responder", "Rule", "load_rules")

_FAULT_REFUSAL = ("general_harms", "Emulated refusal (emulator fault refusal).")
_NO_THINKING = ThinkingPlan(0, omitted=False)


@dataclass(frozen=True)
class _Reply:
    """The part of a reply after the thinking: content blocks, tokens and how it ended."""

    blocks: list[dict[str, Any]]
    tokens: int
    stop_reason: str
    stop_sequence: str | None = None
    stop_details: dict[str, Any] | None = None


def _digest(text: str, size: int) -> str:
    return hashlib.blake2b(text.encode(), digest_size=size).hexdigest()


class Responder:
    """Builds a succeeded request's ``message`` from its (already validated) params."""

    def __init__(
        self,
        rules: list[Rule],
        default: str | None,
        catalog: Catalog,
        cache: PromptCache | None = None,
    ) -> None:
        self._rules = rules
        self._default = default
        self.catalog = catalog
        self.cache = cache or PromptCache()
        self._models: dict[str, ModelInfo | None] = {}

    def _model(self, model: str) -> ModelInfo | None:
        try:
            return self._models[model]
        except KeyError:
            info = self._models[model] = self.catalog.get(model)
            return info

    def rule_for(self, text: str) -> Rule | None:
        for rule in self._rules:
            if rule.pattern.search(text):
                return rule
        return None

    def reply_for(self, text: str, rule: Rule | None = None) -> str:
        """The reply text for a last user message."""
        if rule is not None and rule.reply is not None:
            return rule.reply
        if self._default is not None:
            return self._default
        snippet = " ".join(text[:240].split())[:60]
        return f"Emulated reply to: {snippet}" if snippet else "Emulated reply."

    def message(
        self,
        batch_id: str,
        custom_id: str,
        params: dict[str, Any],
        *,
        at: float,
        twist: str | None = None,
        cache_miss: bool = False,
    ) -> dict[str, Any]:
        """
        The assistant message for ``params``, processed at virtual time ``at``.

        ``twist`` is a per-request fault that keeps the request succeeded
        (``refusal``, ``context_exceeded``); ``cache_miss`` makes a would-be
        cache read miss.
        """
        model: str = params["model"]
        info = self._model(model)
        assert info is not None, f"{model} passed validation but is not in the catalog"
        messages: list[dict[str, Any]] = params["messages"]
        prompt = last_user_text(messages)
        rule = self.rule_for(prompt)
        max_tokens: int = params["max_tokens"]
        if "thinking" in params or info.thinking_default != "disabled":
            plan = plan_thinking(params, info, rule.thinking_tokens if rule else None)
        else:
            plan = _NO_THINKING
        content: list[dict[str, Any]] = []
        if plan.on:
            content.append(thinking_block(plan, prompt, f"{batch_id}/{custom_id}"))
        budget = max_tokens - plan.tokens
        if budget <= 0:
            reply = _Reply([], 0, "max_tokens")
            output = max_tokens
        else:
            reply = self._reply(params, info, prompt, rule, budget, twist, custom_id)
            output = plan.tokens + reply.tokens
        content.extend(reply.blocks)
        # Thinking cut off by max_tokens is billed only as far as it got.
        usage = self._usage(params, info, at, cache_miss, output, min(plan.tokens, output))
        return {
            "id": f"msg_01{_digest(f'{batch_id}/{custom_id}', 12)}",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": content,
            "stop_reason": reply.stop_reason,
            "stop_sequence": reply.stop_sequence,
            "stop_details": reply.stop_details,
            "container": None,
            "diagnostics": None,
            "usage": usage,
        }

    def _reply(
        self,
        params: dict[str, Any],
        info: ModelInfo,
        prompt: str,
        rule: Rule | None,
        budget: int,
        twist: str | None,
        custom_id: str,
    ) -> _Reply:
        if twist == "refusal" or (rule is not None and rule.stop_reason == "refusal"):
            blocks: list[dict[str, Any]] = []
            used = 1
            if rule is not None and rule.stop_reason == "refusal":
                category, explanation = rule.category, rule.explanation
                if rule.reply:
                    blocks = [{"type": "text", "text": rule.reply}]
                    used = tokens(len(rule.reply))
            else:
                category, explanation = _FAULT_REFUSAL
            used = min(budget, used)
            details = {"type": "refusal", "category": category, "explanation": explanation}
            return _Reply(blocks, used, "refusal", stop_details=details)
        tool = self._tool_call(params, rule) if params.get("tools") else None
        if tool is not None:
            name, schema = tool
            tool_input = (
                rule.tool_input
                if rule is not None and rule.tool_input is not None
                else schema_instance(schema, self.reply_for(prompt, rule))
            )
            used = tokens(len(orjson.dumps(tool_input)))
            block = {
                "type": "tool_use",
                "id": f"toolu_01{_digest(custom_id + name, 11)}",
                "name": name,
                "input": tool_input,
            }
            if used > budget:
                return _Reply([block], budget, "max_tokens")
            return _Reply([block], used, "tool_use")
        text = self.reply_for(prompt, rule)
        output_schema = (
            _output_schema(params)
            if "output_config" in params or "output_format" in params
            else None
        )
        if output_schema is not None:
            document: Any = rule.json if rule is not None and rule.json is not None else None
            if document is None:
                document = schema_instance(output_schema, text)
            text = orjson.dumps(document).decode()
        stop_reason = "end_turn"
        if rule is not None and rule.stop_reason is not None:
            stop_reason = rule.stop_reason
        if twist == "context_exceeded":
            stop_reason = "model_context_window_exceeded"
        stop_sequence = None
        stops = params.get("stop_sequences")
        if stops:
            hits = [(text.find(s), s) for s in stops if s and s in text]
            if hits:
                cut, stop_sequence = min(hits)
                text = text[:cut]
                stop_reason = "stop_sequence"
        used = tokens(len(text))
        if used > budget:
            text = text[: budget * 4]
            used = budget
            stop_reason, stop_sequence = "max_tokens", None
        return _Reply([{"type": "text", "text": text}], used, stop_reason, stop_sequence)

    def _tool_call(
        self, params: dict[str, Any], rule: Rule | None
    ) -> tuple[str, dict[str, Any]] | None:
        """The (name, input schema) of the tool this reply calls, if it calls one."""
        tools = [t for t in params.get("tools") or () if (t.get("type") or "custom") == "custom"]
        if not tools:
            return None
        choice = params.get("tool_choice") or {"type": "auto"}
        kind = choice.get("type")
        if kind == "tool":
            wanted = choice.get("name")
            tool = next((t for t in tools if t.get("name") == wanted), None)
        elif kind == "any" or (
            kind == "auto" and rule is not None and rule.tool_input is not None
        ):
            tool = tools[0]
        else:
            return None
        if tool is None:
            return None
        return str(tool["name"]), tool.get("input_schema") or {"type": "object"}

    def _usage(
        self,
        params: dict[str, Any],
        info: ModelInfo,
        at: float,
        cache_miss: bool,
        output: int,
        thinking: int,
    ) -> dict[str, Any]:
        if has_cache_marker(params):
            units = prompt_units(params)
            use = self.cache.use(info.id, units, info.min_cache_tokens, at, miss=cache_miss)
        else:
            use = CacheUse(tokens(prompt_chars(params)), 0, 0, 0)
        return {
            "input_tokens": use.input_tokens,
            "output_tokens": max(1, output),
            "cache_creation_input_tokens": use.write_5m + use.write_1h,
            "cache_read_input_tokens": use.read,
            "cache_creation": {
                "ephemeral_5m_input_tokens": use.write_5m,
                "ephemeral_1h_input_tokens": use.write_1h,
            },
            "output_tokens_details": {"thinking_tokens": thinking},
            "server_tool_use": {"web_search_requests": 0, "web_fetch_requests": 0},
            "service_tier": "batch",
            "inference_geo": params.get("inference_geo") or "global",
            "speed": "standard",
        }


def _output_schema(params: dict[str, Any]) -> dict[str, Any] | None:
    config = params.get("output_config")
    fmt = config.get("format") if isinstance(config, dict) else None
    if fmt is None:
        fmt = params.get("output_format")
    if isinstance(fmt, dict) and isinstance(fmt.get("schema"), dict):
        return fmt["schema"]
    return None
