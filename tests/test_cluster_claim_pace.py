"""
ClaimPace: a cluster worker that finds nothing to claim asks less often, up to a cap;
room freed here, a claim that finds chunks, or reading the source bring it back to the
poll interval. Driven with a clock the test moves, as the claim loop calls it.
"""

from __future__ import annotations

from batchd.daemon.cluster.claim_pace import ClaimPace


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def polls(pace: ClaimPace, clock: Clock, seconds: float, *, room: int = 2,
          reading: bool = False, found: bool = False) -> list[float]:
    """The times the loop (sleeping one interval per turn) would poll within *seconds*."""
    at = []
    end = clock.now + seconds
    while clock.now < end - 1e-9:
        if pace.due(room, reading=reading):
            at.append(round(clock.now - 100.0, 3))
            pace.polled(found=found)
        clock.now += pace.interval
    return at


def test_an_idle_worker_doubles_its_wait_up_to_the_cap() -> None:
    clock = Clock()
    pace = ClaimPace(0.2, 1.0, clock)
    assert polls(pace, clock, 4.0) == [0.0, 0.4, 1.2, 2.2, 3.2]
    assert pace.wait == 1.0


def test_a_claim_that_finds_chunks_keeps_the_poll_interval() -> None:
    clock = Clock()
    pace = ClaimPace(0.2, 1.0, clock)
    assert len(polls(pace, clock, 1.0, found=True)) == 5


def test_room_freed_here_polls_at_once_and_resets_the_wait() -> None:
    clock = Clock()
    pace = ClaimPace(0.2, 1.0, clock)
    polls(pace, clock, 4.0, room=0)  # full, idle: waiting a second between polls
    assert pace.wait == 1.0
    clock.now += 0.2
    assert pace.due(1, reading=False)  # one of its chunks retired: look now
    pace.polled(found=False)
    assert pace.wait == 0.4


def test_the_reader_polls_every_interval() -> None:
    clock = Clock()
    pace = ClaimPace(0.2, 1.0, clock)
    polls(pace, clock, 4.0)
    assert len(polls(pace, clock, 1.0, reading=True)) == 5


def test_a_cap_below_the_interval_is_the_interval() -> None:
    clock = Clock()
    pace = ClaimPace(1.0, 0.5, clock)
    assert polls(pace, clock, 5.0) == [0.0, 1.0, 2.0, 3.0, 4.0]
