"""
Org-wide limits as counter rows: a budget in USD, a processing queue in requests.

Advisory locks carry no data, stay held by a SIGSTOPped session and break under
transaction pooling, so a limit is a row: ``cap``, ``reserved`` (by holds not yet
settled), ``spent`` and ``external`` (what others use: for a queue, the API's
processing count minus ours, set by :func:`reconcile_external`). A reservation
passes only if ``spent + reserved + external + amount <= cap`` on every scope it
names, in one statement that is rolled back unless every scope updated: all or
nothing, and never past a cap however many workers reserve at once (each
counter row is updated under its row lock, and READ COMMITTED re-checks the
condition against the committed value).

Every reservation is also a hold row ``(scope, holder, amount)``, the holder
being the chunk, so reserving twice for one chunk counts once, releasing or
settling twice counts once, and the counters are recomputable from the holds and
the holds from the chunks' stages (:func:`recompute`).

Scopes by convention: ``budget:org``, ``budget:<pipeline>`` (reserve the chunk's
upper bound at seal, settle its cost at results_committed), ``queue:<workspace>``
(reserve its requests at intent, release at ended or a definite failure). Run
them in the transition's own transaction (``on_applied`` in
``daemon/cluster/fencing.py``), so a reservation commits exactly when the
transition does (``daemon/cluster/budget_holds.py`` does so for the budget).

A ``queue:`` reservation larger than the whole cap passes when nothing else is
reserved or used there, as one daemon sends such a chunk alone rather than never.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from batchd.daemon.cluster.errors import LimitUndefined
from batchd.daemon.cluster.schema import Sql

__all__ = (
    "Counter",
    "Defined",
    "Drift",
    "counter",
    "counters",
    "define",
    "recompute",
    "reconcile_external",
    "release",
    "reserve",
    "settle",
    "spend",
)

Amount = int | float | Decimal

# Stages at which a chunk's hold of each kind of scope is still due.
_HELD_AT = {
    "queue:": ("intent", "submitted"),
    "budget:": ("sealed", "intent", "submitted", "ended"),
}


@dataclass(frozen=True)
class Counter:
    scope: str
    cap: Decimal | None
    reserved: Decimal
    spent: Decimal
    external: Decimal

    @property
    def available(self) -> Decimal | None:
        """What one more reservation may take; None when there is no cap."""
        if self.cap is None:
            return None
        return self.cap - self.spent - self.reserved - self.external


@dataclass(frozen=True)
class Drift:
    """One way the counters disagree with what the holds and the chunks say."""

    scope: str
    what: str  # "stale_hold", "reserved" or "spent"
    found: Decimal
    expected: Decimal
    holder: str | None = None


def _amount(value: Amount, what: str) -> Decimal:
    if isinstance(value, bool) or (isinstance(value, float) and not math.isfinite(value)):
        raise ValueError(f"{what} must be a finite number, not {value!r}")
    amount = Decimal(str(value)) if isinstance(value, float) else Decimal(value)
    if amount < 0:
        raise ValueError(f"{what} must not be negative, not {value!r}")
    return amount


@dataclass(frozen=True)
class Defined:
    """What :func:`define` found and left: the cap before (None: none) and now."""

    scope: str
    previous: Decimal | None
    cap: Decimal | None
    created: bool

    @property
    def changed(self) -> bool:
        """An existing counter whose cap this definition moved."""
        return not self.created and self.previous != self.cap

    @property
    def raised(self) -> bool:
        """The cap moved up (or was lifted): a budget pause may lift."""
        if not self.changed or self.previous is None:
            return False
        return self.cap is None or self.cap > self.previous


# A new budget counter starts at what its pipelines already spent (the pipeline rows'
# recorded cost), so a budget defined after a pipeline ran counts that spend too.
_DEFINE = """
INSERT INTO {s}.limit_counter (scope, cap, spent) VALUES ($1, $2, CASE
    WHEN $1 = 'budget:org' THEN (SELECT coalesce(sum(cost_usd), 0)::numeric FROM {s}.pipeline)
    WHEN $1 LIKE 'budget:%' THEN coalesce(
        (SELECT cost_usd::numeric FROM {s}.pipeline WHERE 'budget:' || name = $1), 0)
    ELSE 0 END)
ON CONFLICT (scope) DO UPDATE SET cap = EXCLUDED.cap, updated_at = now()
RETURNING cap
"""


async def define(conn: Any, sql: Sql, scope: str, cap: Amount | None) -> Defined:
    """
    Create a limit or change its cap (None: no cap, only counted); what it was before.

    The caller's cap wins over the row's: the runtime defines its config's caps at
    every start and reload, and logs a :attr:`Defined.changed` one.
    """
    value = None if cap is None else _amount(cap, f"cap of {scope}")
    async with conn.transaction():
        old = await conn.fetchrow(
            sql("SELECT cap FROM {s}.limit_counter WHERE scope = $1 FOR UPDATE"), scope)
        now = await conn.fetchval(sql(_DEFINE), scope, value)
    return Defined(scope, None if old is None else old["cap"], now, old is None)


async def counter(conn: Any, sql: Sql, scope: str) -> Counter | None:
    """One counter as it is now; None when *scope* is not defined."""
    r = await conn.fetchrow(
        sql("SELECT scope, cap, reserved, spent, external FROM {s}.limit_counter"
            " WHERE scope = $1"), scope)
    return None if r is None else Counter(r["scope"], r["cap"], r["reserved"], r["spent"],
                                          r["external"])


class _Refused(Exception):
    pass


@asynccontextmanager
async def _atomic(conn: Any) -> AsyncIterator[None]:
    """
    A transaction of its own, or the caller's: inside a transition a savepoint would only
    add two round trips (``SAVEPOINT``, ``RELEASE``) for work that fails with it anyway.
    """
    if conn.is_in_transaction():
        yield
        return
    async with conn.transaction():
        yield


async def _lock(conn: Any, sql: Sql, scopes: Iterable[str]) -> set[str]:
    rows = await conn.fetch(
        sql("SELECT scope FROM {s}.limit_counter WHERE scope = ANY($1::text[])"
            " ORDER BY scope FOR UPDATE"),
        sorted(set(scopes)),
    )
    return {r["scope"] for r in rows}


async def reserve(conn: Any, sql: Sql, scopes: Iterable[str], amount: Amount, holder: str,
                  *, force: bool = False) -> bool:
    """
    Reserve *amount* on every scope for *holder*, or on none; False when a cap refuses.

    A scope the holder already holds is left as it is (a retried reservation).
    With *force* the caps are not asked: the hold is counted whatever they say (a
    retry chunk cut at collect, which one daemon does not check against its
    budget either, must still be seen by the next seal's check).

    Raises:
        LimitUndefined: a scope has no counter row (nothing was reserved).
    """
    wanted = sorted(set(scopes))
    value = _amount(amount, f"reservation for {holder}")
    try:
        async with conn.transaction():
            found = await _lock(conn, sql, wanted)
            missing = [s for s in wanted if s not in found]
            if missing:
                raise LimitUndefined(f"limit scope {', '.join(missing)} is not defined")
            held = {
                r["scope"]
                for r in await conn.fetch(
                    sql("SELECT scope FROM {s}.limit_hold WHERE holder = $1"
                        " AND scope = ANY($2::text[])"),
                    holder, wanted,
                )
            }
            new = [s for s in wanted if s not in held]
            if not new:
                return True
            updated = await conn.fetch(
                sql("UPDATE {s}.limit_counter SET reserved = reserved + $2, updated_at = now()"
                    " WHERE scope = ANY($1::text[])"
                    " AND ($3 OR cap IS NULL OR spent + reserved + external + $2 <= cap"
                    "      OR (scope LIKE 'queue:%' AND reserved + external = 0))"
                    " RETURNING scope"),
                new, value, force,
            )
            if len(updated) != len(new):
                raise _Refused
            await conn.execute(
                sql("INSERT INTO {s}.limit_hold (scope, holder, amount)"
                    " SELECT unnest($1::text[]), $2, $3"),
                new, holder, value,
            )
    except _Refused:
        return False
    return True


async def settle(
    conn: Any, sql: Sql, holder: str, spent: Mapping[str, Amount] | None = None,
    *, scopes: Iterable[str] | None = None, prefix: str | None = None,
) -> list[str]:
    """
    Drop *holder*'s holds (all, on *scopes*, or on those starting with *prefix*);
    count *spent* where a hold was dropped.

    Idempotent: a second call finds no hold and changes nothing. Returns the
    scopes whose hold was dropped.
    """
    costs = {scope: _amount(v, f"spent on {scope}") for scope, v in (spent or {}).items()}
    only = None if scopes is None else sorted(set(scopes))
    async with _atomic(conn):
        holds = await conn.fetch(
            sql("SELECT scope FROM {s}.limit_hold WHERE holder = $1"
                " AND ($2::text[] IS NULL OR scope = ANY($2::text[]))"
                " AND ($3::text IS NULL OR starts_with(scope, $3))"),
            holder, only, prefix,
        )
        if prefix is not None:
            only = sorted(r["scope"] for r in holds)
        if not holds:
            return []
        await _lock(conn, sql, [r["scope"] for r in holds])
        rows = await conn.fetch(
            sql("""
            WITH gone AS (
                DELETE FROM {s}.limit_hold WHERE holder = $1
                  AND ($2::text[] IS NULL OR scope = ANY($2::text[]))
                RETURNING scope, amount
            )
            UPDATE {s}.limit_counter c
            SET reserved = c.reserved - gone.amount,
                spent = c.spent + coalesce(
                    (SELECT a FROM unnest($3::text[], $4::numeric[]) AS t(scope, a)
                     WHERE t.scope = c.scope), 0),
                updated_at = now()
            FROM gone WHERE c.scope = gone.scope
            RETURNING c.scope"""),
            holder, only, list(costs), list(costs.values()),
        )
    return sorted(r["scope"] for r in rows)


async def release(
    conn: Any, sql: Sql, holder: str, scopes: Iterable[str] | None = None, *,
    prefix: str | None = None,
) -> list[str]:
    """Drop *holder*'s holds without spending (a queue slot at ``ended``); idempotent."""
    return await settle(conn, sql, holder, None, scopes=scopes, prefix=prefix)


async def spend(conn: Any, sql: Sql, holder: str, scopes: Iterable[str], cost: Amount) -> list[str]:
    """
    Count *cost* as spent on every defined scope of *scopes*, dropping *holder*'s holds there.

    Unlike :func:`settle` the cost counts even where the holder held nothing (a
    chunk sealed before its budget was defined): so it is not idempotent on its
    own, and runs only inside the transition that settles the chunk (its
    results_committed), which applies once. Returns the scopes counted.
    """
    wanted = sorted(set(scopes))
    value = _amount(cost, f"cost of {holder}")
    async with _atomic(conn):
        await _lock(conn, sql, wanted)
        rows = await conn.fetch(
            sql("""
            WITH gone AS (
                DELETE FROM {s}.limit_hold WHERE holder = $1 AND scope = ANY($2::text[])
                RETURNING scope, amount
            )
            UPDATE {s}.limit_counter c
            SET reserved = c.reserved - coalesce(
                    (SELECT sum(g.amount) FROM gone g WHERE g.scope = c.scope), 0),
                spent = c.spent + $3, updated_at = now()
            WHERE c.scope = ANY($2::text[])
            RETURNING c.scope"""),
            holder, wanted, value,
        )
    return sorted(r["scope"] for r in rows)


async def reconcile_external(conn: Any, sql: Sql, scope: str, observed: Amount) -> Decimal:
    """
    Set what others use of *scope* from an observed total (the API's processing count).

    The observation includes our own in-flight work, so ``external = observed −
    reserved`` (never below zero). Returns the new value.
    """
    value = await conn.fetchval(
        sql("UPDATE {s}.limit_counter SET external = greatest(0, $2 - reserved),"
            " updated_at = now() WHERE scope = $1 RETURNING external"),
        scope, _amount(observed, f"observed use of {scope}"),
    )
    if value is None:
        raise LimitUndefined(f"limit scope {scope} is not defined")
    result: Decimal = value
    return result


async def counters(conn: Any, sql: Sql) -> list[Counter]:
    rows = await conn.fetch(
        sql("SELECT scope, cap, reserved, spent, external FROM {s}.limit_counter ORDER BY scope")
    )
    return [Counter(r["scope"], r["cap"], r["reserved"], r["spent"], r["external"]) for r in rows]


_STALE = """
SELECT h.scope, h.holder, h.amount FROM {s}.limit_hold h
LEFT JOIN {s}.chunk c ON c.chunk = h.holder
WHERE c.chunk IS NULL OR c.stage = 'retired'
   OR (h.scope LIKE 'queue:%' AND NOT c.stage = ANY($1::text[]))
   OR (h.scope LIKE 'budget:%' AND NOT c.stage = ANY($2::text[]))
ORDER BY h.scope, h.holder
"""

_RESERVED = """
SELECT c.scope, c.reserved, coalesce(sum(h.amount), 0) AS held
FROM {s}.limit_counter c LEFT JOIN {s}.limit_hold h ON h.scope = c.scope
GROUP BY c.scope, c.reserved HAVING c.reserved <> coalesce(sum(h.amount), 0)
ORDER BY c.scope
"""

_SPENT = """
SELECT c.scope, c.spent, e.cost FROM {s}.limit_counter c
JOIN (SELECT 'budget:' || name AS scope, cost_usd::numeric AS cost FROM {s}.pipeline
      UNION ALL
      SELECT 'budget:org', coalesce(sum(cost_usd), 0)::numeric FROM {s}.pipeline) e
  ON e.scope = c.scope
WHERE abs(c.spent - e.cost) > 0.000001
ORDER BY c.scope
"""


async def recompute(conn: Any, sql: Sql, *, fix: bool = False) -> list[Drift]:
    """
    Check the counters against the holds and the chunks; with *fix*, repair what can be.

    * ``stale_hold``: a hold its chunk should have given back (retired, unknown,
      or past the stage its kind of scope is held to); fixed by dropping it.
    * ``reserved``: a counter's ``reserved`` is not the sum of its holds; fixed
      by setting it to that sum.
    * ``spent``: ``budget:<pipeline>`` (or ``budget:org``) differs from the
      pipelines' recorded cost; reported only, since a budget defined after a
      pipeline started counts only what was settled since.
    """
    found: list[Drift] = []
    async with conn.transaction():
        stale = await conn.fetch(sql(_STALE), list(_HELD_AT["queue:"]), list(_HELD_AT["budget:"]))
        for r in stale:
            found.append(Drift(r["scope"], "stale_hold", r["amount"], Decimal(0), r["holder"]))
        if fix and found:
            await conn.execute(
                sql("DELETE FROM {s}.limit_hold h"
                    " USING unnest($1::text[], $2::text[]) AS t(stale_scope, stale_holder)"
                    " WHERE h.scope = t.stale_scope AND h.holder = t.stale_holder"),
                [d.scope for d in found], [d.holder for d in found],
            )
        for r in await conn.fetch(sql(_RESERVED)):
            found.append(Drift(r["scope"], "reserved", r["reserved"], r["held"]))
        if fix:
            await conn.execute(
                sql("UPDATE {s}.limit_counter c SET reserved = coalesce("
                    "(SELECT sum(amount) FROM {s}.limit_hold h WHERE h.scope = c.scope), 0)")
            )
        for r in await conn.fetch(sql(_SPENT)):
            found.append(Drift(r["scope"], "spent", r["spent"], r["cost"]))
    return found
