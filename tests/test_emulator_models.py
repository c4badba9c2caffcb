"""
Every model in the catalog against every model rule, through the SDK over HTTP.

The expected verdicts are read from the catalog (daemon/models/catalog.toml), so
a model added there is tested here with no new code; `TestFacts` pins a few
verdicts to shared/BATCHES_API.md by hand, so a wrong catalog entry fails too.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from batchd.daemon.emulator import EmulatorThread
from batchd.daemon.models.catalog import (
    EFFORTS,
    THINKING_TYPES,
    ModelInfo,
    default_catalog,
    effort_at_most,
)
from tests.fixtures.emulator import ended_results, old_api_client, sdk_client

_CATALOG = default_catalog()
_TODAY = dt.datetime.now(dt.UTC).date()
_TOOL = {"name": "classify", "input_schema": {"type": "object", "properties": {
    "label": {"type": "string"}}, "required": ["label"]}}  # fmt: skip
_SCHEMA = {"type": "object", "properties": {"label": {"type": "string"}},
           "required": ["label"], "additionalProperties": False}  # fmt: skip


def _row(custom_id: str, model: str, **params: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": 4096,
        "messages": [{"role": "user", "content": "ticket: my printer is on fire"}],
    }
    body.update(params)
    return {"custom_id": custom_id, "params": body}


def _disabled_ok(info: ModelInfo) -> bool:
    if "disabled" not in info.thinking_types:
        return False
    ceiling = info.disabled_max_effort
    return ceiling is None or effort_at_most(info.effort_default or "high", ceiling)


def _cases(model: str, info: ModelInfo) -> list[tuple[dict[str, Any], bool, str]]:
    """(row, succeeds?, the param an error names) for each rule of the model."""
    cases: list[tuple[dict[str, Any], bool, str]] = [
        (_row("at_limit", model, max_tokens=info.max_output), True, ""),
        (_row("over_limit", model, max_tokens=info.max_output + 1), False, "max_tokens"),
        (_row("format", model, output_config={"format": {"type": "json_schema",
                                                          "schema": _SCHEMA}}),
         info.structured_output, "output_config.format"),
        (_row("forced_tool", model, tools=[_TOOL], tool_choice={"type": "any"}),
         info.forced_tool_choice, "tool_choice"),
        (_row("named_tool", model, tools=[_TOOL], tool_choice={"type": "tool", "name": "classify"}),
         info.forced_tool_choice, "tool_choice"),
        (_row("prefill", model, messages=[{"role": "user", "content": "label?"},
                                          {"role": "assistant", "content": "The label is"}]),
         info.prefill, "messages"),
        (_row("geo_us", model, inference_geo="us"), info.inference_geo_us, "inference_geo"),
        (_row("geo_global", model, inference_geo="global"), True, ""),
    ]  # fmt: skip
    for kind in THINKING_TYPES:
        thinking: dict[str, Any] = {"type": kind}
        if kind == "enabled":
            thinking["budget_tokens"] = 2048
        ok = kind in info.thinking_types and (kind != "disabled" or _disabled_ok(info))
        cases.append((_row(f"thinking_{kind}", model, thinking=thinking), ok, "thinking"))
    for effort in EFFORTS:
        config = {"effort": effort}
        cases.append(
            (_row(f"effort_{effort}", model, output_config=config), effort in info.efforts,
             "output_config.effort")
        )  # fmt: skip
    return cases


def _check(results: dict[str, dict[str, Any]], cases: list[Any], model: str) -> None:
    for row, ok, names in cases:
        result = results[row["custom_id"]]
        if ok:
            assert result["type"] == "succeeded", (model, row["custom_id"], result)
        else:
            assert result["type"] == "errored", (model, row["custom_id"], result)
            error = result["error"]["error"]
            assert error["type"] == "invalid_request_error", (model, row["custom_id"], error)
            assert names in error["message"], (model, row["custom_id"], error["message"])


@pytest.mark.parametrize("model", _CATALOG.ids())
def test_every_rule_of_every_model(emulator: EmulatorThread, model: str) -> None:
    """Each model accepts and rejects what its catalog entry says (retired ones: not_found)."""
    info = _CATALOG.get(model)
    assert info is not None
    cases = _cases(model, info)
    client = sdk_client(emulator.base_url)
    results = ended_results(client, [row for row, _, _ in cases])
    if info.retired_on(_TODAY):
        errors = {r["error"]["error"]["type"] for r in results.values() if r["type"] == "errored"}
        assert errors == {"not_found_error"} and len(results) == len(cases)
        assert all(model in r["error"]["error"]["message"] for r in results.values())
        return
    _check(results, cases, model)
    # The batch-only 300K beta raises the ceiling only where the model has it.
    beta = _CATALOG.beta_output_300k
    assert beta is not None
    ceiling = info.max_output_beta or info.max_output
    beta_cases = [
        (_row("beta_limit", model, max_tokens=ceiling), True, ""),
        (_row("beta_over", model, max_tokens=ceiling + 1), False, "max_tokens"),
    ]
    beta_results = ended_results(
        client, [row for row, _, _ in beta_cases], extra_headers={"anthropic-beta": beta}
    )
    _check(beta_results, beta_cases, model)
    # Under 2023-06-01, a non-default temperature: only the thinking-limited models take it.
    old_cases = [
        (_row("temperature", model, temperature=0.5),
         info.sampling == "thinking_limited" and not info.thinks_by_default(), "temperature"),
    ]  # fmt: skip
    _check(ended_results(old_api_client(emulator.base_url), [old_cases[0][0]]), old_cases, model)


@pytest.mark.parametrize("model", sorted(_CATALOG.retired))
def test_models_retired_before_the_sdk_list_are_not_found(
    emulator: EmulatorThread, model: str
) -> None:
    results = ended_results(sdk_client(emulator.base_url), [_row("r", model, max_tokens=16)])
    error = results["r"]["error"]["error"]
    assert error["type"] == "not_found_error"
    assert "retired" in error["message"] and model in error["message"]


class TestFacts:
    """Verdicts from the facts page, written out by hand (the catalog must agree)."""

    @pytest.mark.parametrize(
        ("model", "params", "ok"),
        [
            ("claude-opus-5-5", {"tools": [_TOOL], "tool_choice": {"type": "any"}}, False),
            ("claude-sonnet-5-5", {"tools": [_TOOL], "tool_choice": {"type": "any"}}, False),
            ("claude-fable-5-1", {"tools": [_TOOL], "tool_choice": {"type": "any"}}, False),
            ("claude-haiku-5-5", {"tools": [_TOOL], "tool_choice": {"type": "any"}}, True),
            ("claude-haiku-4-5", {"thinking": {"type": "adaptive"}}, False),
            ("claude-haiku-4-5", {"output_config": {"effort": "low"}}, False),
            ("claude-opus-5", {"thinking": {"type": "enabled", "budget_tokens": 1024}}, False),
            ("claude-opus-5", {"thinking": {"type": "disabled"},
                               "output_config": {"effort": "max"}}, False),
            ("claude-opus-5", {"thinking": {"type": "disabled"},
                               "output_config": {"effort": "high"}}, True),
            ("claude-sonnet-5-5", {"thinking": {"type": "disabled"}}, False),
            ("claude-sonnet-5-5", {"thinking": {"type": "between_tools"}}, True),
            ("claude-opus-4-6", {"output_config": {"effort": "xhigh"}}, False),
            ("claude-opus-4-5", {"messages": [{"role": "user", "content": "a"},
                                              {"role": "assistant", "content": "b"}]}, True),
            ("claude-sonnet-4-6", {"messages": [{"role": "user", "content": "a"},
                                                {"role": "assistant", "content": "b"}]}, False),
            ("claude-haiku-4-5", {"max_tokens": 64_001}, False),
            ("claude-sonnet-4-6", {"inference_geo": "us"}, True),
            ("claude-haiku-4-5", {"inference_geo": "us"}, False),
            ("claude-haiku-4-5", {"tools": [_TOOL], "tool_choice": {"type": "any"},
                                  "thinking": {"type": "enabled", "budget_tokens": 1024}}, False),
        ],
    )  # fmt: skip
    def test_verdict(
        self, emulator: EmulatorThread, model: str, params: dict[str, Any], ok: bool
    ) -> None:
        results = ended_results(sdk_client(emulator.base_url), [_row("r", model, **params)])
        assert (results["r"]["type"] == "succeeded") is ok, results["r"]

    @pytest.mark.parametrize(
        "model", ["claude-sonnet-4-5", "claude-sonnet-4-5-20250929", "claude-mythos-preview"]
    )
    def test_retired_by_today(self, emulator: EmulatorThread, model: str) -> None:
        """Sonnet 4.5 retired 2026-11-30, Mythos Preview 2026-06-30 (the SDK's list)."""
        results = ended_results(sdk_client(emulator.base_url), [_row("r", model)])
        assert results["r"]["error"]["error"]["type"] == "not_found_error"

    def test_extra_models_file(self, emulator_factory: Any, tmp_path: Any) -> None:
        """``models=`` (``--models FILE``) adds a model without a release."""
        extra = tmp_path / "models.toml"
        extra.write_text('[models."claude-haiku-6"]\nlike = "claude-haiku-5-5"\n')
        emulator = emulator_factory(models=[extra])
        results = ended_results(sdk_client(emulator.base_url), [_row("r", "claude-haiku-6")])
        assert results["r"]["type"] == "succeeded"
