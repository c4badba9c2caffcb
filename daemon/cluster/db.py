"""
Small helpers every cluster module shares: JSON columns and retried transactions.

JSON goes through orjson explicitly (``$n::jsonb`` with a string, a string back)
rather than a per-connection codec, so the functions work on any asyncpg
connection the caller hands them: a pool's, a test's, one through a proxy.

asyncpg is imported only when a transaction runs, so the lease, shard and
worker types can be imported (by ``daemon/store``'s contract and LocalStore)
in an install without the ``postgres`` extra.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import orjson

__all__ = ("from_json", "retryable", "to_json", "transaction")

T = TypeVar("T")


def retryable() -> tuple[type[BaseException], ...]:
    """A deadlock victim or a serialization failure did nothing: running it again is safe."""
    import asyncpg

    return (asyncpg.exceptions.DeadlockDetectedError, asyncpg.exceptions.SerializationError)


def to_json(value: Any) -> str | None:
    """A jsonb parameter; None stays SQL NULL (not the JSON null)."""
    return None if value is None else orjson.dumps(value).decode()


def from_json(value: str | None) -> Any:
    """A jsonb column's value as Python; SQL NULL is None."""
    return None if value is None else orjson.loads(value)


async def transaction(conn: Any, body: Callable[[], Awaitable[T]], *, attempts: int = 5) -> T:
    """
    Run *body* in a transaction, again if PostgreSQL picked it as a deadlock victim.

    Inside a caller's transaction it runs once as a savepoint: the caller's work
    cannot be replayed from here, so a deadlock is the caller's to retry.
    """
    nested = conn.is_in_transaction()
    again = retryable()
    for attempt in range(1, attempts + 1):
        try:
            async with conn.transaction():
                return await body()
        except again:
            if nested or attempt == attempts:
                raise
    raise AssertionError("unreachable")
