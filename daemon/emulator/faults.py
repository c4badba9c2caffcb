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

from daemon.emulator.config import HTTP_FAULTS, PER_REQUEST_FAULTS, FaultSettings

__all__ = ("REQUEST_FAULT_ERRORS", "FaultInjector")

#: The result a per-request fault gives: (result type, inner error type or None).
REQUEST_FAULT_ERRORS: dict[str, tuple[str, str | None]] = {
    "api_error": ("errored", "api_error"),
    "overloaded_error": ("errored", "overloaded_error"),
    "invalid_request": ("errored", "invalid_request_error"),
    "expired": ("expired", None),
}

_HTTP_ERRORS = {
    "http429": ("rate_limit_error", "Number of request tokens has exceeded your rate limit"),
    "http500": ("api_error", "Internal server error"),
    "http529": ("overloaded_error", "Overloaded"),
}


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
        key = f"{self.seed}\0{custom_id}\0{attempt}".encode()
        draw = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") / 2**64
        edge = 0.0
        for kind in PER_REQUEST_FAULTS:
            edge += getattr(settings, kind)
            if draw < edge:
                return kind
        return None

    def http_fault(self) -> tuple[int, str, str] | None:
        """``(status, error_type, message)`` when this /v1 request should fail, else None."""
        draw = self._rng.random()
        edge = 0.0
        for kind in HTTP_FAULTS:
            edge += getattr(self.settings, kind)
            if draw < edge:
                self.injected[kind] += 1
                error_type, message = _HTTP_ERRORS[kind]
                status = {"http429": 429, "http500": 500, "http529": 529}[kind]
                return status, error_type, f"{message} (emulator fault {kind})"
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
