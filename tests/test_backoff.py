"""The one backoff helper: delays grow, stop at the cap, are jittered, and start over on reset."""

from __future__ import annotations

import pytest

from batchd.plugins.backoff import Backoff


def _take(backoff: Backoff, n: int) -> list[float]:
    return [backoff.next_delay() for _ in range(n)]


def test_delays_grow_until_the_cap() -> None:
    """Below the cap each delay is at least the one before; late ones are near the cap."""
    delays = _take(Backoff(0.5, 30.0), 12)
    assert delays[:7] == sorted(delays[:7])  # ceilings 0.5, 1, 2, 4, 8, 16, 30
    assert 0.25 <= delays[0] <= 0.5
    assert min(delays[6:]) >= 15.0


def test_delays_never_exceed_the_cap() -> None:
    """However many tries, no delay passes ``cap`` and late ones stay near it."""
    delays = _take(Backoff(1.0, 5.0), 50)
    assert max(delays) <= 5.0
    assert min(delays[10:]) >= 2.5


def test_two_instances_draw_different_sequences() -> None:
    """Two loops started together do not wait in lockstep."""
    first, second = _take(Backoff(0.5, 30.0), 8), _take(Backoff(0.5, 30.0), 8)
    assert first != second


def test_delays_are_jittered_within_one_instance() -> None:
    """At the cap the delays still vary, so retries of many processes spread out."""
    capped = _take(Backoff(1.0, 2.0), 40)[5:]
    assert len(set(capped)) > 1


def test_reset_starts_over_from_base() -> None:
    """After a success the next failure waits about ``base`` again."""
    backoff = Backoff(0.5, 30.0)
    _take(backoff, 10)
    assert backoff.attempts == 10
    backoff.reset()
    assert backoff.attempts == 0
    assert 0.25 <= backoff.next_delay() <= 0.5


@pytest.mark.parametrize(("base", "cap", "factor"), [(0, 1, 2), (2, 1, 2), (1, 2, 0.5)])
def test_nonsense_settings_are_refused(base: float, cap: float, factor: float) -> None:
    """A zero base, a cap below base or a shrinking factor is a programming error."""
    with pytest.raises(ValueError, match="backoff needs"):
        Backoff(base, cap, factor)
