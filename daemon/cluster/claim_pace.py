"""
How often a cluster worker that is not reading the source asks the store for work.

Every poll of every worker is a claim query and an event-log read, on the worker and on
its PostgreSQL backend. A worker that finds nothing to claim (the reader drives what it
seals while it has room; nobody died) asks again after twice as long, up to ``cap``; it
asks at once again when room frees up here (one of its chunks retired) and keeps the
poll interval while claims find chunks. The reader never slows down: its source commits
and retirements follow the other workers' progress, read at each poll.

A longer wait only delays a claim: a dead worker's chunks wait out its lease TTL and the
takeover grace anyway, and a chunk released by a full reader is claimed within ``cap``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ("ClaimPace",)


class ClaimPace:
    """When the next claim poll is due, for a worker that is not reading the source."""

    def __init__(self, interval: float, cap: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.cap = max(cap, interval)
        self.wait = interval  # the wait after the last poll
        self._clock = clock
        self._next = float("-inf")
        self._room: int | None = None

    def due(self, room: int, *, reading: bool) -> bool:
        """Whether to poll now, given this worker's room for chunks and whether it reads."""
        now = self._clock()
        if reading or (self._room is not None and room > self._room):
            self.wait, self._next = self.interval, now
        self._room = room
        return now >= self._next

    def polled(self, *, found: bool) -> None:
        """After a poll: found chunks keep the interval, none doubles the wait (to the cap)."""
        self.wait = self.interval if found else min(self.cap, self.wait * 2)
        # A tenth of the interval early: the loop sleeps in steps of the interval.
        self._next = self._clock() + self.wait - self.interval / 10
