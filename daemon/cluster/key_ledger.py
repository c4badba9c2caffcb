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
from batchd.daemon.cluster.shards import ShardLease, hold
from batchd.daemon.intake.ledger import Claim, position_identity

__all__ = ("claim_keys", "release_keys")

# The insert both ways share. In the common case (every key new) a plain insert claims them
# all: it costs the server half of what ON CONFLICT's speculative insertion does
# (docs/benchmarks.md §10), and a key already there fails it whole, sending the claim the
# slow way.
_INSERT = """
INSERT INTO {s}.key_ledger (pipeline, key, shard, chunk, position)
SELECT $1, t.key, $3, $4, t.position FROM unnest($2::text[], $5::bytea[]) AS t(key, position)
"""

# The common case in one statement, so in one round trip and its own transaction: the
# shard lease checked (and held against a takeover until the insert commits), the keys
# listed under the chunk (retention finds a retired chunk's keys by its lists) and
# inserted. No row inserted while keys were given means the lease was lost. Each round
# trip costs both the worker and the server CPU, whatever it carries (§10).
_CLAIM_NEW = """
WITH held AS (SELECT 1 FROM {s}.shard WHERE pipeline = $1 AND shard = $3 AND owner = $6
              AND epoch = $7 FOR SHARE),
listed AS (INSERT INTO {s}.key_list (pipeline, chunk, n, keys)
           SELECT $1, $4, cardinality($2::text[]), $2::text[] FROM held)""" + _INSERT + """\
WHERE EXISTS (SELECT 1 FROM held)
"""

# A list may name keys the chunk did not get (replays, duplicates): retention deletes a
# key only while the ledger gives it to the listed chunk.
_LIST = """
INSERT INTO {s}.key_list (pipeline, chunk, n, keys)
VALUES ($1, $2, cardinality($3::text[]), $3::text[])
"""

# The slow way's first step: the new keys claimed, the count says whether any was
# already in the ledger (a key of this very chunk included).
_INSERT_NEW = _INSERT + "ON CONFLICT (pipeline, key) DO NOTHING\n"

# One index lookup per key, whatever the planner knows: a lateral subquery with LIMIT
# is never flattened into a join, and `key = ANY($2)` on a young ledger (no statistics
# yet) was planned as a bitmap scan of the pipeline's whole ledger.
_PROBE = """
SELECT k.key, k.shard, k.chunk, k.position,
       EXISTS (SELECT 1 FROM {s}.chunk c WHERE c.chunk = k.chunk) AS sealed
FROM unnest($2::text[]) AS t(key)
CROSS JOIN LATERAL (SELECT l.key, l.shard, l.chunk, l.position FROM {s}.key_ledger l
                    WHERE l.pipeline = $1 AND l.key = t.key LIMIT 1) AS k
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

    New keys are inserted at once (one statement that also checks the lease); only
    when some were already in the ledger are the keys read back and sorted by the rules above
    (claims of this chunk, just inserted or left by a reader that died building it,
    are the chunk's again).
    Two shards claiming one key at once cannot both have it: the second insert
    waits on the first's and then finds its claim.

    Raises:
        FencedOut: the shard lease was lost; nothing was claimed.
    """
    import asyncpg  # here, so that this module imports without the postgres extra

    claim = Claim()
    if not entries:
        return claim
    positions = {key: position_identity(position) for key, position in entries}

    keys, values = list(positions), list(positions.values())
    fast = (sql(_CLAIM_NEW), lease.pipeline, keys, lease.shard, chunk, values, lease.owner,
            lease.epoch)
    try:
        if conn.is_in_transaction():
            async with conn.transaction():  # a savepoint: a key there already fails only it
                done = await conn.execute(*fast)
        else:
            done = await conn.execute(*fast)
    except asyncpg.UniqueViolationError:
        pass  # some key was there already: nothing was inserted
    else:
        if int(done.split()[-1]) == 0:
            raise FencedOut(f"shard {lease.pipeline}/{lease.shard}",
                            f"lost by {lease.owner} at epoch {lease.epoch}")
        return claim

    async def body() -> Claim:
        await hold(conn, sql, lease)
        await conn.execute(sql(_LIST), lease.pipeline, chunk, keys)
        done = await conn.execute(sql(_INSERT_NEW), lease.pipeline, keys, lease.shard, chunk,
                                  values)
        if int(done.split()[-1]) == len(keys):
            return claim
        fresh: dict[str, bytes] = {}
        for found in await conn.fetch(sql(_PROBE), lease.pipeline, keys):
            key = found["key"]
            position = positions[key]
            if not found["sealed"] and found["shard"] == lease.shard:
                if found["chunk"] != chunk or found["position"] != position:
                    fresh[key] = position  # a dead reader's leftover: this chunk's now
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
