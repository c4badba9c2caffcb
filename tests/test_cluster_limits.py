"""
Org-wide limits as counter rows: all-or-nothing reservations across scopes,
idempotent settles, caps that hold under concurrency, and drift recomputed.
"""

from __future__ import annotations

import asyncio
import random
from decimal import Decimal
from typing import Any

import pytest

from batchd.daemon.cluster import limits
from batchd.daemon.cluster.errors import LimitUndefined
from tests.fixtures.cluster import ClusterEnv


async def counter(cluster: ClusterEnv, scope: str) -> limits.Counter:
    return next(c for c in await limits.counters(cluster.conn, cluster.sql) if c.scope == scope)


@pytest.mark.anyio
class TestReservations:
    async def test_all_scopes_or_none(self, cluster: ClusterEnv) -> None:
        """A reservation one scope's cap refuses reserves nothing anywhere."""
        c, sql = cluster.conn, cluster.sql
        await limits.define(c, sql, "budget:org", 10)
        await limits.define(c, sql, "budget:p", 3)
        assert await limits.reserve(c, sql, ["budget:org", "budget:p"], 2.5, "p-000001")
        assert not await limits.reserve(c, sql, ["budget:org", "budget:p"], 1, "p-000002")
        assert (await counter(cluster, "budget:org")).reserved == Decimal("2.5")
        assert (await counter(cluster, "budget:p")).available == Decimal("0.5")
        holds = await c.fetch(sql("SELECT holder FROM {s}.limit_hold"))
        assert {r["holder"] for r in holds} == {"p-000001"}

    async def test_an_undefined_scope_is_an_error_naming_it(self, cluster: ClusterEnv) -> None:
        """A typo'd scope is not silently unlimited."""
        await limits.define(cluster.conn, cluster.sql, "budget:org", 10)
        with pytest.raises(LimitUndefined, match="queue:nope"):
            await limits.reserve(cluster.conn, cluster.sql, ["budget:org", "queue:nope"], 1, "x")
        assert (await counter(cluster, "budget:org")).reserved == 0

    async def test_no_cap_only_counts(self, cluster: ClusterEnv) -> None:
        """A scope without a cap accepts anything and keeps the count."""
        await limits.define(cluster.conn, cluster.sql, "queue:ws", None)
        assert await limits.reserve(cluster.conn, cluster.sql, ["queue:ws"], 10**9, "x")
        assert (await counter(cluster, "queue:ws")).available is None

    async def test_reserving_twice_for_one_holder_counts_once(self, cluster: ClusterEnv) -> None:
        """A retried reservation (same chunk) does not reserve again."""
        c, sql = cluster.conn, cluster.sql
        await limits.define(c, sql, "queue:ws", 10)
        assert await limits.reserve(c, sql, ["queue:ws"], 6, "p-000001")
        assert await limits.reserve(c, sql, ["queue:ws"], 6, "p-000001")
        assert (await counter(cluster, "queue:ws")).reserved == 6

    async def test_settle_and_release_are_idempotent(self, cluster: ClusterEnv) -> None:
        """Spent is added once per hold dropped; a second settle changes nothing."""
        c, sql = cluster.conn, cluster.sql
        await limits.define(c, sql, "budget:org", 10)
        await limits.define(c, sql, "queue:ws", 100)
        await limits.reserve(c, sql, ["budget:org"], 4, "p-000001")
        await limits.reserve(c, sql, ["queue:ws"], 3, "p-000001")
        assert await limits.release(c, sql, "p-000001", ["queue:ws"]) == ["queue:ws"]
        assert await limits.release(c, sql, "p-000001", ["queue:ws"]) == []
        assert await limits.settle(c, sql, "p-000001", {"budget:org": 1.25}) == ["budget:org"]
        assert await limits.settle(c, sql, "p-000001", {"budget:org": 1.25}) == []
        org = await counter(cluster, "budget:org")
        assert (org.reserved, org.spent) == (0, Decimal("1.25"))
        assert (await counter(cluster, "queue:ws")).reserved == 0

    async def test_spent_and_foreign_use_count_against_the_cap(self, cluster: ClusterEnv) -> None:
        """What others use (the API's processing count minus ours) leaves less to reserve."""
        c, sql = cluster.conn, cluster.sql
        await limits.define(c, sql, "queue:ws", 100)
        await limits.reserve(c, sql, ["queue:ws"], 30, "p-000001")
        assert await limits.reconcile_external(c, sql, "queue:ws", 90) == 60
        assert not await limits.reserve(c, sql, ["queue:ws"], 11, "p-000002")
        assert await limits.reserve(c, sql, ["queue:ws"], 10, "p-000002")
        with pytest.raises(LimitUndefined):
            await limits.reconcile_external(c, sql, "queue:none", 1)

    async def test_bad_amounts_are_refused(self, cluster: ClusterEnv) -> None:
        """Negative or non-finite amounts never reach the counters."""
        await limits.define(cluster.conn, cluster.sql, "queue:ws", 100)
        for bad in (-1, float("nan"), float("inf")):
            with pytest.raises(ValueError, match="reservation for x"):
                await limits.reserve(cluster.conn, cluster.sql, ["queue:ws"], bad, "x")

    async def test_caps_hold_under_concurrent_reservations(self, cluster: ClusterEnv) -> None:
        """Six workers reserving and releasing at once never push a counter past its cap."""
        await limits.define(cluster.conn, cluster.sql, "budget:org", 50)
        await limits.define(cluster.conn, cluster.sql, "queue:ws", 40)
        await limits.define(cluster.conn, cluster.sql, "budget:p", None)
        conns = [await cluster.connect() for _ in range(6)]
        peak = {"budget:org": Decimal(0), "queue:ws": Decimal(0)}
        granted = []

        async def worker(n: int, conn: Any) -> None:
            rng = random.Random(n)
            mine: list[str] = []
            for i in range(40):
                holder = f"w{n}-{i}"
                scopes = rng.choice([["budget:org", "budget:p"], ["queue:ws"],
                                     ["queue:ws", "budget:org"]])
                if await limits.reserve(conn, cluster.sql, scopes, rng.randint(1, 9), holder):
                    mine.append(holder)
                    granted.append(holder)
                if mine and rng.random() < 0.4:
                    await limits.release(conn, cluster.sql, mine.pop(rng.randrange(len(mine))))
                for row in await conn.fetch(cluster.sql(
                        "SELECT scope, reserved FROM {s}.limit_counter")):
                    if row["scope"] in peak:
                        peak[row["scope"]] = max(peak[row["scope"]], row["reserved"])

        await asyncio.gather(*(worker(n, c) for n, c in enumerate(conns)))
        assert peak["budget:org"] <= 50 and peak["queue:ws"] <= 40
        assert peak["budget:org"] >= 40  # the caps were actually contended
        assert len(granted) > 20
        reserved = {r.scope: r.reserved for r in await limits.counters(cluster.conn, cluster.sql)}
        holds = await cluster.conn.fetch(cluster.sql(
            "SELECT scope, sum(amount) AS s FROM {s}.limit_hold GROUP BY scope"))
        assert {r["scope"]: r["s"] for r in holds} == {k: v for k, v in reserved.items() if v}


@pytest.mark.anyio
class TestRecompute:
    async def test_reports_and_fixes_drift(self, cluster: ClusterEnv) -> None:
        """A hold whose chunk moved on and a tampered counter are found, then repaired."""
        c, sql = cluster.conn, cluster.sql
        w = await cluster.worker("a")
        await cluster.seal(await cluster.shard(w), "p-000001")
        await limits.define(c, sql, "queue:ws", 100)
        await limits.define(c, sql, "budget:p", 100)
        await limits.reserve(c, sql, ["queue:ws"], 3, "p-000001")  # a sealed chunk: too early
        await limits.reserve(c, sql, ["budget:p"], 2, "p-000001")  # due at sealed: fine
        await limits.reserve(c, sql, ["budget:p"], 1, "p-gone")  # no such chunk
        await c.execute(sql("UPDATE {s}.limit_counter SET reserved = reserved + 7"
                            " WHERE scope = 'budget:p'"))
        await c.execute(sql("UPDATE {s}.limit_counter SET spent = 5 WHERE scope = 'budget:p'"))
        found = await limits.recompute(c, sql)
        assert sorted((d.scope, d.what, d.holder) for d in found) == [
            ("budget:p", "reserved", None),
            ("budget:p", "spent", None),
            ("budget:p", "stale_hold", "p-gone"),
            ("queue:ws", "stale_hold", "p-000001"),
        ]
        await limits.recompute(c, sql, fix=True)
        assert [(d.scope, d.what) for d in await limits.recompute(c, sql)] == [
            ("budget:p", "spent")]  # spent is reported, never rewritten
        assert {x.scope: x.reserved for x in await limits.counters(c, sql)} == {
            "budget:p": 2, "queue:ws": 0}
