"""
``batchd estimate`` priced from the model catalog: per model, thinking by effort or
budget in the low bound, caching as one write and reads after (low) or every request
writing (high), and an unknown model flagged, never priced.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest

from batchd.daemon.commands.estimate import THINKING_FLOOR, Estimate, estimate_pipeline
from batchd.daemon.config import load_config
from tests.fixtures.engine import dump_toml

ROWS = 10
BODY = "b" * 40  # 10 tokens


def run(tmp_path: Path, request: dict[str, Any], bodies: list[tuple[str, str]] | None = None,
        ) -> Estimate:
    rows = bodies or [(str(i), "claude-haiku-5-5") for i in range(ROWS)]
    (tmp_path / "in.csv").write_text("id,body,model\n" + "".join(
        f"{k},{BODY},{m}\n" for k, m in rows))
    data = {"pipeline": [{
        "name": "p", "source": {"type": "csv", "path": "in.csv", "key": "id"},
        "request": {"model": "claude-haiku-5-5", "max_tokens": 1000, "user": "{body}",
                    **request},
        "sink": [{"type": "jsonl", "path": "out"}]}]}
    path = tmp_path / "p.toml"
    path.write_text(dump_toml(data))
    config = load_config(path)
    return anyio.run(estimate_pipeline, config, config.pipelines[0])


IN, OUT, W1H, READ = 0.10, 0.50, 0.20, 0.01  # Haiku 5.5 list, USD per MTok
HALF = 0.5 / 1e6


def test_thinking_by_default_is_in_the_low_bound(tmp_path: Path) -> None:
    """Haiku 5.5 thinks by default at effort medium: the low bound pays those tokens."""
    (model,) = run(tmp_path, {}).models
    assert model.thinking_tokens == THINKING_FLOOR["medium"] == 128
    assert "thinks by default, effort medium" in model.note
    assert model.cost_low_usd == pytest.approx(ROWS * (10 * IN + 128 * OUT) * HALF)
    assert model.cost_high_usd == pytest.approx(ROWS * (10 * IN + 1000 * OUT) * HALF)


def test_thinking_off_and_manual_budget(tmp_path: Path) -> None:
    (off,) = run(tmp_path, {"thinking": "disabled"}).models
    assert off.thinking_tokens == 0
    assert off.cost_low_usd == pytest.approx(ROWS * 10 * IN * HALF)
    (budget,) = run(tmp_path, {"model": "claude-sonnet-4-6", "thinking": {"budget_tokens": 2048},
                               "max_tokens": 4096}, [(str(i), "x") for i in range(ROWS)]).models
    assert budget.thinking_tokens == 1024


def test_cache_written_once_then_read(tmp_path: Path) -> None:
    """cache = "1h" on a 3,000-token system prompt: low writes it once and reads it after;
    high writes it for every request."""
    system = "s" * 12_000  # 3,000 tokens
    (model,) = run(tmp_path, {"cache": "1h", "system": system, "thinking": "disabled"}).models
    assert model.cached_tokens == ROWS * 3000
    low = (ROWS * 10 * IN + 3000 * W1H + (ROWS - 1) * 3000 * READ) * HALF
    high = (ROWS * 10 * IN + ROWS * 3000 * W1H + ROWS * 1000 * OUT) * HALF
    assert model.cost_low_usd == pytest.approx(low)
    assert model.cost_high_usd == pytest.approx(high)


def test_unknown_model_is_flagged_not_priced(tmp_path: Path) -> None:
    """A model per record: each is listed; one the catalog lacks has no cost at all."""
    rows = [("1", "claude-haiku-5-5"), ("2", "claude-next-7"), ("3", "claude-next-7")]
    result = run(tmp_path, {"model": "{model}", "thinking": "disabled"}, rows)
    by_model = {m.model: m for m in result.models}
    assert by_model["claude-next-7"].rows == 2
    assert by_model["claude-next-7"].cost_low_usd is None
    assert "not in the model catalog" in by_model["claude-next-7"].note
    assert result.unpriced_rows == 2
    assert result.cost_low_usd == pytest.approx(by_model["claude-haiku-5-5"].cost_low_usd)


def test_tool_definitions_are_input(tmp_path: Path) -> None:
    """A forced tool with a long description is sent (and billed) with every request:
    the estimate counts it, cached with the system prompt when `cache` is on."""
    description = "Pick the label that fits the ticket best. " * 100  # 4,300 characters
    tool = {"name": "label", "description": description,
            "input_schema": {"type": "object", "properties": {"l": {"type": "string"}}}}
    request = {"thinking": "disabled", "tools": [tool], "tool_choice": {"type": "any"}}
    (plain,) = run(tmp_path, request).models
    assert plain.input_tokens >= ROWS * (10 + len(description) // 4)
    (cached,) = run(tmp_path, {**request, "cache": "1h", "system": "s" * 400}).models
    assert cached.cached_tokens >= ROWS * (100 + len(description) // 4)
