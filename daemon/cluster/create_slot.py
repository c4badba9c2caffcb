"""
The create slot: creates are serialised per API workspace, cluster-wide.

This is the single daemon's ``create_lock`` and ``_latest_intent`` made shared.
Only the slot's *pending* chunk can own a batch nobody recorded: every earlier
create either got its ``submitted`` recorded, failed for certain, or was resolved
before the next intent could be written. So whoever takes the slot next knows
which one chunk to look for, and the batch it finds cannot be another chunk's.

Holding the slot (in order):

1. :func:`take` it. A pending intent left by a dead holder is returned: resolve
   it first (claim its chunk, list the API's batches in the intent's window;
   adopt the match with :func:`record_submitted`, or resend with
   :func:`record_intent` only after two lists at least :data:`RESEND_AFTER`
   seconds apart on the API's clock found nothing: the API's list may lag a
   create by a few seconds).
2. :func:`record_intent`: the ``submit_intent`` (at the DB's ``now()``), the
   queue reservation and ``pending = chunk``, in one transaction.
3. Create, with the body's last bytes behind the lease deadline
   (``daemon/cluster/deadline.py``).
4. :func:`record_submitted`: ``submitted``, the pending intent cleared and the
   slot released, in one transaction. On a definite failure instead,
   :func:`clear_pending` and :func:`release`.

A holder that stops heartbeating loses the slot after its TTL plus the taker's
grace, exactly like its chunks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from batchd.daemon.cluster.db import transaction
from batchd.daemon.cluster.errors import FencedOut
from batchd.daemon.cluster.fencing import Applied, apply_transition
from batchd.daemon.cluster.leases import ALIVE, DEAD, ChunkLease
from batchd.daemon.cluster.limits import reserve
from batchd.daemon.cluster.schema import Sql
from batchd.daemon.wal.manifest_state import Stage

__all__ = (
    "RESEND_AFTER",
    "CreateSlot",
    "PendingIntent",
    "clear_pending",
    "record_intent",
    "record_submitted",
    "release",
    "take",
)


# Seconds of API time between the first list that found no batch for a pending intent
# and the list that lets it be sent again (CLUSTER.md: "two lists 15 s apart").
RESEND_AFTER = 15.0


@dataclass(frozen=True)
class PendingIntent:
    """A create that may have made a batch nobody recorded: resolve it before any other."""

    chunk: str
    requests: int
    intent_at: float  # the chunk's first intent (DB clock): the API-side search window opens here
    last_intent_at: float
    intent_epoch: int  # the chunk lease epoch that wrote the intent
    left_by: str | None  # the holder that wrote it


@dataclass(frozen=True)
class CreateSlot:
    """The right to create in one workspace, while ``epoch`` is the slot's."""

    workspace: str
    holder: str
    epoch: int
    pending: PendingIntent | None
    previous_holder: str | None


_TAKE = f"""
WITH dead AS MATERIALIZED ({DEAD}),
current AS (
    SELECT s.workspace, s.holder AS previous_holder FROM {{s}}.create_slot s
    WHERE s.workspace = $3
      AND (s.holder IS NULL OR s.holder = $1 OR s.holder IN (SELECT worker_id FROM dead))
      AND {ALIVE}
    FOR UPDATE OF s
)
UPDATE {{s}}.create_slot s SET holder = $1, epoch = s.epoch + 1, taken_at = now()
FROM current WHERE s.workspace = current.workspace
RETURNING s.epoch, s.pending_chunk, s.pending_epoch, current.previous_holder
"""


async def take(
    conn: Any, sql: Sql, workspace: str, worker_id: str, *, grace: float
) -> CreateSlot | None:
    """
    Take the workspace's create slot with a new epoch; None while a live worker holds it.

    A pending intent whose chunk is no longer waiting on it (submitted since,
    or retired) is cleared here; one still at ``intent`` is returned.
    """
    await conn.execute(
        sql("INSERT INTO {s}.create_slot (workspace) VALUES ($1) ON CONFLICT DO NOTHING"),
        workspace,
    )

    async def body() -> CreateSlot | None:
        row = await conn.fetchrow(sql(_TAKE), worker_id, grace, workspace)
        if row is None:
            return None
        pending = None
        if row["pending_chunk"] is not None:
            chunk = await conn.fetchrow(
                sql("SELECT requests, intent_at, last_intent_at, stage FROM {s}.chunk"
                    " WHERE chunk = $1"),
                row["pending_chunk"],
            )
            if chunk is not None and chunk["stage"] == Stage.INTENT:
                pending = PendingIntent(
                    row["pending_chunk"], chunk["requests"], chunk["intent_at"],
                    chunk["last_intent_at"], row["pending_epoch"], row["previous_holder"],
                )
            else:
                await conn.execute(
                    sql("UPDATE {s}.create_slot SET pending_chunk = NULL, pending_epoch = NULL,"
                        " pending_since = NULL WHERE workspace = $1"),
                    workspace,
                )
        return CreateSlot(workspace, worker_id, row["epoch"], pending, row["previous_holder"])

    return await transaction(conn, body)


async def record_intent(
    conn: Any,
    sql: Sql,
    slot: CreateSlot,
    lease: ChunkLease,
    requests: int,
    *,
    expected: tuple[Stage, ...] = (Stage.SEALED, Stage.INTENT),
    queue_scope: str | None = None,
) -> Applied | None:
    """
    Announce a create: ``submit_intent`` at DB time, the queue reserved, the slot pending.

    Returns None, with nothing written, when *queue_scope*'s cap refuses the
    chunk's requests (the processing queue is full: wait for a batch to end).

    Raises:
        FencedOut: the chunk lease or the slot was lost (counted).
    """

    async def hold(c: Any) -> None:
        if queue_scope is not None and not await reserve(c, sql, [queue_scope], requests,
                                                          lease.chunk):
            raise _QueueFull
        done = await c.execute(
            sql("UPDATE {s}.create_slot SET pending_chunk = $4, pending_epoch = $5,"
                " pending_since = now() WHERE workspace = $1 AND holder = $2 AND epoch = $3"),
            slot.workspace, slot.holder, slot.epoch, lease.chunk, lease.epoch,
        )
        if done != "UPDATE 1":
            raise FencedOut(f"create slot {slot.workspace}", f"lost at epoch {slot.epoch}")

    at = await conn.fetchval("SELECT extract(epoch FROM clock_timestamp())::float8")
    try:
        return await apply_transition(
            conn, sql, lease, expected, "submit_intent",
            {"chunk": lease.chunk, "at": at, "requests": requests}, on_applied=hold,
        )
    except _QueueFull:
        return None


class _QueueFull(Exception):
    pass


async def record_submitted(
    conn: Any,
    sql: Sql,
    slot: CreateSlot,
    lease: ChunkLease,
    batch_id: str,
    created_at: str,
) -> Applied:
    """
    Record the chunk's batch (created, or adopted after listing) and free the slot.

    The ``submitted`` is fenced by the chunk lease only: the batch exists, and
    recording it is right even if the slot was taken meanwhile (the taker then
    finds the chunk no longer pending). The pending mark is cleared if it is
    this chunk; the slot is released if this holder still has it.

    Raises:
        FencedOut: the chunk lease was lost (counted); a survivor adopts the batch.
    """

    async def free(c: Any) -> None:
        await c.execute(
            sql("""UPDATE {s}.create_slot SET
                     pending_chunk = CASE WHEN pending_chunk = $4 THEN NULL ELSE pending_chunk END,
                     pending_epoch = CASE WHEN pending_chunk = $4 THEN NULL ELSE pending_epoch END,
                     pending_since = CASE WHEN pending_chunk = $4 THEN NULL ELSE pending_since END,
                     holder = CASE WHEN holder = $2 AND epoch = $3 THEN NULL ELSE holder END
                   WHERE workspace = $1"""),
            slot.workspace, slot.holder, slot.epoch, lease.chunk,
        )

    return await apply_transition(
        conn, sql, lease, Stage.INTENT, "submitted",
        {"chunk": lease.chunk, "batch_id": batch_id, "created_at": created_at}, on_applied=free,
    )


async def clear_pending(conn: Any, sql: Sql, slot: CreateSlot) -> bool:
    """The pending create failed for certain (no batch can exist): forget it."""
    done = await conn.execute(
        sql("UPDATE {s}.create_slot SET pending_chunk = NULL, pending_epoch = NULL,"
            " pending_since = NULL WHERE workspace = $1 AND holder = $2 AND epoch = $3"),
        slot.workspace, slot.holder, slot.epoch,
    )
    return bool(done == "UPDATE 1")


async def release(conn: Any, sql: Sql, slot: CreateSlot) -> bool:
    """Let the next creator in; a pending intent stays for it to resolve. False if lost."""
    done = await conn.execute(
        sql("UPDATE {s}.create_slot SET holder = NULL"
            " WHERE workspace = $1 AND holder = $2 AND epoch = $3"),
        slot.workspace, slot.holder, slot.epoch,
    )
    return bool(done == "UPDATE 1")
