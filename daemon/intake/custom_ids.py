"""
The mapping from a record's key to the batch request's ``custom_id``.

The API accepts only ``^[a-zA-Z0-9_-]{1,64}$``, unique within a batch. Keys
that already fit are used as they are, so operators can read them in the
API console; anything else (spaces, unicode, 200-character keys) becomes a
short deterministic hash. The spool keeps custom_id → key, so the join back
is exact either way and never positional.
"""

from __future__ import annotations

import hashlib
import re

__all__ = ("CustomIdAllocator", "hashed_custom_id", "is_valid_custom_id")

# Matched whole with fullmatch: a "$" anchor would also accept a trailing "\n",
# which the API's pattern does not (the whole batch would be rejected).
_VALID = re.compile(r"[a-zA-Z0-9_-]{1,64}")


def is_valid_custom_id(value: str) -> bool:
    return _VALID.fullmatch(value) is not None


def hashed_custom_id(key: str, salt: int = 0) -> str:
    """``k-`` and 32 hex digits of BLAKE2b over the key (and a salt after a clash)."""
    data = key.encode("utf-8", "surrogatepass")
    if salt:
        data += b"\x00" + str(salt).encode()
    return "k-" + hashlib.blake2b(data, digest_size=16).hexdigest()


class CustomIdAllocator:
    """
    Assigns custom_ids within one chunk, guaranteeing uniqueness there.

    Deterministic for a given sequence of keys, so a chunk rebuilt after a
    crash gets the same ids.
    """

    __slots__ = ("_used",)

    def __init__(self) -> None:
        self._used: set[str] = set()

    def allocate(self, key: str, preferred: str | None = None) -> str:
        candidate = preferred if preferred is not None else key
        if not is_valid_custom_id(candidate) or candidate in self._used:
            salt = 0
            candidate = hashed_custom_id(key)
            while candidate in self._used:
                salt += 1
                candidate = hashed_custom_id(key, salt)
        self._used.add(candidate)
        return candidate

    def __len__(self) -> int:
        return len(self._used)
