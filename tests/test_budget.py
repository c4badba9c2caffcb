"""
Cost budgets: the arithmetic of ``batchd.daemon.models.budget`` against real price tables, and
``budget_usd`` end to end — a real ``batchd run`` stopped by its budget, then resumed
with a bigger one.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from batchd.daemon.config import PipelineConfig, load_config
from batchd.daemon.emulator import EmulatorConfig, EmulatorThread
from batchd.daemon.models.budget import Budget
from batchd.daemon.models.pricing import PriceTable
from batchd.daemon.wal.manifest_state import ChunkState, PipelineState, Stage
from tests.fixtures.service import RULES_PATH, ServiceWorkspace, describe, workspaces

# Batch prices of claude-haiku-4-5: half of $1 / $5 per million tokens.
HAIKU_IN = 0.5 / 1e6
HAIKU_OUT = 2.5 / 1e6


def _pipeline(tmp_path: Path, *, model: str = "claude-haiku-4-5", max_tokens: int = 100,
              budget: float | None = 1.0, prices: str = "") -> tuple[PipelineConfig, PriceTable]:
    """A pipeline read from a real config file, and the price table that file implies."""
    budget_line = f"budget_usd = {budget}" if budget is not None else ""
    path = tmp_path / "budget.toml"
    path.write_text(f"""
{prices}
[[pipeline]]
name = "p"
{budget_line}
[pipeline.source]
type = "csv"
path = "in.csv"
key = "id"
[pipeline.request]
model = "{model}"
max_tokens = {max_tokens}
user = "{{body}}"
[[pipeline.sink]]
type = "jsonl"
path = "out"
""")
    config = load_config(path)
    return config.pipelines[0], PriceTable(config.prices, source=str(path))


def _chunk(stage: Stage, requests: int = 10, size: int = 4000) -> ChunkState:
    return ChunkState(chunk=f"p-{stage.value}", pipeline="p", attempt=1, requests=requests,
                      bytes=size, rejects=0, first_seq=1, last_seq=requests, position=None,
                      parent=None, stage=stage)


class TestUpperBound:
    def test_input_at_four_bytes_a_token_and_full_answers(self, tmp_path: Path) -> None:
        """10 requests of 4,000 bytes with max_tokens 100: 1,000 input + 1,000 output tokens."""
        pipeline, prices = _pipeline(tmp_path)
        budget = Budget(pipeline, prices)
        assert budget.upper_bound(10, 4000) == pytest.approx(1000 * HAIKU_IN + 1000 * HAIKU_OUT)

    def test_price_overrides_from_the_config_apply(self, tmp_path: Path) -> None:
        """``[prices."model"]`` in the config changes what the budget charges."""
        pipeline, prices = _pipeline(
            tmp_path, prices='[prices."claude-haiku-4-5"]\ninput = 2.0\noutput = 10.0\n'
        )
        budget = Budget(pipeline, prices)
        assert budget.upper_bound(10, 4000) == pytest.approx(2 * (1000 * HAIKU_IN +
                                                                  1000 * HAIKU_OUT))

    def test_templated_model_costs_the_most_expensive_price(self, tmp_path: Path) -> None:
        """A model chosen per row is unknown in advance, so it is priced high, never free."""
        pipeline, prices = _pipeline(tmp_path, model="{model}")
        budget = Budget(pipeline, prices)
        assert not prices.known("no-such-model")
        top = prices.dearest()  # the dearest category prices of every catalog model
        assert top.output >= 50.0  # Fable/Mythos 5.x list output price, per the catalog
        expected = (1000 * top.input + 1000 * top.output) / 1e6 * 0.5
        assert budget.upper_bound(10, 4000) == pytest.approx(expected)
        assert expected > 1000 * HAIKU_IN + 1000 * HAIKU_OUT


    def test_cache_writes_bound_the_input(self, tmp_path: Path) -> None:
        """With cache = "1h" every input token may be a 1-hour write (2x input): bound at that."""
        pipeline, prices = _pipeline(tmp_path, model="claude-haiku-5-5")
        plain = Budget(pipeline, prices).upper_bound(10, 4000)
        path = tmp_path / "budget.toml"
        path.write_text(path.read_text().replace('user = "{body}"',
                                                 'user = "{body}"\ncache = "1h"\nsystem = "s"'))
        config = load_config(path)
        cached = Budget(config.pipelines[0], PriceTable(config.prices)).upper_bound(10, 4000)
        # Haiku 5.5: input 0.10, 1h write 0.20, output 0.50 per MTok; batch halves them.
        assert plain == pytest.approx((1000 * 0.10 + 1000 * 0.50) / 1e6 * 0.5)
        assert cached == pytest.approx((1000 * 0.20 + 1000 * 0.50) / 1e6 * 0.5)

    def test_haiku_5_5_long_prompts_use_the_long_tier(self, tmp_path: Path) -> None:
        """Requests averaging over 100,000 prompt tokens are bounded at Haiku 5.5's long tier."""
        pipeline, prices = _pipeline(tmp_path, model="claude-haiku-5-5", max_tokens=10)
        budget = Budget(pipeline, prices)
        # 2 requests of 800,000 bytes: 200,000 tokens each, past the 100,000 threshold.
        expected = (400_000 * 0.50 + 20 * 2.50) / 1e6 * 0.5
        assert budget.upper_bound(2, 1_600_000) == pytest.approx(expected)


class TestInFlight:
    def test_only_unsettled_chunks_count(self, tmp_path: Path) -> None:
        """Sealed, intent, submitted and ended chunks count; committed ones are already spent."""
        pipeline, prices = _pipeline(tmp_path)
        budget = Budget(pipeline, prices)
        one = budget.upper_bound(10, 4000)
        chunks = [_chunk(stage) for stage in Stage]
        assert budget.in_flight(chunks) == pytest.approx(4 * one)


class TestRefusal:
    def test_no_budget_never_refuses(self, tmp_path: Path) -> None:
        """Without budget_usd any chunk may be sealed."""
        pipeline, prices = _pipeline(tmp_path, budget=None)
        state = PipelineState("p", cost_usd=1e9)
        assert Budget(pipeline, prices).refusal(state, [], 100_000, 10**8) is None

    def test_exactly_at_the_limit_fits(self, tmp_path: Path) -> None:
        """Spent + in flight + next chunk equal to budget_usd is allowed; a cent more is not."""
        pipeline, prices = _pipeline(tmp_path)
        budget = Budget(pipeline, prices)
        one = budget.upper_bound(10, 4000)
        spent = 1.0 - 2 * one
        assert budget.refusal(PipelineState("p", cost_usd=spent),
                              [_chunk(Stage.SUBMITTED)], 10, 4000) is None
        assert budget.refusal(PipelineState("p", cost_usd=spent + 0.01),
                              [_chunk(Stage.SUBMITTED)], 10, 4000) is not None

    def test_refusal_explains_the_sum(self, tmp_path: Path) -> None:
        """The reason names what was spent, what is in flight, the next chunk and the budget."""
        pipeline, prices = _pipeline(tmp_path, max_tokens=100_000, budget=2.0)
        budget = Budget(pipeline, prices)
        chunks = [_chunk(Stage.ENDED), _chunk(Stage.COMMITTED)]
        reason = budget.refusal(PipelineState("p", cost_usd=0.25), chunks, 10, 4000)
        assert reason is not None
        pending = budget.upper_bound(10, 4000)
        assert reason.startswith("budget exhausted")
        assert "spent $0.2500" in reason
        assert f"in flight up to ${pending:.4f}" in reason
        assert f"next chunk up to ${pending:.4f}" in reason
        assert "budget_usd $2.00" in reason

    def test_no_state_yet_means_nothing_spent(self, tmp_path: Path) -> None:
        """A pipeline's first chunk is checked against the whole budget."""
        pipeline, prices = _pipeline(tmp_path, max_tokens=100_000, budget=1.0)
        budget = Budget(pipeline, prices)
        assert budget.refusal(None, [], 3, 400) is None
        assert budget.refusal(None, [], 10, 4000) is not None  # 10 x 100k tokens x $2.5/M


# -- end to end ----------------------------------------------------------------------

ROWS = 100
PER_CHUNK = 20
# With max_tokens 1000 a chunk of 20 may cost up to ~$0.0505 (the answers dominate):
# two chunks fit $0.12, a third does not.
MAX_TOKENS = 1000
BUDGET = 0.12


@dataclass
class BudgetRun:
    workspace: ServiceWorkspace
    paused: Any  # the first run's CompletedProcess
    paused_events: list[dict[str, Any]]
    status: dict[str, Any]
    sink_after_pause: int
    stats_after_pause: dict[str, Any]
    resumed: Any
    resumed_events: list[dict[str, Any]]
    stats: dict[str, Any]


def _events(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


@pytest.fixture(scope="class")
def budget_run() -> Iterator[BudgetRun]:
    """Run into the budget; read status; raise the budget in the config; run again."""
    emulator = EmulatorThread(EmulatorConfig(seed=1234, rules=RULES_PATH, latency=0.3)).start()
    try:
        with workspaces() as make:
            ws: ServiceWorkspace = make(emulator.base_url, "budget")
            ws.write_tickets("tickets", ROWS)
            ws.write_config(ws.pipeline(max_requests=PER_CHUNK, max_tokens=MAX_TOKENS,
                                        budget_usd=BUDGET))
            paused = ws.run_drained(expect=3)
            status = ws.status()
            sink_after_pause = sum(ws.sink_keys().values())
            stats_after_pause = emulator.stats()
            ws.write_config(ws.pipeline(max_requests=PER_CHUNK, max_tokens=MAX_TOKENS,
                                        budget_usd=100.0))
            resumed = ws.run_drained()
            yield BudgetRun(ws, paused, _events(paused.stdout), status, sink_after_pause,
                            stats_after_pause, resumed, _events(resumed.stdout),
                            emulator.stats())
    finally:
        emulator.stop()


class TestBudgetEndToEnd:
    def test_until_drained_exits_3_naming_the_budget(self, budget_run: BudgetRun) -> None:
        """The run stops with exit 3 and says on stderr that the budget is exhausted."""
        stderr = budget_run.paused.stderr
        assert "paused" in stderr and "budget" in stderr, describe(budget_run.paused)
        assert f"budget_usd ${BUDGET:.2f}" in stderr

    def test_status_shows_the_pause_and_its_reason(self, budget_run: BudgetRun) -> None:
        """``batchd status --json`` reports the pipeline paused by the budget, with an alarm."""
        (pipeline,) = budget_run.status["pipelines"]
        assert pipeline["paused"].startswith("budget exhausted")
        assert pipeline["budget_usd"] == BUDGET
        kinds = [a["kind"] for a in budget_run.status["alarms"]]
        assert kinds == ["budget_exhausted"]

    def test_no_chunk_sealed_or_batch_created_after_the_pause(self, budget_run: BudgetRun) -> None:
        """Intake stops at the refusal: two chunks were sealed, none after, no batch beyond."""
        names = [e["event"] for e in budget_run.paused_events]
        pause = next(i for i, e in enumerate(budget_run.paused_events)
                     if e["event"] == "alarm" and e.get("alarm") == "budget_exhausted")
        assert names[:pause].count("chunk sealed") == 2
        assert "chunk sealed" not in names[pause:]
        assert budget_run.stats_after_pause["batches_created"] <= 2

    def test_admitted_chunks_are_collected_before_exit(self, budget_run: BudgetRun) -> None:
        """Every row of the chunks sealed before the pause is in the sink when run exits."""
        sealed = sum(e["requests"] for e in budget_run.paused_events
                     if e["event"] == "chunk sealed")
        assert sealed == 2 * PER_CHUNK
        assert budget_run.sink_after_pause == sealed
        assert budget_run.stats_after_pause["batches_created"] == 2

    def test_raised_budget_completes_the_rest_once(self, budget_run: BudgetRun) -> None:
        """With the budget raised, a second run resumes and every key lands exactly once."""
        names = [e["event"] for e in budget_run.resumed_events]
        assert "resuming a pipeline paused before the restart" in names
        keys = budget_run.workspace.sink_keys()
        assert len(keys) == ROWS and set(keys.values()) == {1}
        received = budget_run.stats["received"]
        assert len(received) == ROWS and set(received.values()) == {1}
        assert budget_run.stats["batches_created"] == ROWS // PER_CHUNK


class TestSmallBudgets:
    """A budget under a cent is shown as set, not rounded to "$0.00"."""

    def test_refusal_names_the_budget_as_set(self, tmp_path: Path) -> None:
        pipeline, prices = _pipeline(tmp_path, max_tokens=100_000, budget=0.004)
        reason = Budget(pipeline, prices).refusal(None, [], 10, 4000)
        assert reason is not None and reason.endswith("budget_usd $0.004"), reason

    def test_status_shows_the_budget_as_set(self, tmp_path: Path) -> None:
        from rich.console import Console

        from batchd.daemon.ops.status import collect_status, render_status

        _pipeline(tmp_path, budget=0.004)
        (tmp_path / "in.csv").write_text("id,body\n1,x\n")
        config = load_config(tmp_path / "budget.toml")
        console = Console(record=True, width=120)
        render_status(collect_status(config), console)
        assert "$0.0000 / $0.004" in console.export_text()
