"""
The budget as shared counters: what a worker's store does inside a seal's and a
commit's own transaction, so a chunk's reservation commits exactly with its seal.

Each pipeline's ``budget:<pipeline>`` counter holds, per live chunk, the upper
bound of its cost (``Budget.upper_bound``: the same rule one daemon checks
against its manifest) from its seal until its results are committed, where the
hold becomes the chunk's real cost. A seal whose upper bound does not fit the cap
(``spent + reserved + external + bound <= cap``) is refused with
:class:`LimitRefused` and not recorded; a retry chunk cut at collect is held
whatever the cap says (one daemon does not check retries against the budget
either), so the next seal sees it. Holds a chunk still has when it is retired go
back (``release_retired``).

The upper bound needs the pipeline's prices and request options, which only the
runtime knows: it registers one per pipeline (:meth:`BudgetHolds.register`); a
pipeline without one takes no holds, as in the in-process store tests.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from batchd.daemon.cluster import limits
from batchd.daemon.cluster.errors import LimitRefused, LimitUndefined
from batchd.daemon.cluster.fencing import OnApplied
from batchd.daemon.cluster.schema import Sql

__all__ = (
    "BudgetHolds",
    "UpperBound",
    "budget_scope",
    "hold_unheld",
    "queue_release",
    "release_retired",
)

#: (requests, request bytes) -> the most a chunk of them can cost, in USD.
UpperBound = Callable[[int, int], float]


def budget_scope(pipeline: str) -> str:
    return f"budget:{pipeline}"


class BudgetHolds:
    """The upper bound per pipeline, and the callbacks the store runs in transitions."""

    def __init__(self) -> None:
        self._bounds: dict[str, UpperBound] = {}

    def register(self, pipeline: str, bound: UpperBound) -> None:
        self._bounds[pipeline] = bound

    def bound_of(self, pipeline: str) -> UpperBound | None:
        return self._bounds.get(pipeline)

    def bound(self, pipeline: str, requests: int, request_bytes: int) -> float | None:
        """A chunk's hold on its pipeline's budget; None if the pipeline has no bound."""
        fn = self._bounds.get(pipeline)
        return None if fn is None else float(fn(requests, request_bytes))

    def at_seal(self, sql: Sql, fields: Mapping[str, Any]) -> OnApplied | None:
        """Reserve the new chunk's upper bound, or refuse the seal (:class:`LimitRefused`)."""
        amount = self.bound(fields["pipeline"], fields["requests"], fields["bytes"])
        if amount is None:
            return None
        scope, chunk = budget_scope(fields["pipeline"]), fields["chunk"]

        async def hold(conn: Any) -> None:
            if await limits.reserve(conn, sql, [scope], amount, chunk):
                return
            now = await limits.counter(conn, sql, scope)
            assert now is not None  # reserve raised LimitUndefined otherwise
            raise LimitRefused(scope, amount, cap=None if now.cap is None else float(now.cap),
                               spent=float(now.spent), reserved=float(now.reserved),
                               external=float(now.external))

        return hold

    def at_commit(self, sql: Sql, fields: Mapping[str, Any]) -> OnApplied:
        """The chunk's hold becomes its cost; a retry chunk it cut is held (uncapped)."""
        chunk, cost = fields["chunk"], float(fields.get("cost_usd") or 0.0)
        retry = fields.get("retry_chunk")

        async def settle(conn: Any) -> None:
            pipeline = await conn.fetchval(
                sql("SELECT pipeline FROM {s}.chunk WHERE chunk = $1"), chunk)
            if pipeline is None:
                return
            scope = budget_scope(pipeline)
            await limits.spend(conn, sql, chunk, [scope], cost)
            if isinstance(retry, Mapping):
                amount = self.bound(pipeline, retry["requests"], retry["bytes"])
                if amount is not None:
                    try:
                        await limits.reserve(conn, sql, [scope], amount, retry["chunk"],
                                             force=True)
                    except LimitUndefined:
                        pass  # no budget counter (yet): the retry's cost counts when spent

        return settle


_UNSETTLED = ["sealed", "intent", "submitted", "ended"]


async def hold_unheld(conn: Any, sql: Sql, pipeline: str, bound: UpperBound) -> int:
    """
    Hold the upper bound of every live, unsettled chunk of *pipeline* that holds nothing
    on its budget (sealed before the budget was wired: imported from a single daemon, or
    by an older batchd), whatever the cap says, so the next seal's check counts them.
    Idempotent (a chunk holding already is skipped). Returns how many were held.
    """
    scope = budget_scope(pipeline)
    rows = await conn.fetch(
        sql("SELECT c.chunk, c.requests, c.bytes FROM {s}.chunk c"
            " WHERE c.pipeline = $1 AND c.stage = ANY($2::text[]) AND NOT EXISTS ("
            "   SELECT 1 FROM {s}.limit_hold h WHERE h.holder = c.chunk AND h.scope = $3)"
            " ORDER BY c.chunk"),
        pipeline, _UNSETTLED, scope,
    )
    for r in rows:
        await limits.reserve(conn, sql, [scope], bound(r["requests"], r["bytes"]), r["chunk"],
                             force=True)
    return len(rows)


async def release_retired(conn: Any, sql: Sql, chunk: str) -> list[str]:
    """Whatever a retired chunk still holds goes back (idempotent)."""
    return await limits.release(conn, sql, chunk)


def queue_release(sql: Sql, chunk: str) -> OnApplied:
    """At ``ended``: the chunk's requests leave the processing queue."""

    async def free(conn: Any) -> None:
        await limits.release(conn, sql, chunk, prefix="queue:")

    return free
