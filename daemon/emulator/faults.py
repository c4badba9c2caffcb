"""
Seeded, reproducible fault decisions.

A per-request fault is a pure function of (seed, custom_id, attempt) so that a
client that resends a failed request can see it succeed on a later attempt,
and two runs with the same seed fail the same requests. HTTP faults draw from
one seeded random stream, one draw per /v1 request.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter

from batchd.daemon.emulator.config import (
    HTTP_FAULTS,
    PER_REQUEST_FAULTS,
    SUCCEEDED_TWISTS,
    FaultSettings,
)
from batchd.daemon.emulator.error_codes import HTTP_FAULT_ERRORS, HttpFault

__all__ = ("REQUEST_FAULT_ERRORS", "FaultInjector", "draw")

#: The result a per-request fault gives: (result type, inner error type or None).
REQUEST_FAULT_ERRORS: dict[str, tuple[str, str | None]] = {
    "api_error": ("errored", "api_error"),
    "overloaded_error": ("errored", "overloaded_error"),
    "invalid_request": ("errored", "invalid_request_error"),
    "expired": ("expired", None),
}



def draw(seed: int, custom_id: str, attempt: int, salt: str = "") -> float:
    """A uniform number in [0, 1) that depends only on its arguments."""
    key = f"{seed}\0{custom_id}\0{attempt}{salt}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") / 2**64


class FaultInjector:
    """The current fault settings plus the counters and random stream they drive."""

    def __init__(self, settings: FaultSettings, seed: int) -> None:
        self.seed = seed
        self.injected: Counter[str] = Counter()
        self._rng = random.Random(seed)
        self._drops_left = 0
        self.settings = settings
        self.replace(settings)

    def replace(self, settings: FaultSettings) -> None:
        """Install new settings; a drop count starts counting again."""
        self.settings = settings
        drop = settings.drop_after_create
        self._drops_left = int(drop) if drop >= 1 else 0

    def request_fault(self, custom_id: str, attempt: int) -> str | None:
        """
        The per-request fault kind for this receipt of ``custom_id``, or None.

        Not counted here: the store counts a batch's faults only once the
        create succeeds, so a rejected body does not inflate the stats.
        """
        settings = self.settings
        total = sum(getattr(settings, kind) for kind in PER_REQUEST_FAULTS)
        if total <= 0:
            return None
        value = draw(self.seed, custom_id, attempt)
        edge = 0.0
        for kind in PER_REQUEST_FAULTS:
            edge += getattr(settings, kind)
            if value < edge:
                return kind
        return None

    def succeeded_twist(self, custom_id: str, attempt: int) -> str | None:
        """
        ``refusal`` or ``context_exceeded`` for a request that succeeds but ends that way.

        Drawn apart from `request_fault`, so turning these on changes no
        request's errored/expired fate (tests predict those from the seed).
        """
        settings = self.settings
        if settings.refusal <= 0 and settings.context_exceeded <= 0:
            return None
        value = draw(self.seed, custom_id, attempt, "\0twist")
        edge = 0.0
        for kind in SUCCEEDED_TWISTS:
            edge += getattr(settings, kind)
            if value < edge:
                return kind
        return None

    def cache_read_misses(self, custom_id: str, attempt: int) -> bool:
        """Whether this request's would-be cache read misses (best effort in batches)."""
        fraction = self.settings.cache_miss
        return fraction > 0 and draw(self.seed, custom_id, attempt, "\0cache") < fraction

    def http_fault(self, *, is_create: bool) -> HttpFault | None:
        """The HTTP error this /v1 call gets, or None (one draw per call it may hit)."""
        if self.settings.http_fault_on == "create" and not is_create:
            return None
        value = self._rng.random()
        edge = 0.0
        for kind in HTTP_FAULTS:
            edge += getattr(self.settings, kind)
            if value < edge:
                self.injected[kind] += 1
                return HTTP_FAULT_ERRORS[kind]
        return None

    def drop_this_create(self) -> bool:
        """Whether to close the connection instead of answering a successful create."""
        drop = self.settings.drop_after_create
        if drop >= 1:
            if self._drops_left <= 0:
                return False
            self._drops_left -= 1
        elif drop <= 0 or self._rng.random() >= drop:
            return False
        self.injected["drop_after_create"] += 1
        return True

    def count(self, kind: str) -> None:
        """Record a fault decided elsewhere (cut streams, transient 404s, queue limit)."""
        self.injected[kind] += 1
