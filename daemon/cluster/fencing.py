"""
Fenced transitions: every manifest record, applied to the rows in one transaction
only while the writer's lease holds.

Each function here locks the rows the record touches (in the order
``daemon/cluster/schema.py`` fixes), lets ``daemon/cluster/transitions.py``
decide through the manifest's replay code what the record changes, checks the
writer's lease, then inserts the record into the event log and writes the
changed rows, all in one transaction:

* a record whose effect is already present is a no-op, whoever sends it (replay
  treats duplicates the same way), and nothing is written;
* otherwise a lease that no longer matches the row (owner, epoch, expected
  stage) raises :class:`FencedOut`: nothing is written, and the worker row's
  ``fenced`` counter goes up;
* otherwise a record replay would refuse raises :class:`IllegalTransition`.

Which lease fences which record:

========================  ==============================================
chunk lease               submit_intent, submitted, ended, results_committed
                          (and the retry chunk it seals)
shard lease               chunk_sealed, source_committed, chunk_retired
none                      pipeline_paused, pipeline_resumed, alarm
========================  ==============================================

Every record that changes a pipeline's row holds that row's lock while it takes
its event ``seq``, so per pipeline the event log's order is the commit order and
replaying it (:mod:`batchd.daemon.cluster.event_log`) yields exactly the rows.

*on_applied* callbacks run inside the same transaction, only when the record
changed something: that is where a budget or queue reservation, or a create
slot update, commits or rolls back together with the transition.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from batchd.daemon.cluster.chunk_rows import (
    CHUNK_FIELDS,
    PIPELINE_FIELDS,
    chunk_from_row,
    chunk_params,
    pipeline_from_row,
    pipeline_params,
    shard_column,
)
from batchd.daemon.cluster.db import to_json, transaction
from batchd.daemon.cluster.errors import FencedOut, IllegalTransition
from batchd.daemon.cluster.leases import ChunkLease
from batchd.daemon.cluster.schema import Sql
from batchd.daemon.cluster.shards import ShardLease
from batchd.daemon.cluster.spool_blocks import SpoolDigest, verify_stored
from batchd.daemon.cluster.transitions import (
    CHUNK_KINDS,
    PIPELINE_KINDS,
    Loaded,
    Plan,
    check_fence,
    normalize,
    plan,
)
from batchd.daemon.wal.manifest_state import ChunkState, PipelineState, Stage

__all__ = (
    "Applied",
    "OnApplied",
    "apply_transition",
    "commit_source",
    "record_pipeline_event",
    "retire_chunk",
    "seal_chunk",
)

OnApplied = Callable[[Any], Awaitable[None]]


@dataclass(frozen=True)
class Applied:
    """The outcome of a record: a no-op, or the event written and the chunk after it."""

    noop: bool
    record: dict[str, Any] | None = None  # as the manifest would hold it: seq, ts, kind, ...
    chunk: ChunkState | None = None
    created: tuple[ChunkLease, ...] = field(default=())


# -- statements ---------------------------------------------------------------

_CHUNK_SET = ", ".join(f"{name} = ${i + 2}" for i, name in enumerate(CHUNK_FIELDS))
_N = len(CHUNK_FIELDS)
_UPDATE_OWNED = (
    f"UPDATE {{s}}.chunk SET {_CHUNK_SET} WHERE chunk = $1"
    f" AND owner = ${_N + 2} AND epoch = ${_N + 3} AND stage = ${_N + 4}"
)
_UPDATE_ANY = f"UPDATE {{s}}.chunk SET {_CHUNK_SET} WHERE chunk = $1"
_EXTRA = ("shard", "root", "owner", "epoch", "sealed_event",
          "spool_epoch", "spool_sha256", "spool_blocks", "spool_bytes")
_INSERT_CHUNK = (
    f"INSERT INTO {{s}}.chunk ({', '.join(CHUNK_FIELDS + _EXTRA)}) VALUES "
    f"({', '.join(f'${i + 1}' for i in range(_N + len(_EXTRA)))})"
)
_INSERT_RANGE = ("INSERT INTO {s}.chunk_range (chunk, pipeline, shard, first_seq, last_seq,"
                 " position) VALUES ($1, $2, $3, $4, $5, $6)")
_UPSERT_PIPELINE = (
    f"INSERT INTO {{s}}.pipeline ({', '.join(PIPELINE_FIELDS)}) VALUES "
    f"({', '.join(f'${i + 1}' for i in range(len(PIPELINE_FIELDS)))}) "
    f"ON CONFLICT (name) DO UPDATE SET "
    + ", ".join(f"{name} = EXCLUDED.{name}" for name in PIPELINE_FIELDS if name != "name")
)
_INSERT_EVENT = (
    "INSERT INTO {s}.event (ts, kind, pipeline, chunk, worker, fence, epoch, record)"
    " VALUES (extract(epoch FROM clock_timestamp()), $1, $2, $3, $4, $5, $6, $7)"
    " RETURNING seq, ts"
)
_LOCK_CHUNKS = "SELECT * FROM {s}.chunk WHERE chunk = ANY($1::text[]) ORDER BY chunk FOR UPDATE"
_LOCK_PIPELINE = (
    f"SELECT {', '.join(PIPELINE_FIELDS)} FROM {{s}}.pipeline WHERE name = $1 FOR UPDATE"
)
_LOCK_SHARD = "SELECT owner, epoch FROM {s}.shard WHERE pipeline = $1 AND shard = $2 FOR UPDATE"


# -- shared steps ---------------------------------------------------------------


async def _lock_pipeline(conn: Any, sql: Sql, name: str) -> PipelineState | None:
    """Lock a pipeline's row; a pipeline's first record waits on an advisory lock instead."""
    row = await conn.fetchrow(sql(_LOCK_PIPELINE), name)
    if row is None:
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtext($1))", f"batchd:{sql.schema}:pipeline:{name}"
        )
        row = await conn.fetchrow(sql(_LOCK_PIPELINE), name)
    return None if row is None else pipeline_from_row(row)


def _split(rows: Iterable[Mapping[str, Any]]) -> tuple[dict[str, Mapping[str, Any]], Loaded]:
    """Locked chunk rows as the replay state sees them: live chunks and retired ids."""
    by_id = {r["chunk"]: r for r in rows}
    live = tuple(chunk_from_row(r) for r in by_id.values() if r["stage"] != "retired")
    retired = {r["chunk"]: r["pipeline"] for r in by_id.values() if r["stage"] == "retired"}
    return by_id, Loaded(chunks=live, retired=retired)


def _decide(
    kind: str, fields: Mapping[str, Any], loaded: Loaded
) -> tuple[Plan | None, Exception | None]:
    try:
        return plan(kind, fields, loaded), None
    except IllegalTransition as exc:
        return None, exc


async def _event(
    conn: Any, sql: Sql, kind: str, fields: Mapping[str, Any], *, pipeline: str | None,
    chunk: str | None, worker: str | None, fence: str, epoch: int | None,
) -> dict[str, Any]:
    row = await conn.fetchrow(
        sql(_INSERT_EVENT), kind, pipeline, chunk, worker, fence, epoch, to_json(dict(fields))
    )
    return {"seq": row["seq"], "ts": row["ts"], "kind": kind, **fields}


async def _write_pipeline(conn: Any, sql: Sql, result: Plan) -> None:
    if result.pipeline is not None:
        await conn.execute(sql(_UPSERT_PIPELINE), *pipeline_params(result.pipeline))


async def _insert_chunk(
    conn: Any, sql: Sql, chunk: ChunkState, *, shard: str, root: str, owner: str,
    sealed_event: int, spool: SpoolDigest,
) -> None:
    await verify_stored(conn, sql, chunk.chunk, spool)
    await conn.execute(
        sql(_INSERT_CHUNK), *chunk_params(chunk), shard, root, owner, 1, sealed_event,
        spool.epoch, spool.sha256, spool.blocks, spool.raw_bytes,
    )
    await conn.execute(
        sql(_INSERT_RANGE), chunk.chunk, chunk.pipeline, shard, chunk.first_seq, chunk.last_seq,
        to_json(chunk.position),
    )


async def _count_fenced(conn: Any, sql: Sql, worker: str) -> None:
    await conn.execute(
        sql("UPDATE {s}.worker SET fenced = fenced + 1 WHERE worker_id = $1"), worker
    )


def _stages(expected: Stage | str | Iterable[Stage | str]) -> tuple[str, ...]:
    if isinstance(expected, str):  # Stage is a StrEnum
        return (str(expected),)
    return tuple(str(s) for s in expected)


# -- chunk lease ----------------------------------------------------------------


async def apply_transition(
    conn: Any,
    sql: Sql,
    lease: ChunkLease,
    expected: Stage | str | Iterable[Stage | str],
    kind: str,
    fields: Mapping[str, Any],
    *,
    retry_spool: SpoolDigest | None = None,
    on_applied: OnApplied | None = None,
) -> Applied:
    """
    Record one of a chunk owner's transitions, if its lease and the stage still hold.

    Args:
        lease: the owner's (chunk, owner, epoch).
        expected: the stage (or stages) the owner believes the chunk is at.
        kind: submit_intent, submitted, ended or results_committed.
        fields: the record's fields, exactly as ``Manifest.append`` takes them.
        retry_spool: the uploaded spool of the retry chunk a results_committed seals.
        on_applied: run in the same transaction if the record changed something.

    Raises:
        FencedOut: the lease or stage no longer holds (counted on the worker row).
        IllegalTransition: replay would refuse the record.
        SpoolCorrupt: the retry chunk's stored spool is not the one uploaded.
    """
    if kind not in CHUNK_KINDS:
        raise IllegalTransition(f"{kind} is not a chunk owner's record")
    values = normalize(kind, fields)
    if values["chunk"] != lease.chunk:
        raise IllegalTransition(
            f"{kind} for chunk {values['chunk']} under a lease on {lease.chunk}"
        )
    stages = _stages(expected)
    retry = values.get("retry_chunk")
    ids = [lease.chunk]
    if retry and isinstance(retry.get("chunk"), str):
        ids.append(retry["chunk"])

    async def body() -> Applied:
        rows, loaded = _split(await conn.fetch(sql(_LOCK_CHUNKS), ids))
        row = rows.get(lease.chunk)
        if row is None:
            raise IllegalTransition(f"{kind} for unknown chunk {lease.chunk}")
        pipeline = await _lock_pipeline(conn, sql, row["pipeline"])
        loaded = Loaded(loaded.chunks, loaded.retired, pipeline)
        result = _settle(*_decide(kind, values, loaded), lambda: check_fence(
            f"chunk {lease.chunk}", owner=row["owner"], epoch=row["epoch"], stage=row["stage"],
            lease_owner=lease.owner, lease_epoch=lease.epoch, expected=stages,
        ))
        if result is None:
            current = next((c for c in loaded.chunks if c.chunk == lease.chunk), None)
            return Applied(True, chunk=current)
        if kind == "submitted":
            other = await conn.fetchval(
                sql("SELECT chunk FROM {s}.chunk WHERE batch_id = $1"), values["batch_id"]
            )
            if other is not None:
                raise IllegalTransition(
                    f"batch {values['batch_id']} already belongs to chunk {other}"
                )
        record = await _event(conn, sql, kind, values, pipeline=row["pipeline"],
                              chunk=lease.chunk, worker=lease.owner, fence="chunk",
                              epoch=lease.epoch)
        after = None
        for chunk in result.changed:
            if chunk.chunk == lease.chunk:
                after = chunk
                done = await conn.execute(sql(_UPDATE_OWNED), chunk.chunk, *chunk_params(chunk),
                                          lease.owner, lease.epoch, row["stage"])
            else:
                done = await conn.execute(sql(_UPDATE_ANY), chunk.chunk, *chunk_params(chunk))
            assert done == "UPDATE 1", f"locked row {chunk.chunk} did not update"
        created = []
        for chunk in result.created:
            if retry_spool is None:
                raise IllegalTransition(f"retry chunk {chunk.chunk} needs its spool uploaded first")
            await _insert_chunk(conn, sql, chunk, shard=row["shard"], root=row["root"],
                                owner=lease.owner, sealed_event=record["seq"], spool=retry_spool)
            created.append(ChunkLease(chunk.chunk, lease.owner, 1))
        await _write_pipeline(conn, sql, result)
        if on_applied is not None:
            await on_applied(conn)
        return Applied(False, record, after, tuple(created))

    return await _fenced(conn, sql, lease.owner, body)


async def _fenced(
    conn: Any, sql: Sql, worker: str, body: Callable[[], Awaitable[Applied]]
) -> Applied:
    import asyncpg  # here, so that the types above import without the postgres extra

    try:
        return await transaction(conn, body)
    except FencedOut:
        await _count_fenced(conn, sql, worker)
        raise
    except asyncpg.UniqueViolationError as exc:
        raise IllegalTransition(f"the record collides with an existing row: {exc}") from None


# -- shard lease ----------------------------------------------------------------


async def _lock_shard(conn: Any, sql: Sql, lease: ShardLease) -> tuple[str | None, int]:
    row = await conn.fetchrow(sql(_LOCK_SHARD), lease.pipeline, lease.shard)
    return (None, 0) if row is None else (row["owner"], row["epoch"])


def _shard_fence(lease: ShardLease, held: tuple[str | None, int]) -> None:
    check_fence(
        f"shard {lease.pipeline}/{lease.shard}", owner=held[0], epoch=held[1], stage=None,
        lease_owner=lease.owner, lease_epoch=lease.epoch, expected=None,
    )


def _settle(
    result: Plan | None, refusal: Exception | None, fence: Callable[[], None]
) -> Plan | None:
    """None for a no-op; else the plan, once the lease is checked and replay agreed."""
    if result is not None and result.noop:
        return None
    fence()
    if refusal is not None:
        raise refusal
    assert result is not None
    return result


async def seal_chunk(
    conn: Any,
    sql: Sql,
    lease: ShardLease,
    fields: Mapping[str, Any],
    *,
    spool: SpoolDigest,
    on_applied: OnApplied | None = None,
) -> Applied:
    """
    Record a new chunk read from the leased shard; the sealer owns it at epoch 1.

    The spool's blocks must already be uploaded (:func:`spool_blocks.upload`) and
    are verified in the same transaction, before the chunk row exists.

    Raises:
        FencedOut: the shard lease was lost (counted).
        IllegalTransition: replay would refuse the seal.
        SpoolCorrupt: the stored blocks are not the uploaded ones.
    """
    values = normalize("chunk_sealed", fields)
    if values["pipeline"] != lease.pipeline:
        raise IllegalTransition(
            f"chunk {values['chunk']} of pipeline {values['pipeline']} sealed under a lease "
            f"on {lease.pipeline}/{lease.shard}"
        )
    if values["parent"] is None and shard_column(values.get("shard")) != lease.shard:
        raise IllegalTransition(
            f"chunk {values['chunk']} read from shard {shard_column(values.get('shard'))} "
            f"sealed under a lease on {lease.pipeline}/{lease.shard}"
        )
    ids = [values["chunk"]] + ([values["parent"]] if values["parent"] else [])

    async def body() -> Applied:
        held = await _lock_shard(conn, sql, lease)
        rows, loaded = _split(await conn.fetch(sql(_LOCK_CHUNKS), ids))
        pipeline = await _lock_pipeline(conn, sql, lease.pipeline)
        decided = _decide("chunk_sealed", values, Loaded(loaded.chunks, loaded.retired, pipeline))
        result = _settle(*decided, lambda: _shard_fence(lease, held))
        if result is None:
            return Applied(True, chunk=next(c for c in loaded.chunks if c.chunk == values["chunk"]))
        parent = rows.get(values["parent"] or "")
        record = await _event(conn, sql, "chunk_sealed", values, pipeline=lease.pipeline,
                              chunk=values["chunk"], worker=lease.owner, fence="shard",
                              epoch=lease.epoch)
        (chunk,) = result.created
        await _insert_chunk(conn, sql, chunk, shard=lease.shard,
                            root=chunk.chunk if parent is None else parent["root"],
                            owner=lease.owner, sealed_event=record["seq"], spool=spool)
        await conn.execute(
            sql("""UPDATE {s}.shard SET
                     next_chunk_no = next_chunk_no + CASE WHEN $3::text IS NULL THEN 1 ELSE 0 END,
                     sealed_position = CASE WHEN $4::bigint > coalesce(sealed_seq, -1)
                                       THEN $5::jsonb ELSE sealed_position END,
                     sealed_seq = greatest(sealed_seq, $4::bigint)
                   WHERE pipeline = $1 AND shard = $2"""),
            lease.pipeline, lease.shard, chunk.parent, chunk.last_seq, to_json(chunk.position),
        )
        await _write_pipeline(conn, sql, result)
        if on_applied is not None:
            await on_applied(conn)
        return Applied(False, record, chunk, (ChunkLease(chunk.chunk, lease.owner, 1),))

    return await _fenced(conn, sql, lease.owner, body)


async def commit_source(
    conn: Any,
    sql: Sql,
    lease: ShardLease,
    fields: Mapping[str, Any],
    *,
    on_applied: OnApplied | None = None,
) -> Applied:
    """
    Record that the source was told to move past ``source_seq`` (a ``source_committed``).

    Committed chunks it covers move to source_committed, whoever owns them: they
    have no external action left.

    Raises:
        FencedOut: the shard lease was lost (counted).
        IllegalTransition: replay would refuse it (a commit going backwards).
    """
    values = normalize("source_committed", fields)
    if values["pipeline"] != lease.pipeline:
        raise IllegalTransition(
            f"source commit of {values['pipeline']} under a lease on {lease.pipeline}/{lease.shard}"
        )
    if shard_column(values.get("shard")) != lease.shard:
        raise IllegalTransition(
            f"source commit of shard {shard_column(values.get('shard'))} under a lease on "
            f"{lease.pipeline}/{lease.shard}"
        )

    async def body() -> Applied:
        held = await _lock_shard(conn, sql, lease)
        rows = await conn.fetch(
            sql("SELECT * FROM {s}.chunk WHERE pipeline = $1 AND shard = $3"
                " AND stage = 'committed' AND covers_seq <= $2 ORDER BY chunk FOR UPDATE"),
            lease.pipeline, values["source_seq"], lease.shard,
        )
        _, loaded = _split(rows)
        pipeline = await _lock_pipeline(conn, sql, lease.pipeline)
        decided = _decide("source_committed", values, Loaded(loaded.chunks, {}, pipeline))
        result = _settle(*decided, lambda: _shard_fence(lease, held))
        if result is None:
            return Applied(True)
        record = await _event(conn, sql, "source_committed", values, pipeline=lease.pipeline,
                              chunk=None, worker=lease.owner, fence="shard", epoch=lease.epoch)
        for chunk in result.changed:
            await conn.execute(sql(_UPDATE_ANY), chunk.chunk, *chunk_params(chunk))
        await conn.execute(
            sql("UPDATE {s}.shard SET committed_seq = $3, committed_position = $4"
                " WHERE pipeline = $1 AND shard = $2"),
            lease.pipeline, lease.shard, values["source_seq"], to_json(values["position"]),
        )
        await _write_pipeline(conn, sql, result)
        if on_applied is not None:
            await on_applied(conn)
        return Applied(False, record)

    return await _fenced(conn, sql, lease.owner, body)


async def retire_chunk(conn: Any, sql: Sql, lease: ShardLease, chunk: str) -> Applied:
    """
    Retire a results-committed chunk of the leased shard; its row stays, as 'retired'.

    The row (and its batch id) is kept so that no later create can adopt that
    batch; its spool blocks are deleted afterwards (:func:`spool_blocks.delete`),
    outside this transaction.

    Raises:
        FencedOut: the shard lease was lost (counted).
        IllegalTransition: unknown chunk, another shard's, or not yet committed.
    """

    async def body() -> Applied:
        held = await _lock_shard(conn, sql, lease)
        rows, loaded = _split(await conn.fetch(sql(_LOCK_CHUNKS), [chunk]))
        row = rows.get(chunk)
        if row is None:
            raise IllegalTransition(f"chunk_retired for unknown chunk {chunk}")
        if (row["pipeline"], row["shard"]) != (lease.pipeline, lease.shard):
            raise IllegalTransition(
                f"chunk {chunk} belongs to shard {row['pipeline']}/{row['shard']}, "
                f"not {lease.pipeline}/{lease.shard}"
            )
        pipeline = await _lock_pipeline(conn, sql, lease.pipeline)
        loaded = Loaded(loaded.chunks, loaded.retired, pipeline)
        decided = _decide("chunk_retired", {"chunk": chunk}, loaded)
        result = _settle(*decided, lambda: _shard_fence(lease, held))
        if result is None:
            return Applied(True)
        record = await _event(conn, sql, "chunk_retired", {"chunk": chunk},
                              pipeline=lease.pipeline, chunk=chunk, worker=lease.owner,
                              fence="shard", epoch=lease.epoch)
        await conn.execute(
            sql("UPDATE {s}.chunk SET stage = 'retired', retired_at = now(), owner = NULL"
                " WHERE chunk = $1"),
            chunk,
        )
        return Applied(False, record)

    return await _fenced(conn, sql, lease.owner, body)


# -- unfenced -------------------------------------------------------------------


async def record_pipeline_event(
    conn: Any, sql: Sql, kind: str, fields: Mapping[str, Any], *, worker: str | None = None
) -> Applied:
    """
    Record a pause, a resume or an alarm: pipeline-wide, so no lease is needed.

    Raises:
        IllegalTransition: another kind, or malformed fields.
    """
    if kind not in PIPELINE_KINDS:
        raise IllegalTransition(f"{kind} needs a chunk or shard lease")
    values = normalize(kind, fields)
    name = values.get("pipeline")

    async def body() -> Applied:
        pipeline = None
        if kind != "alarm" and name is not None:
            pipeline = await _lock_pipeline(conn, sql, name)
        result = plan(kind, values, Loaded(pipeline=pipeline))
        if result.noop:
            return Applied(True)
        record = await _event(conn, sql, kind, values, pipeline=name, chunk=values.get("chunk"),
                              worker=worker, fence="none", epoch=None)
        await _write_pipeline(conn, sql, result)
        return Applied(False, record)

    return await transaction(conn, body)
