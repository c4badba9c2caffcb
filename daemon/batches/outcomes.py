"""
What driving a chunk came to: :meth:`ChunkDriver.run` returns one of these and
the pipeline runner acts on it (start the retry chunk, commit the source, shrink
the next chunks, hold the chunk). The driver itself never reaches into the runner.
"""

from __future__ import annotations

from dataclasses import dataclass

from batchd.daemon.results.collector import CollectSummary
from batchd.daemon.store.contract import ChunkLease

__all__ = ("Committed", "Held", "Lost", "Outcome", "RateLimited", "Retired")


@dataclass(frozen=True, slots=True)
class Retired:
    """The chunk is no longer live in the manifest: nothing left to do."""

    chunk: str


@dataclass(frozen=True, slots=True)
class Committed:
    """
    The chunk's results are committed; its family may let the source commit advance.

    ``summary`` is the collect this run made (None when it was committed before),
    for the runner's pause and dead-letter checks; ``retry_chunk`` the chunk that
    collect cut for the rows to send again, which the runner starts driving under
    ``retry_lease``: the lease the store gave the writer of the commit that sealed it
    (in a cluster the retry chunk is born owned by that worker, at epoch 1).
    """

    chunk: str
    summary: CollectSummary | None = None
    retry_chunk: str | None = None
    retry_lease: ChunkLease | None = None


@dataclass(frozen=True, slots=True)
class RateLimited:
    """A create was refused for now (429, ramp limit); the retry-after was waited out."""

    chunk: str
    code: str
    retry_after: float
    shrink: bool  # the queue may be full: make the next chunks smaller


@dataclass(frozen=True, slots=True)
class Held:
    """The chunk cannot go on until an operator acts (its spool is lost beyond rebuilding)."""

    chunk: str
    reason: str


@dataclass(frozen=True, slots=True)
class Lost:
    """
    The store fenced one of the chunk's records: its lease (or the stage it was at) no
    longer holds, so another worker drives it now. Not an error: the driver stops quietly.
    """

    chunk: str
    reason: str


Outcome = Retired | Committed | RateLimited | Held | Lost
