"""
Error codes decide pause, retry or dead letter (§6 of the API facts): the errors batchd's
client raises for real HTTP answers classified (beside the SDK's view of the same answers);
a spend limit mid-run pauses the pipeline with nothing lost and nothing paid twice, and
``batchd resume`` lifts the pause.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anthropic
import anyio
import orjson
import pytest

from batchd.daemon.batches.api import BatchesApi
from batchd.daemon.batches.api_errors import ApiConnectionError, ApiStatusError, status_error
from batchd.daemon.batches.error_codes import Action, classify_error
from batchd.daemon.config import ApiConfig
from batchd.daemon.emulator import EmulatorThread
from batchd.daemon.intake.packer import request_line
from batchd.daemon.intake.spool import SpoolWriter
from tests.fixtures.emulator import message_requests, sdk_client
from tests.fixtures.engine import Workspace, describe, expected_labels

# fault -> (action, pause kind or retry kind, code named, text the advice must carry)
_EXPECTED: dict[str, tuple[Action, str, str, str]] = {
    "spend_limit": (Action.PAUSE, "spend_limit", "enforced_spend_limit_reached",
                    "1st of next month"),
    "contract_spend_limit": (Action.PAUSE, "spend_limit", "contract_spend_limit_reached",
                             "account team"),
    "org_on_hold": (Action.PAUSE, "organization_on_hold", "organization_on_hold",
                    "trust and safety"),
    "user_spend_limit": (Action.PAUSE, "spend_limit", "invalid_request_error",
                         "spend limit set in the Console"),
    "http401": (Action.PAUSE, "authentication", "authentication_error", "key"),
    "http402": (Action.PAUSE, "billing", "billing_error", "credit"),
    "http403": (Action.PAUSE, "permission", "permission_error", "permissions"),
    "ramp_limit": (Action.RETRY, "ramp_limit", "ramp_limit_exceeded", "retry-after"),
    "http429": (Action.RETRY, "rate_limited", "rate_limit_error", "queue"),
    "http529": (Action.AMBIGUOUS, "transient", "overloaded_error", ""),
    "http500": (Action.AMBIGUOUS, "transient", "api_error", ""),
}


@pytest.mark.parametrize("fault", sorted(_EXPECTED))
def test_each_api_error_is_classified(emulator: EmulatorThread, fault: str,
                                      tmp_path: Path) -> None:
    """The error batchd's client raises for a real 4xx/5xx create: the action, the pause
    kind and the advice (the SDK, asked the same, names the same code and status)."""
    emulator.set_faults(**{fault: 1.0})
    with pytest.raises(anthropic.APIStatusError) as sdk_caught:
        sdk_client(emulator.base_url).messages.batches.create(requests=message_requests(1))
    writer = SpoolWriter(tmp_path / "chunk.jsonl")
    for request in message_requests(1):
        writer.add_request(request_line(request["custom_id"], orjson.dumps(request["params"])),
                           {})
    writer.seal()
    api = BatchesApi(ApiConfig(base_url=emulator.base_url, max_retries=0), "test")

    async def create() -> None:
        try:
            await api.create(writer.final_path, writer.body_bytes)
        finally:
            await api.aclose()

    with pytest.raises(ApiStatusError) as caught:
        anyio.run(create)
    assert (caught.value.status_code, caught.value.error_code, caught.value.type) == (
        sdk_caught.value.status_code, sdk_caught.value.error_code, sdk_caught.value.type)
    decision = classify_error(caught.value)
    action, kind, code, words = _EXPECTED[fault]
    assert (decision.action, decision.kind, decision.code) == (action, kind, code)
    assert words in decision.advice
    if action is Action.PAUSE:
        assert "batchd resume" in decision.advice
        assert decision.retry_after is None
    if fault in ("http429", "ramp_limit"):
        assert decision.retry_after is not None  # honoured, not a fixed guess
        assert decision.shrink is (fault == "http429")


def test_unknown_code_falls_back_to_its_status() -> None:
    """A code the daemon has never heard of is judged by its status, as the SDK does."""
    body = {"type": "error", "error": {"type": "rate_limit_error", "message": "slow down",
                                       "details": {"error_code": "brand_new_limit"}}}
    error = status_error(429, orjson.dumps(body), {"retry-after": "3"})
    decision = classify_error(error)
    assert (decision.action, decision.code, decision.retry_after) == (
        Action.RETRY, "brand_new_limit", 3.0)


def test_no_answer_is_ambiguous() -> None:
    """No HTTP answer: the create may have been made, so the batch is looked for first."""
    decision = classify_error(ApiConnectionError("ConnectError: refused"))
    assert (decision.action, decision.kind) == (Action.AMBIGUOUS, "transient")


def _status(ws: Workspace) -> dict[str, Any]:
    return ws.status()["pipelines"][0]


def _wait(predicate: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


class TestSpendLimitMidRun:
    def test_paused_nothing_lost_nothing_paid_twice_resumed(
        self, emulator_factory: Callable[..., EmulatorThread],
        workspace: Callable[..., Workspace],
    ) -> None:
        """A 429 enforced_spend_limit_reached on create mid-run: the pipeline pauses with
        kind spend_limit (status shows it), no row is dead-lettered, no create is retried;
        `batchd resume` lifts it once the limit is gone and every row ends exactly once."""
        from tests.fixtures.engine import RULES_PATH

        emulator = emulator_factory(rules=RULES_PATH)
        ws = workspace(emulator.base_url)
        ws.write_tickets(200)
        ws.write_config(max_requests=20, max_in_flight=2)
        proc = subprocess.Popen(ws.command("run", str(ws.config_path)), cwd=ws.root,
                                env=ws.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        try:
            _wait(lambda: emulator.stats()["batches_created"] >= 2, "two batches")
            emulator.set_faults(spend_limit=1.0, http_fault_on="create")
            _wait(lambda: ws.state_dir.exists() and _status(ws)["paused"] is not None,
                  "the pause")
            status = _status(ws)
            assert status["pause_kind"] == "spend_limit"
            assert "enforced_spend_limit_reached" in status["paused"]
            assert "1st of next month" in status["paused"]
            created = emulator.stats()["batches_created"]
            time.sleep(2.0)  # paused: no create is tried again while the limit holds
            refused = emulator.stats()["http_errors"].get("429:enforced_spend_limit_reached", 0)
            time.sleep(2.0)
            assert emulator.stats()["http_errors"].get(
                "429:enforced_spend_limit_reached", 0) == refused == 1
            assert emulator.stats()["batches_created"] == created
            emulator.set_faults(spend_limit=0.0)
            resume = ws.run("resume", str(ws.config_path), "tickets")
            assert resume.returncode == 0, describe(resume)
            assert "spend_limit" in resume.stdout
            _wait(lambda: _status(ws)["rows_done"] == 200 and not _status(ws)["batches"],
                  "the drain after resume")
            assert _status(ws)["paused"] is None
        finally:
            proc.send_signal(signal.SIGTERM)
            _out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err[-3000:]
        outputs = ws.outputs()
        expected = expected_labels(ws.root / "tickets.csv")
        assert outputs.results == expected
        assert not outputs.dead
        assert max(outputs.jsonl_keys.values()) == 1
        received = emulator.stats()["received"]
        assert set(received) == {f"t-{k}" for k in expected}
        assert set(received.values()) == {1}, "a request was sent (and paid) twice"
        assert json.loads(json.dumps(_status(ws)))["dead_lettered"] == 0
