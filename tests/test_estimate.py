"""
``batchd estimate`` as an operator runs it before spending anything: a real CSV with
malformed rows, a real subprocess, and an emulator that must hear nothing.
"""

from __future__ import annotations

import csv
import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from batchd.daemon.emulator import EmulatorConfig, EmulatorThread
from tests.fixtures.service import ServiceWorkspace, describe, workspaces

ROWS = 300
MAX_TOKENS = 16
SYSTEM = "Classify the support ticket as one of: billing, bug, feature, account, other."
# Batch prices of claude-haiku-4-5 per token: half of $1 / $5 per million.
HAIKU_IN = 0.5 / 1e6
HAIKU_OUT = 2.5 / 1e6


@dataclass
class EstimateRun:
    workspace: ServiceWorkspace
    json_run: subprocess.CompletedProcess[str]
    table_run: subprocess.CompletedProcess[str]
    before: set[Path]
    after: set[Path]
    api_calls: dict[str, int]


def _files(root: Path) -> set[Path]:
    return {p.relative_to(root) for p in root.rglob("*") if "logs" not in p.parts}


@pytest.fixture(scope="class")
def estimate_run() -> Iterator[EstimateRun]:
    """``batchd estimate --json`` and the table form, on 300 tickets plus 2 bad rows."""
    emulator = EmulatorThread(EmulatorConfig(seed=1234)).start()
    try:
        with workspaces() as make:
            ws: ServiceWorkspace = make(emulator.base_url, "estimate")
            ws.write_tickets("tickets", ROWS, bad_rows=True)
            pipeline = ws.pipeline(max_tokens=MAX_TOKENS)
            pipeline["request"]["system"] = SYSTEM
            ws.write_config(pipeline)
            before = _files(ws.root)
            json_run = ws.run("estimate", "@config", "--json")
            table_run = ws.run("estimate", "@config")
            calls = emulator.stats()["http_requests"]
            yield EstimateRun(ws, json_run, table_run, before, _files(ws.root), calls)
    finally:
        emulator.stop()


def _good_bodies(path: Path) -> list[str]:
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))[1:]
    return [body for key, *rest in rows if key and len(rest) == 1 for body in rest]


class TestEstimate:
    def test_counts_rows_and_unusable_rows(self, estimate_run: EstimateRun) -> None:
        """Every well-formed row is counted; the two malformed ones are reported apart."""
        assert estimate_run.json_run.returncode == 0, describe(estimate_run.json_run)
        (result,) = json.loads(estimate_run.json_run.stdout)
        assert result["pipeline"] == "tickets"
        assert result["rows"] == ROWS
        assert result["unusable_rows"] == 2
        assert result["max_output_tokens"] == ROWS * MAX_TOKENS

    def test_input_tokens_in_a_sane_band(self, estimate_run: EstimateRun) -> None:
        """Input tokens are about one per four characters of system prompt and ticket."""
        (result,) = json.loads(estimate_run.json_run.stdout)
        bodies = _good_bodies(estimate_run.workspace.root / "tickets.csv")
        assert len(bodies) == ROWS
        chars = sum(len(b) for b in bodies) + ROWS * len(SYSTEM)
        assert chars / 4 * 0.9 <= result["input_tokens"] <= chars / 4 * 1.5

    def test_cost_range_at_batch_prices(self, estimate_run: EstimateRun) -> None:
        """Low pays for input only, high adds every max_tokens answer, both at batch prices."""
        (result,) = json.loads(estimate_run.json_run.stdout)
        low, high = result["cost_low_usd"], result["cost_high_usd"]
        assert 0 < low < high
        assert low == pytest.approx(result["input_tokens"] * HAIKU_IN, rel=1e-6)
        assert high - low == pytest.approx(ROWS * MAX_TOKENS * HAIKU_OUT, rel=1e-6)

    def test_table_for_people(self, estimate_run: EstimateRun) -> None:
        """Without --json it prints a table with the row count and says nothing was sent."""
        run = estimate_run.table_run
        assert run.returncode == 0, describe(run)
        assert "nothing was submitted" in run.stdout
        assert "tickets" in run.stdout and f"{ROWS:,}" in run.stdout

    def test_writes_nothing_and_calls_no_api(self, estimate_run: EstimateRun) -> None:
        """No state dir, manifest, ledger or sink output appears, and the API hears nothing."""
        assert estimate_run.after == estimate_run.before
        assert not estimate_run.workspace.state_dir.exists()
        assert not (estimate_run.workspace.root / "out").exists()
        assert estimate_run.api_calls == {}
