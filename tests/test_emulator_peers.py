"""
Request shapes other batch tools send today still work (tests/data/peers/*.jsonl).

batchwizard submits provider-native JSONL as written; Curator sends the model's
full output ceiling as ``max_tokens`` with an instructor JSON-mode system prompt;
steadybatch sends ``output_config.format`` and chooses ``thinking``. Each file is
submitted the way its tool submits it, through SDK 2.x.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anthropic
import jsonschema
import pytest

from batchd.daemon.emulator import EmulatorThread
from tests.fixtures.emulator import ended_results, sdk_client

_PEERS = Path(__file__).parent / "data" / "peers"


def _load(name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (_PEERS / f"{name}.jsonl").read_text().splitlines()]


def _text(message: dict[str, Any]) -> str:
    return "".join(block["text"] for block in message["content"] if block["type"] == "text")


@pytest.mark.anyio
async def test_batchwizard_lines_through_the_async_client(emulator: EmulatorThread) -> None:
    """batchwizard: AsyncAnthropic, max_retries=0, the JSONL lines as the requests."""
    requests = _load("batchwizard")
    client = anthropic.AsyncAnthropic(
        base_url=emulator.base_url, api_key="test", max_retries=0,
        _strict_response_validation=True,
    )  # fmt: skip
    async with client:
        batch = await client.messages.batches.create(requests=requests)  # type: ignore[arg-type]
        ended = await client.messages.batches.retrieve(batch.id)
        assert ended.request_counts.succeeded == len(requests)
        decoder = await client.messages.batches.results(batch.id)
        results = {item.custom_id: item async for item in decoder}
    assert set(results) == {r["custom_id"] for r in requests}
    stops = {}
    for custom_id, item in results.items():
        assert item.result.type == "succeeded"
        stops[custom_id] = (
            item.result.message.stop_reason,
            [block.type for block in item.result.message.content],
        )
    # Sonnet 5 thinks by default (effort high: 512 tokens) and max_tokens is 256: no text.
    assert stops == {
        "ticket-42": ("end_turn", ["text"]),
        "ticket-43": ("end_turn", ["text"]),
        "ticket-44": ("max_tokens", ["thinking"]),
    }


def test_curator_requests(emulator: EmulatorThread) -> None:
    """Curator: max_tokens at each model's ceiling; Haiku 5.5 thinks first, then answers."""
    requests = _load("curator")
    results = ended_results(sdk_client(emulator.base_url), requests)
    assert {r["type"] for r in results.values()} == {"succeeded"}
    haiku_5_5 = results["1"]["message"]
    assert [b["type"] for b in haiku_5_5["content"]] == ["thinking", "text"]
    assert all(_text(r["message"]) for r in results.values())


def test_steadybatch_structured_output(emulator: EmulatorThread) -> None:
    """steadybatch: every reply is a JSON object valid against the schema it sent."""
    requests = _load("steadybatch")
    results = ended_results(sdk_client(emulator.base_url), requests)
    for request in requests:
        result = results[request["custom_id"]]
        assert result["type"] == "succeeded", result
        message = result["message"]
        assert message["stop_reason"] == "end_turn"
        schema = request["params"]["output_config"]["format"]["schema"]
        jsonschema.validate(json.loads(_text(message)), schema)
    thinking = {r["custom_id"]: r["params"].get("thinking") for r in requests}
    for custom_id, asked in thinking.items():
        first = results[custom_id]["message"]["content"][0]["type"]
        assert first == ("text" if asked == {"type": "disabled"} else "thinking")
