"""
When each request of a batch finishes: spread over the batch's latency, deterministically.

The API works through a batch's requests over time, not all at its end: a
cancel keeps what already finished and cancels the rest, and the 24 h expiry
expires only the unfinished (BATCH). Each request therefore gets a finish step
out of `FINISH_STEPS`, a pure function of (seed, custom_id); it finishes at
``created_at + (step + 1) / FINISH_STEPS * latency``. A batch keeps only a
tally of its requests by outcome and step (a few KB however large it is), from
which it answers how many finished before any moment.
"""

from __future__ import annotations

import zlib
from array import array

__all__ = ("FINISH_STEPS", "OUTCOMES", "FinishTally", "finish_step", "finish_time", "steps_done")

#: How finely a batch's latency is divided.
FINISH_STEPS = 256
#: The outcomes decided at create (cancel and expiry come from the end instead).
OUTCOMES = ("succeeded", "errored", "expired")


def finish_step(seed: int, custom_id: str) -> int:
    """The step (0 .. FINISH_STEPS-1) at whose end this request finishes (a CRC: cheap)."""
    return zlib.crc32(f"{custom_id}\0finish\0{seed}".encode()) % FINISH_STEPS


def finish_time(created_at: float, latency: float, step: int) -> float:
    """The virtual time a request of this step finishes."""
    return created_at + (step + 1) / FINISH_STEPS * latency


def steps_done(created_at: float, latency: float, at: float) -> int:
    """How many steps have completed by ``at`` (requests of lower steps have finished)."""
    if latency <= 0:
        return 0
    done = int((at - created_at) / latency * FINISH_STEPS)
    return max(0, min(FINISH_STEPS, done))


class FinishTally:
    """Requests by outcome and finish step, summed so lookups are O(1)."""

    def __init__(self) -> None:
        self._counts = {outcome: array("I", bytes(4 * FINISH_STEPS)) for outcome in OUTCOMES}
        self._below: dict[str, array[int]] | None = None

    def add(self, outcome: str, step: int) -> None:
        self._counts[outcome][step] += 1

    def _sums(self) -> dict[str, array[int]]:
        if self._below is None:
            below: dict[str, array[int]] = {}
            for outcome, counts in self._counts.items():
                running = array("I", [0])
                total = 0
                for count in counts:
                    total += count
                    running.append(total)
                below[outcome] = running
            self._below = below
        return self._below

    def finished(self, steps: int, outcome: str | None = None) -> int:
        """Requests (of ``outcome``, or all) whose step is below ``steps``."""
        sums = self._sums()
        if outcome is not None:
            return sums[outcome][steps]
        return sum(running[steps] for running in sums.values())
