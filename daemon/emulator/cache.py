"""
Prompt caching on the emulator's virtual clock.

A cache breakpoint (``cache_control`` on a tool, system block or message
block, or top-level ``cache_control`` on the last block) whose prefix reaches
the model's minimum cacheable length is written the first time the prefix is
seen and read within its TTL afterwards, each read refreshing the TTL (PC).
Shorter prefixes are silently not cached. In batches caching is best effort,
so a seeded fraction of reads miss and write again (``cache_miss``).

Requests are cached at the (virtual) time they finish, so a one-request batch
that writes a prefix and a later batch that reads it, and a read after the TTL
that misses, all come out as they would in the API.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass

from batchd.daemon.emulator.prompt import PromptUnit, tokens

__all__ = ("MAX_BREAKPOINTS", "TTL_SECONDS", "CacheUse", "PromptCache", "check_breakpoints")

#: Seconds each ``cache_control.ttl`` keeps an entry alive.
TTL_SECONDS = {"5m": 300.0, "1h": 3600.0}
#: The API's limit on cache breakpoints per request (PC).
MAX_BREAKPOINTS = 4
_MAX_ENTRIES = 200_000


def check_breakpoints(units: list[PromptUnit]) -> str | None:
    """What the API rejects about a request's breakpoints (PC), or None."""
    marked = [unit.ttl for unit in units if unit.ttl is not None]
    if len(marked) > MAX_BREAKPOINTS:
        return (
            f"cache_control: a request may have at most {MAX_BREAKPOINTS} cache breakpoints, "
            f"this one has {len(marked)}"
        )
    seen_5m = False
    for ttl in marked:
        if ttl == "5m":
            seen_5m = True
        elif seen_5m:
            return (
                "cache_control: a 1h cache breakpoint may not come after a 5m one "
                "(longer TTLs must come first)"
            )
    return None


@dataclass(frozen=True)
class CacheUse:
    """How a request's prompt tokens split between cache reads, writes and the rest."""

    input_tokens: int
    read: int
    write_5m: int
    write_1h: int
    missed: bool = False


@dataclass
class _Entry:
    written_at: float
    expires_at: float


class PromptCache:
    """
    Cached prefixes by (model, prefix) digest, with the virtual time they live.

    Results files are written in worker threads, so every use takes a lock.
    The number of entries is capped (expired ones go first, then the oldest),
    which keeps memory flat however many distinct prefixes pass through.
    """

    def __init__(self) -> None:
        self._entries: dict[bytes, _Entry] = {}
        self._lock = threading.Lock()
        #: Reads that missed on purpose (the ``cache_miss`` fault).
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.misses = 0

    def use(
        self, model: str, units: list[PromptUnit], min_tokens: int, at: float, *, miss: bool
    ) -> CacheUse:
        """
        Split the prompt's tokens for a request processed at ``at``, updating the cache.

        ``miss``: a read this request would make misses instead (best effort).
        """
        total = tokens(sum(unit.chars for unit in units))
        breakpoints: list[tuple[bytes, int, str]] = []
        digest = hashlib.blake2b(model.encode(), digest_size=16)
        chars = 0
        for unit in units:
            digest.update(len(unit.key).to_bytes(8, "big"))
            digest.update(unit.key)
            chars += unit.chars
            if unit.ttl is not None:
                prefix = tokens(chars)
                if prefix >= min_tokens:
                    breakpoints.append((digest.copy().digest(), prefix, unit.ttl))
        if not breakpoints:
            return CacheUse(total, 0, 0, 0)
        with self._lock:
            hit = -1
            for index in range(len(breakpoints) - 1, -1, -1):
                entry = self._entries.get(breakpoints[index][0])
                if entry is not None and entry.written_at <= at < entry.expires_at:
                    hit = index
                    break
            missed = hit >= 0 and miss
            if missed:
                hit = -1
                self.misses += 1
            read = breakpoints[hit][1] if hit >= 0 else 0
            if hit >= 0:
                key, _, ttl = breakpoints[hit]
                entry = self._entries[key]
                entry.expires_at = max(entry.expires_at, at + TTL_SECONDS[ttl])
            writes = {"5m": 0, "1h": 0}
            done = read
            for key, prefix, ttl in breakpoints[hit + 1 :]:
                writes[ttl] += prefix - done
                done = prefix
                self._write(key, at, TTL_SECONDS[ttl])
        return CacheUse(total - done, read, writes["5m"], writes["1h"], missed)

    def _write(self, key: bytes, at: float, ttl: float) -> None:
        entry = self._entries.get(key)
        if entry is None:
            if len(self._entries) >= _MAX_ENTRIES:
                self._evict(at)
            self._entries[key] = _Entry(at, at + ttl)
        else:
            entry.written_at = min(entry.written_at, at) if entry.expires_at > at else at
            entry.expires_at = max(entry.expires_at, at + ttl)

    def _evict(self, now: float) -> None:
        for key in [k for k, e in self._entries.items() if e.expires_at <= now]:
            del self._entries[key]
        while len(self._entries) >= _MAX_ENTRIES:
            del self._entries[next(iter(self._entries))]
