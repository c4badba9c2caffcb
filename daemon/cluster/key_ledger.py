"""
The shared key ledger: which keys a pipeline has packed, cluster-wide.

The same rules as the single daemon's SQLite ledger (``daemon/intake/ledger.py``, whose
:class:`Claim` it returns), with one difference that a shared store makes
possible: whether a claim's chunk was sealed is read from the chunk table rather
than inferred from chunk numbers, which are per shard once several workers read.

* a key claimed by a chunk of *this* shard that was never sealed is a leftover
  of a reader that died while building it: the claim is replaced;
* a key seen again at the same source position after its chunk was sealed is
  a replay (a source re-reading): skipped;
* anything else already claimed is a duplicate, reported with its owner (a
  leftover of *another* shard included: that shard's new reader replaces it,
  and a key read by two shards really is in the source twice).

Claims are fenced by the shard lease: a reader that lost its shard claims nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from batchd.daemon.cluster.db import transaction
from batchd.daemon.cluster.errors import FencedOut
from batchd.daemon.cluster.schema import Sql
from batchd.daemon.cluster.shards import ShardLease
from batchd.daemon.intake.ledger import Claim, position_identity

__all__ = ("claim_keys", "release_keys")

_PROBE = """
SELECT k.key, k.shard, k.chunk, k.position, c.chunk IS NOT NULL AS sealed
FROM {s}.key_ledger k LEFT JOIN {s}.chunk c ON c.chunk = k.chunk
WHERE k.pipeline = $1 AND k.key = ANY($2::text[])
"""

_UPSERT = """
INSERT INTO {s}.key_ledger (pipeline, key, shard, chunk, position)
SELECT $1, t.key, $3, $4, t.position FROM unnest($2::text[], $5::bytea[]) AS t(key, position)
ON CONFLICT (pipeline, key) DO UPDATE
SET shard = EXCLUDED.shard, chunk = EXCLUDED.chunk, position = EXCLUDED.position
"""


async def claim_keys(
    conn: Any,
    sql: Sql,
    lease: ShardLease,
    chunk: str,
    entries: Sequence[tuple[str, dict[str, Any] | None]],
) -> Claim:
    """
    Claim ``(key, position)`` pairs for *chunk*, being built from the leased shard.

    Raises:
        FencedOut: the shard lease was lost; nothing was claimed.
    """
    claim = Claim()
    if not entries:
        return claim
    positions = {key: position_identity(position) for key, position in entries}

    async def body() -> Claim:
        held = await conn.fetchrow(
            sql("SELECT owner, epoch FROM {s}.shard WHERE pipeline = $1 AND shard = $2"
                " FOR SHARE"),
            lease.pipeline, lease.shard,
        )
        if held is None or (held["owner"], held["epoch"]) != (lease.owner, lease.epoch):
            raise FencedOut(f"shard {lease.pipeline}/{lease.shard}",
                            f"lost by {lease.owner} at epoch {lease.epoch}")
        fresh: dict[str, bytes] = {}
        known = {r["key"]: r for r in await conn.fetch(sql(_PROBE), lease.pipeline,
                                                        list(positions))}
        for key, position in positions.items():
            found = known.get(key)
            if found is None or (not found["sealed"] and found["shard"] == lease.shard):
                fresh[key] = position
            elif found["sealed"] and found["position"] == position:
                claim.replays.add(key)
            else:
                claim.duplicates[key] = found["chunk"]
        if fresh:
            await conn.execute(sql(_UPSERT), lease.pipeline, list(fresh), lease.shard, chunk,
                               list(fresh.values()))
        return claim

    return await transaction(conn, body)


async def release_keys(conn: Any, sql: Sql, pipeline: str, keys: Sequence[str]) -> int:
    """Forget keys (an operator resubmitting dead letters on purpose); how many went."""
    done = await conn.execute(
        sql("DELETE FROM {s}.key_ledger WHERE pipeline = $1 AND key = ANY($2::text[])"),
        pipeline, list(keys),
    )
    return int(done.split()[-1])
