"""
The dashboard in a real headless Chromium, and ``batchd show`` on the same run.

One daemon works through tickets against an emulator with faults switched on
(transient errors that are retried, permanent ones that are dead-lettered, two
malformed rows). Once every row is terminal, the dashboard's numbers must equal
``batchd status --json``, its dead letters and key page must tell the same story
``batchd show --json`` tells, and the API key must appear nowhere. Then the daemon
stops and ``show`` reads the stopped daemon's state.
"""

from __future__ import annotations

import html.parser
import json
import shutil
import signal
import subprocess
import tempfile
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from batchd.daemon.emulator import EmulatorConfig, EmulatorThread
from tests.fixtures.service import (
    RULES_PATH,
    RunningDaemon,
    ServiceWorkspace,
    describe,
    free_port,
    wait_until,
    workspaces,
)

TICKETS = 240
ROWS = TICKETS + 2  # two malformed rows
SECRET_KEY = "sk-ant-api03-dashboard-secret-0123456789"
FAULTS = {"api_error": 0.12, "invalid_request": 0.03}
CHROMIUM = shutil.which("chromium")

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run "
                                                          "installs it)")


def chromium(*args: str) -> subprocess.CompletedProcess[str]:
    """Plain headless Chromium, with a throwaway profile and nothing phoning home."""
    assert CHROMIUM is not None
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", f"--user-data-dir={profile}", *args],
            capture_output=True, text=True, timeout=90, check=True)


def dump_dom(url: str) -> str:
    return chromium("--dump-dom", url).stdout


class Fields(html.parser.HTMLParser):
    """Every ``data-field``/``data-value`` pair, by pipeline, and the page's text."""

    def __init__(self) -> None:
        super().__init__()
        self.values: dict[tuple[str, str], str] = {}
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if "data-field" in found and "data-value" in found:
            self.values[(found.get("data-pipeline") or "", found["data-field"] or "")] = \
                found["data-value"] or ""

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(dom: str) -> Fields:
    fields = Fields()
    fields.feed(dom)
    return fields


@dataclass
class DashboardRun:
    ws: ServiceWorkspace
    daemon: RunningDaemon
    base: str
    status: dict[str, Any]
    overview: str


@pytest.fixture(scope="module")
def run() -> Iterator[DashboardRun]:
    emulator = EmulatorThread(EmulatorConfig(seed=21, rules=RULES_PATH, faults=FAULTS)).start()
    port = free_port()
    try:
        with workspaces() as make:
            ws = make(emulator.base_url, "dash")
            ws.write_tickets("tickets", TICKETS, bad_rows=True)
            ws.write_config(ws.pipeline(max_requests=60, budget_usd=5.0), metrics_port=port)
            daemon = ws.start(env={"ANTHROPIC_API_KEY": SECRET_KEY})

            def drained() -> dict[str, Any] | None:
                status = ws.status()
                (p,) = status["pipelines"]
                return status if p["rows_done"] == ROWS and not p["batches"] else None

            status = wait_until(drained, 90, "every row terminal", step=0.3)
            base = f"http://127.0.0.1:{port}"
            overview = dump_dom(f"{base}/")
            yield DashboardRun(ws, daemon, base, status, overview)
            daemon.signal(signal.SIGTERM)
            daemon.wait(30)
    finally:
        emulator.stop()


def _show(ws: ServiceWorkspace, key: str) -> dict[str, Any]:
    proc = ws.run("show", "@config", key, "--json")
    assert proc.returncode == 0, describe(proc)
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def _dead_rows(ws: ServiceWorkspace) -> list[dict[str, Any]]:
    return [json.loads(line) for part in sorted((ws.root / "out" / "tickets-dead").glob("*.jsonl"))
            for line in part.read_text().splitlines() if line.strip()]


class TestDashboard:
    def test_numbers_match_status_json(self, run: DashboardRun) -> None:
        values = parse(run.overview).values
        (p,) = run.status["pipelines"]
        for field in ("rows_done", "succeeded", "truncated", "dead_lettered", "retried",
                      "rows_pending", "rows_read", "requests_submitted", "batches_submitted",
                      "input_tokens", "output_tokens"):
            assert values[("tickets", field)] == str(p[field]), field
        assert float(values[("tickets", "cost_usd")]) == pytest.approx(p["cost_usd"])
        assert float(values[("tickets", "budget_usd")]) == p["budget_usd"] == 5.0
        assert values[("tickets", "rows_total")] == str(p["progress"]["rows_total"]) == str(ROWS)
        assert float(values[("tickets", "fraction")]) == p["progress"]["fraction"] == 1.0
        assert p["retried"] > 0 and p["dead_lettered"] > 2  # the faults did show

    def test_shows_dead_letters_with_reasons(self, run: DashboardRun) -> None:
        text = " ".join(parse(run.overview).text)
        assert "Newest dead letters" in text
        assert "invalid_request_error" in text or "api_error" in text or "bad_record" in text
        newest = _dead_rows(run.ws)
        assert any(str(row["key"]) in text for row in newest)

    def test_no_secrets_and_no_write_actions(self, run: DashboardRun) -> None:
        assert SECRET_KEY not in run.overview
        assert "sk-ant-api03" not in run.overview
        assert 'method="post"' not in run.overview.lower()
        assert "<script" not in run.overview.lower()

    def test_refreshes_itself(self, run: DashboardRun) -> None:
        assert 'http-equiv="refresh"' in run.overview

    def test_key_page_tells_what_show_tells(self, run: DashboardRun) -> None:
        dead = next(r for r in _dead_rows(run.ws) if r["error_type"] == "api_error")
        key = str(dead["key"])
        query = urllib.parse.urlencode({"pipeline": "tickets", "key": key})
        page = " ".join(parse(dump_dom(f"{run.base}/key?{query}")).text)
        story = _show(run.ws, key)
        assert story["outcome"] == "dead_letter"
        assert len(story["attempts"]) == 3  # max_attempts, each with its batch
        for attempt in story["attempts"]:
            assert attempt["batch_id"] in page
            assert attempt["error_type"] == "api_error"
        assert "api_error" in page and "dead_letter" in page
        assert [h["batch_id"] for h in dead["history"]] == \
            [a["batch_id"] for a in story["attempts"]]

    def test_screenshot_renders(self, run: DashboardRun, tmp_path: Path) -> None:
        png = tmp_path / "dashboard.png"
        chromium("--hide-scrollbars", "--window-size=1100,1200", f"--screenshot={png}",
                 f"{run.base}/")
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


class TestShow:
    """Read after the dashboard tests, while the daemon still runs: read-only beside it."""

    def test_plain_success(self, run: DashboardRun) -> None:
        rows = {r["key"]: r for r in run.ws.sink_rows()}
        key = next(k for k, r in rows.items() if r["attempt"] == 1)
        story = _show(run.ws, key)
        assert story["outcome"] == "succeeded"
        assert story["custom_id"] == f"t-{key}"
        assert story["read"]["position"]["row"] >= 0
        assert story["cost_usd"] == rows[key]["cost_usd"]
        (only,) = story["attempts"]
        assert only["batch_id"] == rows[key]["batch_id"]
        (landed,) = story["landed"]
        assert landed["row"]["output"] == rows[key]["output"]

    def test_retried_then_succeeded_lists_every_batch(self, run: DashboardRun) -> None:
        rows = {r["key"]: r for r in run.ws.sink_rows()}
        key, row = next((k, r) for k, r in rows.items() if r["attempt"] >= 2)
        story = _show(run.ws, key)
        assert [a["attempt"] for a in story["attempts"]] == list(range(1, row["attempt"] + 1))
        assert story["attempts"][-1]["batch_id"] == row["batch_id"]
        assert all(a["batch_id"] for a in story["attempts"])
        assert len({a["batch_id"] for a in story["attempts"]}) == row["attempt"]

    def test_malformed_row(self, run: DashboardRun) -> None:
        story = _show(run.ws, "T-broken")
        assert story["outcome"] == "dead_letter"
        assert story["reason"].startswith("bad_record: tickets.csv line")
        assert story["read"]["position"]["line"] > 1

    def test_unknown_key_exits_1(self, run: DashboardRun) -> None:
        proc = run.ws.run("show", "@config", "no-such-key")
        assert proc.returncode == 1 and "not read yet" in proc.stdout

    def test_after_the_daemon_stopped(self, run: DashboardRun) -> None:
        """The same story from a stopped daemon's state."""
        rows = {r["key"]: r for r in run.ws.sink_rows()}
        key = next(k for k, r in rows.items() if r["attempt"] >= 2)
        before = _show(run.ws, key)
        run.daemon.signal(signal.SIGTERM)
        assert run.daemon.wait(30) == 0
        assert _show(run.ws, key) == before
        text = run.ws.run("show", "@config", key)
        assert text.returncode == 0 and f"attempt {rows[key]['attempt']}:  succeeded" in text.stdout
