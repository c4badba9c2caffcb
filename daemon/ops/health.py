"""
``/healthz`` and ``/readyz``: liveness and readiness on the metrics port.

Liveness is the event loop turning: a task on the loop stamps a heartbeat
every second and the HTTP thread (which keeps answering when the loop is
wedged) fails the check once the stamp is older than ``stall_after``. That is
the condition a restart fixes, which is what a liveness probe triggers.

Readiness is "recovery is finished and no pipeline is paused for a reason an
operator must fix" (billing, a refused create, the budget, a wall of dead
letters); the body names the pipeline and the reason. A paused daemon is
alive: restarting it would not help, so only readiness fails.

The HTTP thread never touches the loop's objects: the heartbeat is a float the
loop writes, and the pause reasons are read on the loop (batchd.daemon.ops.web.LoopBridge).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import anyio
import orjson

__all__ = ("Health",)

# The heartbeat is stamped every second; a loop that misses this many is wedged.
STALL_AFTER = 10.0


class Health:
    """What the probes answer; written from the event loop, read from the HTTP thread."""

    def __init__(self, stall_after: float = STALL_AFTER) -> None:
        self.stall_after = stall_after
        self.started = time.monotonic()
        self.beat = time.monotonic()
        self.recovered = False

    async def heartbeat(self) -> None:
        """Runs on the event loop for the daemon's lifetime."""
        while True:
            self.beat = time.monotonic()
            await anyio.sleep(1.0)

    def liveness(self) -> tuple[int, dict[str, Any]]:
        stalled = time.monotonic() - self.beat
        if stalled > self.stall_after:
            return 503, {"status": "stalled", "service": "batchd",
                         "detail": f"the event loop has not turned for {stalled:.0f}s"}
        return 200, {"status": "ok", "service": "batchd",
                     "uptime_seconds": round(time.monotonic() - self.started)}

    def readiness(self, paused: Mapping[str, str | None] | None) -> tuple[int, dict[str, Any]]:
        """``paused``: each pipeline's pause reason, read on the loop; None if it did not answer."""
        reasons = []
        if not self.recovered:
            reasons.append("recovery in progress: reattaching in-flight batches")
        if paused is None:
            reasons.append("the event loop did not answer")
        held = {name: reason for name, reason in (paused or {}).items() if reason}
        reasons += [f"pipeline {name!r} is paused: {reason}" for name, reason in held.items()]
        code = 503 if reasons else 200
        return code, {"status": "not ready" if reasons else "ready", "service": "batchd",
                      "reasons": reasons, "paused": held}

    @staticmethod
    def body(payload: dict[str, Any]) -> bytes:
        return orjson.dumps(payload) + b"\n"
