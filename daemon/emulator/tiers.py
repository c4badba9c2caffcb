"""
Usage tiers: the processing-queue size and the RPM limit of the batch endpoints.

The API limits batches per organisation tier (shared/BATCHES_API.md §5): how
many batch requests may wait unprocessed across all batches, and how many
calls per minute all batch endpoints together take. A daemon that never meets
either limit in its tests meets it first in production, so the emulator can
play any tier.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

__all__ = ("TIERS", "RpmWindow", "Tier", "parse_tier")


@dataclass(frozen=True)
class Tier:
    """One tier's limits; ``rpm`` None means no RPM limit (a custom contract)."""

    name: str
    queue: int
    rpm: int | None


#: The documented tiers (RL, August 2026).
TIERS: dict[str, Tier] = {
    "start": Tier("start", 200_000, 1_000),
    "build": Tier("build", 300_000, 2_000),
    "scale": Tier("scale", 500_000, 4_000),
}


def parse_tier(text: str) -> Tier:
    """
    ``start``, ``build``, ``scale`` or ``custom:N`` (a queue of N requests, no RPM limit).

    Raises:
        ValueError: naming the text when it is none of these.
    """
    name = text.strip().lower()
    if name in TIERS:
        return TIERS[name]
    kind, sep, size = name.partition(":")
    if kind == "custom" and sep:
        try:
            queue = int(size)
        except ValueError:
            queue = 0
        if queue >= 1:
            return Tier(f"custom:{queue}", queue, None)
    raise ValueError(
        f"unknown tier {text!r} (use start, build, scale or custom:N with N >= 1 requests)"
    )


class RpmWindow:
    """
    Calls admitted in the last 60 s of the virtual clock.

    Kept as a sliding window of admission times (at most ``limit`` of them), so
    a test that advances the clock by a minute opens the window at once.
    """

    WINDOW = 60.0

    def __init__(self) -> None:
        self._times: deque[float] = deque()

    def admit(self, now: float, limit: int | None) -> float | None:
        """Record a call and return None, or return the seconds until one would be admitted."""
        if limit is None:
            return None
        times = self._times
        while times and times[0] <= now - self.WINDOW:
            times.popleft()
        if len(times) >= limit:
            if limit == 0:
                return self.WINDOW
            return max(1.0, math.ceil(times[len(times) - limit] + self.WINDOW - now))
        times.append(now)
        return None

    def clear(self) -> None:
        self._times.clear()
