"""
The cluster's timing defaults and the bounds a ``[cluster]`` table may move them in.

One place for the numbers, so the config, the docs and (once wired) the store
agree. The reasoning (CLUSTER.md §3, ``daemon/cluster/deadline.py``):

* a worker heartbeats every ``lease_ttl / 3``, so a TTL of 30 s survives two
  lost heartbeats before its leases lapse;
* a dead worker's work is taken after ``lease_ttl + takeover_grace`` on the DB
  clock; the grace (30 s) is what a survivor waits beyond the owner's own TTL;
* the local deadline is ``sent + lease_ttl - lease_margin``, so ``margin + grace``
  seconds separate the last moment an old owner may act from the first moment
  another may take over. The margin must stay under half the TTL: heartbeats go
  out every TTL/3, and the deadline must not lapse between two of them.

Takeover latency is at most ``lease_ttl + takeover_grace`` plus one claim poll,
so the upper bounds keep a dead machine's batches from waiting for an hour.
"""

from __future__ import annotations

import os

__all__ = (
    "DEFAULT_LEASE_MARGIN",
    "DEFAULT_LEASE_TTL",
    "DEFAULT_TAKEOVER_GRACE",
    "DEFAULT_WORKSPACE",
    "LEASE_TTL_BOUNDS",
    "MARGIN_SHARE_OF_TTL",
    "TAKEOVER_GRACE_BOUNDS",
    "default_margin",
    "interval_from_env",
)

DEFAULT_LEASE_TTL = 30.0
DEFAULT_TAKEOVER_GRACE = 30.0
DEFAULT_LEASE_MARGIN = 5.0
# The create slot's name when the config names no API workspace: one slot per key's workspace.
DEFAULT_WORKSPACE = "default"

# (low, high) in seconds. Below 3 s a heartbeat would be due every second; above 10 min
# a dead machine's batches wait too long for a survivor.
LEASE_TTL_BOUNDS = (3.0, 600.0)
TAKEOVER_GRACE_BOUNDS = (1.0, 600.0)
# The margin is below this share of the TTL (heartbeats every TTL/3 must renew in time).
MARGIN_SHARE_OF_TTL = 0.5


def default_margin(ttl: float) -> float:
    """The margin when none is configured: 5 s, or a sixth of a shorter TTL."""
    return min(DEFAULT_LEASE_MARGIN, ttl / 6)


def interval_from_env(variable: str, default: float, what: str) -> float:
    """
    Seconds between a worker's periodic passes: *default*, or what *variable* says
    (tests shorten the 5-minute passes); anything but a positive number is ignored
    with a warning naming the variable.
    """
    raw = os.environ.get(variable)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not value > 0:
        import structlog  # only here: the config reads this module, and status stays light

        structlog.get_logger("batchd.cluster").warning(
            f"ignoring a {what} interval that is not a positive number",
            variable=variable, value=raw)
        return default
    return value
