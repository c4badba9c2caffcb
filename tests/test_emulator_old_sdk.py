"""
An old SDK (0.x, 2023-06-01, X-Api-Key) and SDK 2.x (2026-10-21, Bearer) against one emulator.

Both clients submit the same rows while both batches are in flight; each batch
is judged by its own create version, and each client reads both batches.
One subprocess run holds all of the old client's checks, to keep the suite fast.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from batchd.daemon.emulator import EmulatorThread
from tests.fixtures.emulator import sdk_client
from tests.fixtures.old_sdk import OLD_SDK_VERSION

_SCHEMA = {"type": "object", "properties": {"label": {"type": "string"}},
           "required": ["label"], "additionalProperties": False}  # fmt: skip
_ASK = [{"role": "user", "content": "my printer is on fire"}]
ROWS: list[dict[str, Any]] = [
    {"custom_id": "temp", "params": {"model": "claude-haiku-4-5", "max_tokens": 64,
                                     "temperature": 0.5, "messages": _ASK}},
    {"custom_id": "temp_new_model", "params": {"model": "claude-opus-5-5", "max_tokens": 4096,
                                               "temperature": 0.5, "messages": _ASK}},
    {"custom_id": "format", "params": {"model": "claude-haiku-4-5", "max_tokens": 64,
                                       "messages": _ASK, "output_format": {
                                           "type": "json_schema", "schema": _SCHEMA}}},
    {"custom_id": "tight", "params": {"model": "claude-haiku-5-5", "max_tokens": 16,
                                      "messages": _ASK}},
    {"custom_id": "retired", "params": {"model": "claude-sonnet-4-5", "max_tokens": 16,
                                        "messages": _ASK}},
]  # fmt: skip

_SCRIPT = """
import json, os
import anthropic, httpx

base = os.environ["EMULATOR_URL"]
rows = json.loads(os.environ["ROWS"])
client = anthropic.Anthropic(base_url=base, api_key="old-key", max_retries=0)
out = {"sdk": anthropic.__version__}
batch = client.messages.batches.create(requests=rows)
out["old_created"] = batch.processing_status
httpx.post(base + "/_emulator/clock", json={"advance_seconds": 60})

def read(batch_id):
    got = client.messages.batches.retrieve(batch_id)
    lines = {}
    for item in client.messages.batches.results(batch_id):
        result = item.result
        entry = {"type": result.type}
        if result.type == "errored":
            entry["error"] = [result.error.error.type, result.error.error.message]
        if result.type == "succeeded":
            message = result.message
            entry["stop_reason"] = message.stop_reason
            entry["blocks"] = [block.type for block in message.content]
            entry["text"] = "".join(b.text for b in message.content if b.type == "text")
        lines[item.custom_id] = entry
    return {"status": got.processing_status, "results": lines}

out["old"] = read(batch.id)
out["old_id"] = batch.id
out["new"] = read(os.environ["NEW_BATCH_ID"])

httpx.post(base + "/_emulator/faults", json={"spend_limit": 1.0, "http_fault_on": "create"})
try:
    client.messages.batches.create(requests=rows[:1])
except anthropic.APIStatusError as error:
    out["spend_limit"] = [type(error).__name__, error.status_code,
                          error.body["error"]["details"]["error_code"]]
httpx.post(base + "/_emulator/faults", json={"spend_limit": 0})
print(json.dumps(out))
"""


@pytest.mark.timeout(900)
def test_old_and_new_sdk_against_one_emulator(
    emulator_factory: Callable[..., EmulatorThread], old_sdk: Callable[..., dict[str, Any]]
) -> None:
    emulator = emulator_factory(latency=60.0)
    new = sdk_client(emulator.base_url)
    new_batch = new.messages.batches.create(requests=ROWS)  # type: ignore[arg-type]
    out = old_sdk(
        _SCRIPT, EMULATOR_URL=emulator.base_url, ROWS=json.dumps(ROWS), NEW_BATCH_ID=new_batch.id
    )
    assert out["sdk"] == OLD_SDK_VERSION and out["old_created"] == "in_progress"
    old, fresh = out["old"]["results"], out["new"]["results"]
    assert out["old"]["status"] == out["new"]["status"] == "ended"

    # 2023-06-01: temperature is judged per model; output_format still accepted (a choice).
    assert old["temp"]["type"] == "succeeded"
    assert old["temp_new_model"]["error"][0] == "invalid_request_error"
    assert "temperature" in old["temp_new_model"]["error"][1]
    assert json.loads(old["format"]["text"]).keys() == {"label"}
    # 2026-10-21: sampling params and output_format are refused whatever the model.
    assert "2026-10-21" in fresh["temp"]["error"][1]
    assert fresh["format"]["error"] == [
        "invalid_request_error", "output_format: Extra inputs are not permitted"
    ]
    # What does not depend on the version is the same for both.
    for results in (old, fresh):
        assert results["tight"] == {
            "type": "succeeded", "stop_reason": "max_tokens", "blocks": ["thinking"], "text": ""
        }
        assert results["retired"]["error"][0] == "not_found_error"

    # The old SDK maps the spend cap by status only; the code is in the body.
    assert out["spend_limit"] == ["RateLimitError", 429, "enforced_spend_limit_reached"]

    # SDK 2.x reads the old client's batch with strict validation.
    assert new.messages.batches.retrieve(out["old_id"]).request_counts.succeeded == 3
    stats = emulator.stats()
    assert stats["api_versions"]["2023-06-01"] > 0 and stats["api_versions"]["2026-10-21"] > 0
    assert set(stats["auth_schemes"]) == {"x-api-key", "bearer"}
