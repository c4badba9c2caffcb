"""
The local lease deadline: until when this worker may act on what it owns.

Only the database clock decides who owns what; this clock only decides when to
stop. After a heartbeat commits, nobody can take this worker's leases before
``heartbeat_at + TTL + grace`` (DB clock). The deadline is ``sent + TTL − margin``
on this machine's ``CLOCK_BOOTTIME``, where *sent* is read before the heartbeat
is even sent: it is never later than the store's expiry, whatever the network
did, and a suspend (laptop lid, VM pause) counts as time passing, unlike
``CLOCK_MONOTONIC``. A SIGSTOPped process wakes up past its deadline and stops.

Every external action checks :meth:`LeaseDeadline.check` first; a create body's
last bytes go out only through :func:`gated`, so a create that started in time
but would finish late is cut off before the API can accept it.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable

from batchd.daemon.cluster.errors import LeaseExpired

__all__ = ("LeaseDeadline", "boottime", "gated")


def boottime() -> float:
    """Seconds on a clock that never jumps and keeps counting through a suspend."""
    try:
        return time.clock_gettime(time.CLOCK_BOOTTIME)
    except (AttributeError, OSError):  # not Linux
        return time.monotonic()


class LeaseDeadline:
    """
    ``sent + ttl − margin`` of the latest successful heartbeat.

    Lifecycle:
        1. ``sent = deadline.now()`` just before sending a heartbeat;
        2. ``deadline.renew(sent)`` once the heartbeat committed;
        3. ``deadline.check("create")`` before each external action.

    Args:
        ttl: the lease TTL in seconds (as registered on the worker row).
        margin: seconds kept in hand for clock-rate differences and the action's
            own duration; 0 <= margin < ttl.
        clock: injectable for tests; ``boottime`` by default.
    """

    __slots__ = ("_clock", "_deadline", "margin", "ttl")

    def __init__(self, ttl: float, margin: float, *, clock: Callable[[], float] = boottime) -> None:
        if not ttl > 0 or not 0 <= margin < ttl:
            raise ValueError(f"lease ttl {ttl} and margin {margin}: need 0 <= margin < ttl")
        self.ttl = ttl
        self.margin = margin
        self._clock = clock
        self._deadline = float("-inf")

    def now(self) -> float:
        return self._clock()

    def renew(self, sent: float) -> None:
        """A heartbeat sent at *sent* committed: the deadline moves (never backwards)."""
        self._deadline = max(self._deadline, sent + self.ttl - self.margin)

    def expire(self) -> None:
        """Forget the lease (the worker learnt it lost it, or deregistered)."""
        self._deadline = float("-inf")

    def remaining(self) -> float:
        """Seconds left; negative once past."""
        return self._deadline - self._clock()

    def valid(self) -> bool:
        return self.remaining() > 0

    def check(self, action: str) -> None:
        """
        Raise unless the lease still holds.

        Raises:
            LeaseExpired: naming the action refused and how late it is.
        """
        left = self.remaining()
        if left <= 0:
            late = "never renewed" if left == float("-inf") else f"passed {abs(left):.3f}s ago"
            raise LeaseExpired(f"lease deadline {late}; not starting or finishing {action}")


async def gated(body: AsyncIterator[bytes], deadline: LeaseDeadline) -> AsyncIterator[bytes]:
    """
    Pass *body* through, holding back its last piece until the deadline is checked.

    A create body whose closing bytes are never sent is an incomplete request, and
    an incomplete request creates no batch: past the deadline this raises
    :class:`LeaseExpired` instead of yielding them, and the HTTP client drops the
    connection.
    """
    previous: bytes | None = None
    async for piece in body:
        if previous is not None:
            yield previous
        previous = piece
    if previous is not None:
        deadline.check("a create (the body's last bytes)")
        yield previous
