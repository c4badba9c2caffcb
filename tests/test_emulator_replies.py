"""Replies as today's models give them: thinking, structured output, tools, stops, cache."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anthropic
import jsonschema
import pytest

from batchd.daemon.emulator import EmulatorThread
from batchd.daemon.emulator.schema_instance import schema_instance
from batchd.daemon.emulator.thinking import ADAPTIVE_TOKENS
from tests.fixtures.emulator import ended_results, sdk_client

# The support-ticket schema steadybatch sends as output_config.format.
TICKET_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "product": {"type": "string", "enum": ["router", "laptop", "phone", "printer"]},
        "issue_type": {"type": "string", "enum": ["billing", "shipping", "defect", "how_to"]},
        "sentiment": {"type": "string", "enum": ["negative", "neutral", "positive"]},
        "needs_follow_up": {"type": "boolean"},
    },
    "required": ["product", "issue_type", "sentiment", "needs_follow_up"],
    "additionalProperties": False,
}


def _row(custom_id: str, **params: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "claude-haiku-4-5",
        "max_tokens": 256,
        "messages": [{"role": "user", "content": "my printer is on fire"}],
    }
    body.update(params)
    return {"custom_id": custom_id, "params": body}


def _message(results: dict[str, Any], key: str) -> dict[str, Any]:
    result = results[key]
    assert result["type"] == "succeeded", result
    message: dict[str, Any] = result["message"]
    return message


def _types(message: dict[str, Any]) -> list[str]:
    return [block["type"] for block in message["content"]]


class TestThinking:
    @pytest.mark.parametrize(
        ("model", "effort", "tokens"),
        [
            ("claude-haiku-5-5", None, ADAPTIVE_TOKENS["medium"]),  # default effort medium
            ("claude-opus-5-5", None, ADAPTIVE_TOKENS["medium"]),
            ("claude-sonnet-5-5", None, ADAPTIVE_TOKENS["high"]),
            ("claude-fable-5-1", "max", ADAPTIVE_TOKENS["max"]),
            ("claude-haiku-5-5", "low", ADAPTIVE_TOKENS["low"]),
        ],
    )
    def test_models_that_think_by_default(
        self, emulator: EmulatorThread, model: str, effort: str | None, tokens: int
    ) -> None:
        """thinking omitted: a thinking block first, its tokens in output_tokens."""
        extra: dict[str, Any] = {"output_config": {"effort": effort}} if effort else {}
        results = ended_results(
            sdk_client(emulator.base_url), [_row("t", model=model, max_tokens=4096, **extra)]
        )
        message = _message(results, "t")
        assert _types(message) == ["thinking", "text"]
        thinking = message["content"][0]
        assert thinking["thinking"] and thinking["signature"]
        usage = message["usage"]
        assert usage["output_tokens_details"]["thinking_tokens"] == tokens
        text_tokens = -(-len(message["content"][1]["text"]) // 4)
        assert usage["output_tokens"] == tokens + text_tokens
        assert message["stop_reason"] == "end_turn"

    def test_tight_max_tokens_leaves_no_text(self, emulator: EmulatorThread) -> None:
        """A classifier's max_tokens=16 on Haiku 5.5: thinking eats it all, no text block."""
        results = ended_results(
            sdk_client(emulator.base_url), [_row("c", model="claude-haiku-5-5", max_tokens=16)]
        )
        message = _message(results, "c")
        assert _types(message) == ["thinking"]
        assert message["stop_reason"] == "max_tokens"
        assert message["usage"]["output_tokens"] == 16
        # The SDK: thinking_tokens is always <= output_tokens (the billed total).
        assert message["usage"]["output_tokens_details"]["thinking_tokens"] == 16

    def test_disabled_thinking_gives_text_only(self, emulator: EmulatorThread) -> None:
        row = _row("d", model="claude-haiku-5-5", max_tokens=16, thinking={"type": "disabled"})
        message = _message(ended_results(sdk_client(emulator.base_url), [row]), "d")
        assert _types(message) == ["text"]
        assert message["usage"]["output_tokens_details"]["thinking_tokens"] == 0

    def test_enabled_budget_and_omitted_display(self, emulator: EmulatorThread) -> None:
        """enabled spends half its budget; display omitted sends an empty thinking text."""
        thinking = {"type": "enabled", "budget_tokens": 2000, "display": "omitted"}
        row = _row("e", max_tokens=4000, thinking=thinking)
        message = _message(ended_results(sdk_client(emulator.base_url), [row]), "e")
        assert message["content"][0] == {
            "type": "thinking", "thinking": "", "signature": message["content"][0]["signature"]
        }
        assert message["usage"]["output_tokens_details"]["thinking_tokens"] == 1000

    def test_sdk_parses_thinking_blocks(self, emulator: EmulatorThread) -> None:
        client = sdk_client(emulator.base_url)
        batch = client.messages.batches.create(requests=[_row("s", model="claude-opus-5-5")])
        client.messages.batches.retrieve(batch.id)
        (line,) = list(client.messages.batches.results(batch.id))
        assert line.result.type == "succeeded"
        assert isinstance(line.result.message.content[0], anthropic.types.ThinkingBlock)


class TestStructuredOutput:
    @pytest.mark.parametrize(
        "schema",
        [
            TICKET_SCHEMA,
            {"type": "object", "properties": {"tags": {"type": "array", "minItems": 2,
             "uniqueItems": True, "items": {"type": "string", "enum": ["a", "b", "c"]}},
             "when": {"type": "string", "format": "date-time"},
             "score": {"type": "number", "minimum": 0.5, "maximum": 2},
             "count": {"type": "integer", "exclusiveMinimum": 3},
             "code": {"type": "string", "pattern": "^[A-Z]{3}$"},
             "owner": {"$ref": "#/$defs/person"},
             "either": {"anyOf": [{"type": "null"}, {"type": "string", "minLength": 4}]}},
             "required": ["tags", "when", "score", "count", "code", "owner", "either"],
             "additionalProperties": False,
             "$defs": {"person": {"type": "object", "properties": {
                 "email": {"type": "string", "format": "email"}}, "required": ["email"],
                 "additionalProperties": False}}},
            # Patterns of the kind schemas carry (ids, codes, dates), which a handful of
            # guessed strings never matched, and an object that must not be empty.
            {"type": "object", "properties": {
             "ticket": {"type": "string", "pattern": "^[A-Z]{3}-\\d{4}$"},
             "sku": {"type": "string", "pattern": "^(?:SKU|PRD)_[0-9a-f]{8}$"},
             "day": {"type": "string", "pattern": "^\\d{4}-\\d{2}-\\d{2}$"},
             "word": {"type": "string", "pattern": "^[^0-9\\s]+$", "minLength": 3},
             "phone": {"type": "string", "pattern": "^\\+?[1-9]\\d{7,14}$"},
             "extra": {"type": "object", "minProperties": 2}},
             "required": ["ticket", "sku", "day", "word", "phone", "extra"]},
        ],
    )  # fmt: skip
    def test_text_is_valid_against_the_schema(
        self, emulator: EmulatorThread, schema: dict[str, Any]
    ) -> None:
        fmt = {"type": "json_schema", "schema": schema}
        rows = [_row("s", model="claude-sonnet-4-6", output_config={"format": fmt})]
        message = _message(ended_results(sdk_client(emulator.base_url), rows), "s")
        (text,) = [b["text"] for b in message["content"] if b["type"] == "text"]
        jsonschema.validate(json.loads(text), schema)

    def test_enum_takes_the_rule_reply(
        self, emulator_factory: Callable[..., EmulatorThread]
    ) -> None:
        """A rule whose reply is an enum member puts it there; a rule's json is used as given."""
        rules = {"rules": [
            {"pattern": "laptop", "reply": "laptop"},
            {"pattern": "refund", "json": {"product": "phone", "issue_type": "billing",
                                           "sentiment": "negative", "needs_follow_up": True}},
        ]}  # fmt: skip
        emulator = emulator_factory(rules=rules)
        fmt = {"format": {"type": "json_schema", "schema": TICKET_SCHEMA}}
        rows = [
            _row("l", output_config=fmt, messages=[{"role": "user", "content": "laptop dead"}]),
            _row("r", output_config=fmt, messages=[{"role": "user", "content": "refund pls"}]),
        ]
        results = ended_results(sdk_client(emulator.base_url), rows)
        laptop = json.loads(_message(results, "l")["content"][0]["text"])
        refund = json.loads(_message(results, "r")["content"][0]["text"])
        assert laptop["product"] == "laptop"
        assert refund == {"product": "phone", "issue_type": "billing", "sentiment": "negative",
                          "needs_follow_up": True}  # fmt: skip

    def test_instance_generator_covers_recursion(self) -> None:
        schema = {"$ref": "#/$defs/node", "$defs": {"node": {"type": "object", "properties": {
            "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
            "required": ["children"]}}}  # fmt: skip
        instance = schema_instance(schema)
        jsonschema.validate(instance, schema)


class TestTools:
    def test_forced_tool_gives_schema_valid_tool_use(self, emulator: EmulatorThread) -> None:
        schema = {"type": "object", "properties": {
            "label": {"type": "string", "enum": ["billing", "hardware"]},
            "confidence": {"type": "number", "minimum": 0, "maximum": 1}},
            "required": ["label", "confidence"]}  # fmt: skip
        tools = [{"name": "other", "input_schema": {"type": "object"}},
                 {"name": "classify", "input_schema": schema}]  # fmt: skip
        rows = [
            _row("tool", tools=tools, tool_choice={"type": "tool", "name": "classify"}),
            _row("any", tools=tools, tool_choice={"type": "any"}),
            _row("auto", tools=tools),
        ]
        results = ended_results(sdk_client(emulator.base_url), rows)
        forced = _message(results, "tool")
        assert forced["stop_reason"] == "tool_use" and _types(forced) == ["tool_use"]
        block = forced["content"][0]
        assert block["name"] == "classify" and block["id"].startswith("toolu_")
        jsonschema.validate(block["input"], schema)
        assert _message(results, "any")["content"][0]["name"] == "other"
        assert _types(_message(results, "auto")) == ["text"]

    def test_rule_tool_input_with_auto(
        self, emulator_factory: Callable[..., EmulatorThread]
    ) -> None:
        emulator = emulator_factory(rules=[{"pattern": "fire", "tool_input": {"q": "fire"}}])
        tools = [{"name": "search", "input_schema": {"type": "object"}}]
        message = _message(
            ended_results(sdk_client(emulator.base_url), [_row("a", tools=tools)]), "a"
        )
        assert message["content"][0]["input"] == {"q": "fire"}
        assert message["stop_reason"] == "tool_use"


class TestStops:
    def test_stop_sequence_cuts_the_text(
        self, emulator_factory: Callable[..., EmulatorThread]
    ) -> None:
        emulator = emulator_factory(rules=[{"pattern": ".", "reply": "label: billing\nwhy: x"}])
        row = _row("s", stop_sequences=["\n", "why"])
        message = _message(ended_results(sdk_client(emulator.base_url), [row]), "s")
        assert message["content"][0]["text"] == "label: billing"
        assert message["stop_reason"] == "stop_sequence" and message["stop_sequence"] == "\n"

    @pytest.mark.parametrize("reason", ["pause_turn", "model_context_window_exceeded"])
    def test_rule_stop_reason(
        self, emulator_factory: Callable[..., EmulatorThread], reason: str
    ) -> None:
        rule = {"pattern": ".", "reply": "partial", "stop_reason": reason}
        emulator = emulator_factory(rules=[rule])
        message = _message(ended_results(sdk_client(emulator.base_url), [_row("r")]), "r")
        assert message["stop_reason"] == reason

    def test_rule_refusal_has_stop_details(
        self, emulator_factory: Callable[..., EmulatorThread]
    ) -> None:
        emulator = emulator_factory(rules=[{"pattern": "fire", "stop_reason": "refusal",
                                            "category": "cyber", "explanation": "no"}])  # fmt: skip
        message = _message(ended_results(sdk_client(emulator.base_url), [_row("r")]), "r")
        assert message["stop_reason"] == "refusal" and message["content"] == []
        assert message["stop_details"] == {"type": "refusal", "category": "cyber",
                                           "explanation": "no"}  # fmt: skip

    def test_refusal_and_context_faults(self, emulator: EmulatorThread) -> None:
        """Fractions of succeeded requests refuse or hit the context window; none error."""
        emulator.set_faults(refusal=0.3, context_exceeded=0.3)
        rows = [_row(f"r{i}") for i in range(60)]
        results = ended_results(sdk_client(emulator.base_url), rows)
        reasons = [_message(results, f"r{i}")["stop_reason"] for i in range(60)]
        injected = emulator.stats()["faults_injected"]
        assert reasons.count("refusal") == injected["refusal"] > 0
        assert reasons.count("model_context_window_exceeded") == injected["context_exceeded"] > 0
        refused = next(m for i in range(60) if (m := _message(results, f"r{i}"))["stop_reason"]
                       == "refusal")  # fmt: skip
        assert refused["stop_details"]["type"] == "refusal"

    def test_bad_rules_name_the_rule(self, tmp_path: Path) -> None:
        from batchd.daemon.emulator.rules import load_rules

        rules = tmp_path / "rules.toml"
        rules.write_text('[[rules]]\npattern = "x"\nstop_reason = "bored"\n')
        with pytest.raises(ValueError, match=r"rule 0: stop_reason 'bored'"):
            load_rules(rules)
        rules.write_text('[[rules]]\npattern = "x"\nreplly = "y"\n')
        with pytest.raises(ValueError, match="replly"):
            load_rules(rules)


def _cached_row(custom_id: str, ttl: str = "5m", *, chars: int = 20_000) -> dict[str, Any]:
    """A row whose system prompt (about chars/4 tokens) carries a cache breakpoint."""
    system = [{"type": "text", "text": "Policy. " * (chars // 8),
               "cache_control": {"type": "ephemeral", "ttl": ttl}}]  # fmt: skip
    return _row(custom_id, system=system, messages=[{"role": "user", "content": custom_id}])


class TestPromptCache:
    def test_write_then_read_then_expiry(self, emulator: EmulatorThread) -> None:
        """One batch writes the prefix, the next reads it, after the TTL it is written again."""
        client = sdk_client(emulator.base_url)
        first = _message(ended_results(client, [_cached_row("a")]), "a")["usage"]
        assert first["cache_creation_input_tokens"] == 5000
        assert first["cache_creation"] == {"ephemeral_5m_input_tokens": 5000,
                                           "ephemeral_1h_input_tokens": 0}  # fmt: skip
        assert first["cache_read_input_tokens"] == 0
        second = _message(ended_results(client, [_cached_row("b")]), "b")["usage"]
        assert second["cache_read_input_tokens"] == 5000
        assert second["cache_creation_input_tokens"] == 0
        assert second["input_tokens"] == 1  # "b" after the cached prefix
        emulator.advance_clock(301)
        third = _message(ended_results(client, [_cached_row("c")]), "c")["usage"]
        assert third["cache_creation_input_tokens"] == 5000

    def test_reads_refresh_and_1h_lasts_an_hour(self, emulator: EmulatorThread) -> None:
        client = sdk_client(emulator.base_url)
        usage = _message(ended_results(client, [_cached_row("a", "1h")]), "a")["usage"]
        assert usage["cache_creation"]["ephemeral_1h_input_tokens"] == 5000
        emulator.advance_clock(3000)
        usage = _message(ended_results(client, [_cached_row("b", "1h")]), "b")["usage"]
        assert usage["cache_read_input_tokens"] == 5000
        emulator.advance_clock(3000)  # 6000 s after the write, 3000 after the refreshing read
        usage = _message(ended_results(client, [_cached_row("c", "1h")]), "c")["usage"]
        assert usage["cache_read_input_tokens"] == 5000

    def test_short_prefix_is_silently_uncached(self, emulator: EmulatorThread) -> None:
        """Haiku 4.5 caches from 4,096 tokens: a 1,000-token prefix is billed as input."""
        client = sdk_client(emulator.base_url)
        for key in ("a", "b"):
            usage = _message(ended_results(client, [_cached_row(key, chars=4000)]), key)["usage"]
            assert usage["cache_creation_input_tokens"] == 0
            assert usage["cache_read_input_tokens"] == 0
            assert usage["input_tokens"] == 1001

    def test_prefix_long_enough_for_one_model_only(self, emulator: EmulatorThread) -> None:
        """Haiku 5.5 caches from 512 tokens, Haiku 4.5 from 4,096."""
        client = sdk_client(emulator.base_url)
        rows = [_cached_row("a", chars=4000)]
        rows[0]["params"]["model"] = "claude-haiku-5-5"
        rows[0]["params"]["thinking"] = {"type": "disabled"}
        usage = _message(ended_results(client, rows), "a")["usage"]
        assert usage["cache_creation_input_tokens"] == 1000

    def test_cache_miss_fraction(self, emulator: EmulatorThread) -> None:
        """With cache_miss=1 every would-be read writes again, and the misses are counted."""
        client = sdk_client(emulator.base_url)
        ended_results(client, [_cached_row("w")])
        emulator.set_faults(cache_miss=1.0)
        usage = _message(ended_results(client, [_cached_row("m")]), "m")["usage"]
        assert usage["cache_read_input_tokens"] == 0
        assert usage["cache_creation_input_tokens"] == 5000
        assert emulator.stats()["faults_injected"]["cache_miss"] == 1

    def test_usage_totals_in_stats(self, emulator: EmulatorThread) -> None:
        client = sdk_client(emulator.base_url)
        ended_results(client, [_cached_row("a"), _cached_row("b")])
        totals = emulator.stats()["usage_totals"]["claude-haiku-4-5"]
        assert totals["requests"] == 2
        assert totals["cache_creation_5m_input_tokens"] == 5000
        assert totals["cache_read_input_tokens"] == 5000
        assert totals["cache_creation_1h_input_tokens"] == 0 and totals["thinking_tokens"] == 0
