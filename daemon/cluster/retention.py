"""
What the cluster forgets, and when: the shared key ledger's old keys, old worker rows
and orphan spool blocks.

A cluster under continuous intake must run for months without its PostgreSQL store
growing without bound. Three things are forgotten here, by any worker, one at a time
(a session advisory lock per schema and pipeline; a worker that finds it taken skips
the pass, so two workers never delete the same rows at once):

* **Keys of the shared ledger**, with the single daemon's ``ledger_retention``
  (the pipeline's setting, else its source's default; ``0``/``"off"``: forever).
  A key goes once its chunk has been *retired* for longer than the retention and
  no chunk of that chunk's family (its root and retries) is still live. That is
  the local rule (keys claimed before ``now - retention``, never one of a live
  chunk) counted from retirement rather than from the claim, so a key is kept at
  least as long as locally. A key of a live chunk is never deleted, so
  :func:`key_ledger.claim_keys` can never find one of a live chunk's keys free; a
  key read again after it was forgotten is a new record (sent and paid again), as
  in a single daemon. Deletes go in batches (a few of the chunk's key lists, written
  by its claims), each its own short transaction; a per-pipeline watermark
  (the newest retirement already pruned, kept in memory) keeps a pass from
  revisiting every chunk ever retired.
* **Worker rows** stopped, or silent, for :data:`WORKERS_KEPT` that hold nothing
  (:func:`workers.purge_stopped`): one row per ``batchd run`` start otherwise piles
  up. Their chunks' and create slots' references are cleared by the foreign keys
  (``ON DELETE SET NULL``), their ``shard_reader`` rows go with them (``CASCADE``).
* **Spool blocks no live chunk uses** (:func:`spool_blocks.collect_orphans`, which
  nothing ran before): a retired chunk's that its worker died before deleting, a
  fenced uploader's, a refused seal's.

Not forgotten (docs/cluster.md, Retention): retired chunk rows (the key ledger's
"was it sealed" test and the batch-id index read them), the event log, and a dead
reader's claims of a chunk it never sealed (no chunk row says how old they are).
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import structlog

from batchd.daemon.cluster import spool_blocks, workers
from batchd.daemon.cluster.defaults import interval_from_env
from batchd.daemon.cluster.schema import Sql

__all__ = (
    "PRUNE_EVERY",
    "WORKERS_KEPT",
    "LedgerPruned",
    "Pass",
    "Retention",
    "collect_spool_orphans",
    "dedicated_connection",
    "prune_interval",
    "prune_ledger",
    "purge_workers",
    "retention_loop",
)

log = structlog.get_logger("batchd.cluster")

PRUNE_EVERY = 300.0  # seconds between passes, as the single daemon's ledger prunes
#: Tests shorten it (a drill lasts seconds); operators have no reason to.
PRUNE_ENV = "BATCHD_CLUSTER_RETENTION_SECONDS"
WORKERS_KEPT = 7 * 86400.0  # seconds a stopped or dead worker's row is kept (status shows it)
KEYS_PER_DELETE = 5000  # keys per DELETE statement (one short transaction each)
CHUNKS_PER_PAGE = 100  # retired chunks read per page of a pass
# Retirements committed out of their retired_at order (a transaction's now() is its
# start): each pass looks again this far behind the watermark.
WATERMARK_MARGIN = 3600.0
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# Retired chunks of the pipeline, in retirement order, after the cursor (retired_at,
# chunk) and before the cutoff; whether a member of the chunk's family is still live
# (its keys then stay).
_RETIRED = """
SELECT c.chunk, c.retired_at,
       EXISTS (SELECT 1 FROM {s}.chunk f WHERE f.pipeline = c.pipeline AND f.root = c.root
               AND f.stage <> 'retired') AS family_live
FROM {s}.chunk c
WHERE c.stage = 'retired' AND c.pipeline = $1
  AND c.retired_at < now() - $2 * interval '1 second'
  AND c.retired_at >= $3 AND (c.retired_at, c.chunk) > ($3, $4)
ORDER BY c.retired_at, c.chunk
LIMIT $5
"""

# Key lists of the given (retired) chunks, taken until they hold *keys_per_delete* keys
# (one at least), deleted with the keys they name that are still their chunk's. The stage
# is read again in the statement itself: nothing goes unless the chunk's row says retired.
# Keys by ctid, each found with one index lookup (a lateral subquery with LIMIT is never
# flattened into a join the planner could turn into a scan of the whole ledger); a row
# updated meanwhile has another ctid and is left alone.
_DELETE_KEYS = """
WITH lists AS (
    DELETE FROM {s}.key_list WHERE id = ANY(ARRAY(
        SELECT w.id FROM (
            SELECT l.id, l.n, sum(l.n) OVER (ORDER BY l.id) AS upto FROM {s}.key_list l
            WHERE l.chunk = ANY($2::text[]) AND l.pipeline = $1
              AND EXISTS (SELECT 1 FROM {s}.chunk c WHERE c.chunk = l.chunk
                          AND c.stage = 'retired')) w
        WHERE w.upto - w.n < $3))
    RETURNING chunk, keys),
gone AS (
    DELETE FROM {s}.key_ledger WHERE ctid = ANY(ARRAY(
        SELECT k.ctid FROM (SELECT chunk, unnest(keys) AS key FROM lists) t
        CROSS JOIN LATERAL (SELECT l.ctid FROM {s}.key_ledger l
                            WHERE l.pipeline = $1 AND l.key = t.key AND l.chunk = t.chunk
                            LIMIT 1) k))
    RETURNING 1)
SELECT (SELECT count(*) FROM lists) AS lists, (SELECT count(*) FROM gone) AS keys
"""


@dataclass(frozen=True)
class LedgerPruned:
    """One pass over a pipeline's ledger: keys deleted, and the new watermark."""

    keys: int
    chunks: int
    watermark: datetime | None  # the DB's retired_at up to which every chunk was pruned
    skipped: bool = False  # another worker held the pass


def _lock_name(sql: Sql, what: str) -> str:
    return f"batchd:{sql.schema}:retention:{what}"


async def prune_ledger(
    conn: Any,
    sql: Sql,
    pipeline: str,
    retention: float,
    *,
    since: datetime | None = None,
    keys_per_delete: int = KEYS_PER_DELETE,
    chunks_per_page: int = CHUNKS_PER_PAGE,
) -> LedgerPruned:
    """
    Delete the keys of *pipeline*'s chunks retired more than *retention* seconds ago.

    Args:
        since: the watermark a previous pass returned (looked at again from
            :data:`WATERMARK_MARGIN` before it); None: from the first retirement.

    Returns ``skipped`` (and *since* unchanged) when another worker holds the pass.
    """
    lock = _lock_name(sql, f"ledger:{pipeline}")
    got = await conn.fetchval("SELECT pg_try_advisory_lock(hashtext($1))", lock)
    if not got:
        return LedgerPruned(0, 0, since, skipped=True)
    try:
        return await _prune(conn, sql, pipeline, retention, since, keys_per_delete,
                            chunks_per_page)
    finally:
        with anyio.CancelScope(shield=True):
            await conn.fetchval("SELECT pg_advisory_unlock(hashtext($1))", lock)


async def _prune(conn: Any, sql: Sql, pipeline: str, retention: float,
                 since: datetime | None, keys_per_delete: int,
                 chunks_per_page: int) -> LedgerPruned:
    margin = timedelta(seconds=WATERMARK_MARGIN)
    cursor: tuple[datetime, str] = (_EPOCH if since is None else since - margin, "")
    held: datetime | None = None  # the earliest retirement whose keys a live family keeps
    watermark = since
    deleted = chunks = 0
    while True:
        page = await conn.fetch(sql(_RETIRED), pipeline, retention, *cursor, chunks_per_page)
        if not page:
            break
        ready = [r["chunk"] for r in page if not r["family_live"]]
        for r in page:
            if r["family_live"] and (held is None or r["retired_at"] < held):
                held = r["retired_at"]
        while ready:
            done = await conn.fetchrow(sql(_DELETE_KEYS), pipeline, ready, keys_per_delete)
            deleted += done["keys"]
            if done["lists"] == 0:  # every list of these chunks is gone
                break
        chunks += len(ready)
        cursor = (page[-1]["retired_at"], page[-1]["chunk"])
        if watermark is None or cursor[0] > watermark:
            watermark = cursor[0]
        if len(page) < chunks_per_page:
            break
    if held is not None:
        watermark = held  # looked at again (from a margin before it) until its family retires
    return LedgerPruned(deleted, chunks, watermark)


async def purge_workers(conn: Any, sql: Sql, *, older_than: float = WORKERS_KEPT) -> int:
    """Forget worker rows stopped or silent for *older_than* seconds that hold nothing."""
    lock = _lock_name(sql, "workers")
    async with conn.transaction():  # the lock is held until the purge commits
        if not await conn.fetchval("SELECT pg_try_advisory_xact_lock(hashtext($1))", lock):
            return 0
        return await workers.purge_stopped(conn, sql, older_than=older_than)


async def collect_spool_orphans(conn: Any, sql: Sql) -> int:
    """
    Drop spool blocks no live chunk uses (:func:`spool_blocks.collect_orphans`): a
    retired chunk's whose delete after the retirement never ran (the worker died), a
    fenced uploader's, a refused seal's, once an hour old.
    """
    lock = _lock_name(sql, "spool")
    async with conn.transaction():
        if not await conn.fetchval("SELECT pg_try_advisory_xact_lock(hashtext($1))", lock):
            return 0
        return await spool_blocks.collect_orphans(conn, sql)


@dataclass
class Retention:
    """
    One worker's retention passes for one pipeline: the ledger (when it has a
    retention) and the worker rows, every :data:`PRUNE_EVERY` seconds.
    """

    pipeline: str
    retention: float | None
    watermark: datetime | None = None

    async def run_once(self, conn: Any, sql: Sql) -> Pass:
        """One pass: the ledger's keys (None without a retention), workers, spool orphans."""
        pruned = None
        if self.retention:
            pruned = await prune_ledger(conn, sql, self.pipeline, self.retention,
                                        since=self.watermark)
            self.watermark = pruned.watermark
        return Pass(pruned, await purge_workers(conn, sql),
                    await collect_spool_orphans(conn, sql))


@dataclass(frozen=True)
class Pass:
    """What one pass forgot."""

    ledger: LedgerPruned | None  # None: the pipeline keeps its keys forever
    workers: int
    spool_blocks: int


def prune_interval() -> float:
    """Seconds between passes: :data:`PRUNE_EVERY`, or ``$BATCHD_CLUSTER_RETENTION_SECONDS``."""
    return interval_from_env(PRUNE_ENV, PRUNE_EVERY, "cluster retention")


# One pass at a time in a worker (per event loop), whatever its pipelines: each pass has
# its own connection, never one of the store's small pool, which the heartbeat needs.
_PASSES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, anyio.Lock] = (
    weakref.WeakKeyDictionary())


def _one_pass_at_a_time() -> anyio.Lock:
    loop = asyncio.get_running_loop()
    lock = _PASSES.get(loop)
    if lock is None:
        lock = _PASSES[loop] = anyio.Lock()
    return lock


@asynccontextmanager
async def dedicated_connection(dsn: str, name: str) -> AsyncIterator[Any]:
    """A connection of its own for one pass (closed after it, so any lock goes with it)."""
    import asyncpg  # here, so that this module imports without the postgres extra

    conn = await asyncpg.connect(dsn, timeout=30, server_settings={
        "application_name": f"batchd:{name}:retention"})
    try:
        yield conn
    finally:
        with anyio.CancelScope(shield=True):
            await conn.close(timeout=5)


async def retention_loop(
    connection: Callable[[], AbstractAsyncContextManager[Any]],
    sql: Sql,
    pipeline: str,
    retention: float | None,
    *,
    every: float | None = None,
) -> None:
    """
    A worker's passes for *pipeline*, every *every* seconds (:func:`prune_interval`), each
    on a connection of *connection* (:func:`dedicated_connection`), one pass of the
    worker's at a time; a failed pass is logged and tried again at the next.
    """
    keeper = Retention(pipeline, retention)
    interval = prune_interval() if every is None else every
    while True:
        await anyio.sleep(interval)
        try:
            async with _one_pass_at_a_time(), connection() as conn:
                done = await keeper.run_once(conn, sql)
        except Exception as exc:  # the database away: the next pass
            log.warning("cluster retention pass failed; will try again", pipeline=pipeline,
                        error=f"{type(exc).__name__}: {exc}")
            continue
        if done.ledger is not None and done.ledger.keys:
            log.info("key ledger pruned", pipeline=pipeline, keys_forgotten=done.ledger.keys,
                     chunks=done.ledger.chunks, retention_seconds=retention)
        if done.workers:
            log.info("stopped workers forgotten", workers=done.workers,
                     older_than_seconds=WORKERS_KEPT)
        if done.spool_blocks:
            log.info("orphan spool blocks dropped", blocks=done.spool_blocks)
