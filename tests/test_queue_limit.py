"""
The processing queue the API grants, kept full and never passed: ``[api] queue_limit``
(or the tier's) holds a chunk back while the requests in flight plus its own would pass
it, across pipelines, so the emulator's queue never refuses a create.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from batchd.daemon.batches.queue_limit import queue_limit_of
from batchd.daemon.config import TIER_QUEUE_LIMITS, ApiConfig
from batchd.daemon.emulator import EmulatorThread
from tests.fixtures.engine import RULES_PATH, Workspace, describe, dump_toml, expected_labels


def test_limit_in_force() -> None:
    """An explicit queue_limit wins; else the tier's; else Start's 200,000."""
    assert queue_limit_of(ApiConfig(queue_limit=5)) == (5, "[api] queue_limit")
    assert queue_limit_of(ApiConfig(tier="scale"))[0] == 500_000
    limit, origin = queue_limit_of(ApiConfig())
    assert limit == TIER_QUEUE_LIMITS["start"] == 200_000 and "default" in origin


def _peak_in_flight(ws: Workspace) -> int:
    import json

    sizes: dict[str, int] = {}
    open_: set[str] = set()
    peak = 0
    for line in (ws.state_dir / "manifest.jsonl").read_text().splitlines():
        record = json.loads(line.split(" ", 1)[1])
        kind, chunk = record["kind"], record.get("chunk")
        if kind == "chunk_sealed":
            sizes[chunk] = record["requests"]
        elif kind == "results_committed" and record.get("retry_chunk"):
            sizes[record["retry_chunk"]["chunk"]] = record["retry_chunk"]["requests"]
        elif kind == "submit_intent":
            open_.add(chunk)
        elif kind == "ended":
            open_.discard(chunk)
        peak = max(peak, sum(sizes[c] for c in open_))
    return peak


def _two_pipelines(ws: Workspace, limit: int | None) -> None:
    pipelines: list[dict[str, Any]] = []
    for name in ("a", "b"):
        table = ws.pipeline(name=name, max_requests=40, max_in_flight=6,
                            custom_id=f"{name}-{{ticket_id}}")
        table["sink"] = [{"type": "jsonl", "path": f"out/{name}"}]
        table["dead_letter"] = {"type": "jsonl", "path": f"out/dead-{name}"}
        pipelines.append(table)
    api: dict[str, Any] = {"poll_interval": "0.1s", "poll_jitter": 0.1}
    if limit is not None:
        api["queue_limit"] = limit
    ws.write_raw(dump_toml({"state_dir": "state", "api": api, "pipeline": pipelines}))


def test_queue_never_passed_across_pipelines(
    emulator_factory: Callable[..., EmulatorThread], workspace: Callable[..., Workspace]
) -> None:
    """Two pipelines of 6 x 40-request chunks against a 100-request queue: no create is
    refused, the queue peaks at or under 100, and every row of both is answered once."""
    emulator = emulator_factory(rules=RULES_PATH, latency=0.6, queue_limit=100)
    ws = workspace(emulator.base_url)
    ws.write_tickets(240)
    _two_pipelines(ws, limit=100)
    proc = ws.run()
    assert proc.returncode == 0, describe(proc)
    stats = emulator.stats()
    assert stats["peak_in_progress_requests"] <= 100, stats
    # Kept full on our side: the requests of batches submitted and not yet seen ended, at
    # their peak, as the manifest recorded them (the emulator finishes requests over the
    # latency, so its own occupancy peaks lower).
    assert 80 <= _peak_in_flight(ws) <= 100
    assert not any(key.startswith("429") for key in stats["http_errors"]), stats["http_errors"]
    assert set(stats["received"].values()) == {1}
    labels = expected_labels(ws.root / "tickets.csv")
    for name in ("a", "b"):
        import json

        seen = [json.loads(line)["key"] for part in sorted((ws.out_dir / name).glob("*.jsonl"))
                for line in part.read_text().splitlines()]
        assert sorted(seen) == sorted(labels)


def test_without_the_limit_the_queue_refuses(
    emulator_factory: Callable[..., EmulatorThread], workspace: Callable[..., Workspace]
) -> None:
    """The control: the same work with the engine assuming a 200,000 queue meets 429s
    (and still finishes, by shrinking chunks): the limit above is what avoids them."""
    emulator = emulator_factory(rules=RULES_PATH, latency=0.6, queue_limit=100)
    ws = workspace(emulator.base_url)
    ws.write_tickets(240)
    _two_pipelines(ws, limit=None)
    proc = ws.run()
    assert proc.returncode == 0, describe(proc)
    assert emulator.stats()["http_errors"].get("429:rate_limit_error", 0) >= 1
