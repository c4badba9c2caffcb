"""
Pre-flight checks against the model catalog: a request the model would reject stops
``batchd run`` with exit 2 before a row is read; a model named per record is checked per
record and dead-lettered with the reason before anything is paid for.
"""

from __future__ import annotations

import datetime as dt
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from batchd.daemon.config import load_config
from batchd.daemon.emulator import EmulatorThread
from batchd.daemon.models.catalog import default_catalog
from batchd.daemon.models.preflight import check_model, preflight
from batchd.plugins.errors import ConfigError
from tests.fixtures.engine import Workspace, describe, dump_toml

TODAY = dt.date(2026, 12, 1)


def config_with(tmp_path: Path, request: dict[str, Any], *, top: dict[str, Any] | None = None,
                api: dict[str, Any] | None = None, budget: float | None = None) -> Path:
    pipeline: dict[str, Any] = {
        "name": "tickets",
        "source": {"type": "csv", "path": "t.csv", "key": "id"},
        "request": {"max_tokens": 64, "user": "{body}", **request},
        "sink": [{"type": "jsonl", "path": "out"}],
    }
    if budget is not None:
        pipeline["budget_usd"] = budget
    data: dict[str, Any] = {"state_dir": "state", **(top or {})}
    if api:
        data["api"] = api
    data["pipeline"] = [pipeline]
    path = tmp_path / "pipeline.toml"
    path.write_text(dump_toml(data), encoding="utf-8")
    return path


def refusal(tmp_path: Path, request: dict[str, Any], **kwargs: Any) -> str:
    config = load_config(config_with(tmp_path, request, **kwargs))
    with pytest.raises(ConfigError) as info:
        preflight(config, today=TODAY)
    return str(info.value)


class TestRules:
    @pytest.mark.parametrize(
        ("request_", "key", "words"),
        [
            ({"model": "claude-sonnet-4-5"}, "model", "retired on 2026-11-30"),
            ({"model": "claude-3-5-haiku-latest"}, "model", "retired on 2026-02-19"),
            ({"model": "claude-haiku-4-5", "max_tokens": 64_001}, "max_tokens",
             "above claude-haiku-4-5's limit of 64,000"),
            ({"model": "claude-opus-5-5", "thinking": "disabled"}, "thinking",
             "it always thinks"),
            ({"model": "claude-haiku-5-5", "thinking": {"budget_tokens": 2048},
              "max_tokens": 4096}, "thinking", "rejects thinking = {budget_tokens = N}"),
            ({"model": "claude-haiku-4-5", "thinking": "adaptive"}, "thinking",
             "takes disabled, enabled"),
            ({"model": "claude-haiku-4-5", "effort": "low"}, "effort", "does not take effort"),
            ({"model": "claude-opus-4-6", "effort": "xhigh"}, "effort",
             "takes effort low, medium, high, max"),
            ({"model": "claude-haiku-5-5", "thinking": "disabled", "effort": "max"}, "effort",
             'only at effort high or lower'),
            ({"model": "claude-sonnet-4-6", "thinking": {"budget_tokens": 2048},
              "max_tokens": 2048}, "thinking", "must be below max_tokens"),
            ({"model": "claude-opus-5-5", "tools": [{"name": "t", "input_schema":
              {"type": "object"}}], "tool_choice": "any"}, "tool_choice", "forced tool_choice"),
            ({"model": "claude-haiku-4-5", "inference_geo": "us"}, "inference_geo",
             'rejects inference_geo = "us"'),
        ],
    )
    def test_each_rule_exits_naming_key_and_rule(
        self, tmp_path: Path, request_: dict[str, Any], key: str, words: str
    ) -> None:
        message = refusal(tmp_path, request_)
        assert str(tmp_path / "pipeline.toml") in message
        assert "[pipeline.request] of 'tickets'" in message
        assert f": {key}: " in message and words in message, message
        assert message.endswith("(model catalog)")

    @pytest.mark.parametrize(
        ("model", "sampling", "key", "words"),
        [
            ("claude-haiku-5-5", {"temperature": 0.2}, "temperature", "only the default"),
            ("claude-haiku-5-5", {"temperature": 1, "top_p": 1}, "top_p", "together"),
            ("claude-sonnet-4-6", {"temperature": 0.2, "thinking": "adaptive"}, "temperature",
             "while thinking"),
            ("claude-sonnet-4-6", {"top_p": 0.5, "thinking": "adaptive"}, "top_p",
             "between 0.95 and 1"),
        ],
    )
    def test_sampling_under_2023_06_01_is_judged_per_model(
        self, tmp_path: Path, model: str, sampling: dict[str, Any], key: str, words: str
    ) -> None:
        message = refusal(tmp_path, {"model": model, **sampling},
                          api={"version": "2023-06-01"})
        assert f": {key}: " in message and words in message, message

    @pytest.mark.parametrize(
        ("model", "request_"),
        [("claude-haiku-5-5", {"temperature": 1}),
         ("claude-sonnet-4-6", {"temperature": 0.2, "thinking": "disabled"}),
         ("claude-haiku-4-5", {"temperature": 0.0, "top_k": 5})],
    )
    def test_sampling_a_model_takes_passes(
        self, tmp_path: Path, model: str, request_: dict[str, Any]
    ) -> None:
        config = load_config(config_with(tmp_path, {"model": model, **request_},
                                         api={"version": "2023-06-01"}))
        preflight(config, today=TODAY)

    def test_current_models_with_classifier_options_pass(self, tmp_path: Path) -> None:
        """What the examples use: Haiku 5.5, thinking off, effort low, a tight max_tokens."""
        config = load_config(config_with(tmp_path, {
            "model": "claude-haiku-5-5", "thinking": "disabled", "effort": "low",
            "max_tokens": 8}))
        preflight(config, today=TODAY)

    def test_unknown_model_is_allowed_with_a_warning(self, tmp_path: Path) -> None:
        verdict = check_model("claude-next-7", load_config(config_with(
            tmp_path, {"model": "claude-next-7"})).pipelines[0].request,
            catalog=default_catalog(), api_version="2026-10-21", today=TODAY)
        assert not verdict.errors
        assert "not in the model catalog" in verdict.warnings[0]

    def test_unpriced_model_with_a_budget_is_refused(self, tmp_path: Path) -> None:
        """A budget needs a price: an unknown model without [prices] cannot have one."""
        message = refusal(tmp_path, {"model": "claude-next-7"}, budget=5.0)
        assert "claude-next-7 has no price" in message and "[prices." in message

    def test_config_models_teach_the_catalog(self, tmp_path: Path) -> None:
        """[models."x"] like = … makes a new model checked (and priced) like its sibling."""
        top = {"models": {"claude-next-7": {"like": "claude-haiku-4-5", "max_output": 1000}}}
        message = refusal(tmp_path, {"model": "claude-next-7", "max_tokens": 2000}, top=top)
        assert "above claude-next-7's limit of 1,000" in message

    def test_a_thinking_model_with_a_tight_max_tokens_is_warned_about(self,
                                                                      tmp_path: Path) -> None:
        request = load_config(config_with(tmp_path, {"model": "claude-haiku-5-5",
                                                     "max_tokens": 8})).pipelines[0].request
        verdict = check_model("claude-haiku-5-5", request, catalog=default_catalog(),
                              api_version="2026-10-21", today=TODAY)
        assert not verdict.errors
        assert any('thinking = "disabled"' in w and "no_answer" in w for w in verdict.warnings)

    @pytest.mark.parametrize(("model", "advice"), [
        ("claude-haiku-5-5", 'thinking = "disabled"'),
        ("claude-opus-5-5", "larger max_tokens"),
        ("claude-sonnet-4-6", 'thinking = "disabled"'),
    ])
    def test_thinking_asked_for_with_a_tight_max_tokens_is_warned_about(
        self, tmp_path: Path, model: str, advice: str
    ) -> None:
        """thinking = "adaptive" said out loud is no safer than the default: every answer
        can end as no_answer (the emulator's do, at effort low: 32 thinking tokens > 8)."""
        request = load_config(config_with(tmp_path, {
            "model": model, "max_tokens": 8, "thinking": "adaptive", "effort": "low",
        })).pipelines[0].request
        verdict = check_model(model, request, catalog=default_catalog(),
                              api_version="2026-10-21", today=TODAY)
        assert not verdict.errors
        assert any(advice in w and "no_answer" in w for w in verdict.warnings), verdict.warnings


class TestRunStopsBeforeReading:
    def test_exit_2_and_nothing_touched(
        self, emulator: EmulatorThread, workspace: Callable[..., Workspace]
    ) -> None:
        """`batchd run` with a retired model: exit 2, one line naming it, no state, no API."""
        ws = workspace(emulator.base_url)
        ws.write_tickets(20)
        table = ws.pipeline()
        table["request"]["model"] = "claude-sonnet-4-5-20250929"
        from tests.fixtures.engine import dump_toml as dump

        ws.write_raw(dump({"state_dir": "state", "api": {"poll_interval": "0.1s"},
                           "pipeline": [table]}))
        proc = ws.run()
        assert proc.returncode == 2, describe(proc)
        line = proc.stderr.strip().splitlines()[-1]
        assert "pipeline.toml: [pipeline.request] of 'tickets': model:" in line
        assert "retired on 2026-11-30" in line
        assert "Traceback" not in proc.stderr
        assert not ws.state_dir.exists() and not ws.out_dir.exists()
        assert emulator.stats()["http_requests"] == {}


class TestPerRecordModel:
    def test_records_naming_a_rejected_model_are_dead_letters(
        self, emulator: EmulatorThread, workspace: Callable[..., Workspace]
    ) -> None:
        """`model = "{model}"`: a retired or over-limit model is a dead letter per record,
        with the catalog's reason; the other records are answered; nothing bad is sent."""
        ws = workspace(emulator.base_url)
        rows = [("1", "claude-haiku-4-5"), ("2", "claude-sonnet-4-5"),
                ("3", "claude-haiku-4-5-20251001"), ("4", "claude-3-opus-latest")]
        (ws.root / "tickets.csv").write_text(
            "ticket_id,body,model\n" + "".join(f"{k},my invoice is wrong,{m}\n" for k, m in rows))
        table = ws.pipeline(allowed=None)
        table["request"]["model"] = "{model}"
        ws.write_raw(dump_toml({"state_dir": "state", "api": {"poll_interval": "0.1s"},
                                "pipeline": [table]}))
        proc = ws.run()
        assert proc.returncode == 0, describe(proc)
        out = ws.outputs()
        assert out.result_keys == {"1", "3"}
        assert out.dead_keys == {"2", "4"}
        for key in ("2", "4"):
            assert out.dead[key]["error_type"] == "model_rejected"
            assert out.dead[key]["error_message"].startswith(f"model: {rows[int(key) - 1][1]} "
                                                             "was retired on")
        sent = emulator.stats()["received"]  # custom_id -> times received
        assert sent == {"t-1": 1, "t-3": 1}, sent


def test_help_lists_resume() -> None:
    proc = subprocess.run([*__import__("tests.fixtures.engine", fromlist=["BATCHD"]).BATCHD,
                           "--help"], capture_output=True, text=True, timeout=60)
    assert "resume" in proc.stdout


def test_a_retired_model_is_one_error_without_a_price_warning(tmp_path: Path) -> None:
    """Its retirement is the whole story: no 'no price known' beside it (nor a budget one)."""
    from batchd.daemon.models.preflight import preflight_problems

    config = load_config(config_with(tmp_path, {"model": "claude-opus-4-1"}, budget=5.0))
    problems, warnings = preflight_problems(config, today=TODAY, params=False)
    assert len(problems) == 1 and "retired on 2026-08-05" in str(problems[0])
    assert warnings == []
