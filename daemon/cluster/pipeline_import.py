"""
A single daemon's pipeline written into the cluster's tables, and its snapshot record.

``batchd cluster import`` (``daemon/commands/cluster_import.py``) reads a state dir
and hands each pipeline here as an :class:`ImportedPipeline`; :func:`write` puts it
into the tables in the caller's transaction, so that cluster workers carry on where
the daemon stopped:

* the ``pipeline`` row (its frontier, totals and pause) and the ``shard`` row of
  its one source shard: the next reader resumes after the sealed position, with the
  daemon's chunk numbering;
* every live chunk as a row at its stage, with its batch id, owned by nobody (any
  worker claims it: a submitted batch is collected, never sent again; a sealed
  chunk is sent once), its spool as checked blocks (``spool_epoch`` 0), its range;
* every retired chunk the daemon still knew, and every chunk its key ledger names,
  as a retired row (a tombstone): their batch ids stay known, and the shared key
  ledger reads "sealed" from the chunk table;
* the key ledger's sealed claims (a leftover of a chunk never sealed is dropped,
  as the daemon itself would replace it);
* a chunk left at ``intent`` by the daemon's last create as the workspace create
  slot's pending intent: no other create goes out until its owner has looked for
  the batch that create may have made;
* the daemon's spend on budget counters that exist already, and the queue
  reservations of the chunks at intent or submitted (their budget holds are not
  taken: their cost counts when they are committed);
* one ``pipeline_imported`` event holding the snapshot of all that, which
  :func:`merge` replays, so the event log still replays to the rows.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from batchd.daemon.cluster import limits, spool_blocks
from batchd.daemon.cluster.chunk_rows import (
    CHUNK_FIELDS,
    PIPELINE_FIELDS,
    chunk_params,
    pipeline_params,
)
from batchd.daemon.cluster.db import from_json, to_json
from batchd.daemon.cluster.errors import SpoolCorrupt
from batchd.daemon.cluster.leases import DEAD
from batchd.daemon.cluster.schema import Sql
from batchd.daemon.wal.chunk_ids import attempt_of, root_of
from batchd.daemon.wal.manifest_state import ChunkState, ManifestState, PipelineState, Stage
from batchd.plugins.errors import ConfigError

__all__ = ("KIND", "ImportRefused", "ImportedPipeline", "Written", "merge", "write")

KIND = "pipeline_imported"
SHARD = "0"
# Blocks of an imported spool: below every lease epoch (a claim makes the first 1).
SPOOL_EPOCH = 0
# Stages whose driver still needs the spool (to send it, or to map answers to rows).
_NEEDS_SPOOL = frozenset({Stage.SEALED, Stage.INTENT, Stage.SUBMITTED, Stage.ENDED})
_QUEUE_STAGES = frozenset({Stage.INTENT, Stage.SUBMITTED})


class ImportRefused(ConfigError):
    """The cluster or the state dir is not in a state an import may proceed from."""


@dataclass
class ImportedPipeline:
    """What a state dir holds of one pipeline, ready for :func:`write`."""

    state: PipelineState
    chunks: list[ChunkState]
    retired: dict[str, str | None]  # retired chunk -> its batch id (None: unknown or none)
    spools: dict[str, Path]  # live chunk -> its spool file (where one exists)
    sums: dict[str, tuple[str, int]]  # chunk -> (sha256, bytes) the daemon kept beside it
    origin: dict[str, Any]  # what identifies the state dir (a re-run recognises it)
    pending: str | None = None  # the chunk the daemon's last create may have made a batch for
    keys: Any = None  # () -> AsyncIterator of pages [(key, chunk, position identity)]
    ledger_chunks: set[str] = field(default_factory=set)  # chunks the ledger names

    @property
    def name(self) -> str:
        return self.state.name


@dataclass(frozen=True)
class Written:
    """What :func:`write` did for one pipeline."""

    pipeline: str
    already: bool  # imported by an earlier run from the same state dir: nothing written
    chunks: dict[str, int] = field(default_factory=dict)  # stage -> live chunks
    retired: int = 0
    keys: int = 0
    spools: int = 0
    spool_bytes: int = 0
    seq: int = 0


def _same_origin(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return all(a.get(k) == b.get(k) for k in ("state_dir", "ledger_id", "born_at"))


async def _already(conn: Any, sql: Sql, p: ImportedPipeline) -> bool:
    """True if an earlier run imported this pipeline from this state dir (workers may run
    it by now); refused when it was imported from another one."""
    name = p.name
    row = await conn.fetchrow(sql(
        "SELECT seq, record FROM {s}.event WHERE kind = $1 AND pipeline = $2"
        " ORDER BY seq DESC LIMIT 1"), KIND, name)
    if row is None:
        return False
    origin = from_json(row["record"]).get("origin", {})
    if _same_origin(origin, p.origin):
        return True
    raise ImportRefused(
        f"pipeline {name!r} was already imported into the cluster from state dir "
        f"{origin.get('state_dir')} (event {row['seq']}): it cannot be imported again "
        f"from {p.origin.get('state_dir')}")


async def _refuse_if_run(conn: Any, sql: Sql, name: str) -> None:
    """Refuse a pipeline the cluster has anything of (chunks, keys)."""
    chunks = await conn.fetchval(sql("SELECT count(*) FROM {s}.chunk WHERE pipeline = $1"),
                                 name)
    keys = await conn.fetchval(sql(
        "SELECT count(*) FROM (SELECT 1 FROM {s}.key_ledger WHERE pipeline = $1 LIMIT 1) k"),
        name)
    if chunks or keys:
        raise ImportRefused(
            f"the cluster already runs pipeline {name!r} ({chunks} chunks, "
            f"{'some' if keys else 'no'} keys in its ledger): an import only moves a pipeline "
            "the cluster has not run; drain one of the two instead")


async def _take_shard(conn: Any, sql: Sql, name: str, grace: float) -> int | None:
    """Lock the pipeline's shard row, refusing while a live worker reads it; its sealed seq."""
    await conn.execute(sql("INSERT INTO {s}.shard (pipeline, shard) VALUES ($1, $2)"
                           " ON CONFLICT DO NOTHING"), name, SHARD)
    row = await conn.fetchrow(sql(
        "SELECT owner, sealed_seq FROM {s}.shard WHERE pipeline = $1 AND shard = $2 FOR UPDATE"),
        name, SHARD)
    owner = row["owner"]
    if owner is not None:
        dead = await conn.fetchval(sql(f"SELECT $1 IN ({DEAD})"), owner, grace)
        if not dead:
            raise ImportRefused(
                f"worker {owner} is reading pipeline {name!r} in the cluster: stop the "
                "cluster's workers of this pipeline before importing it")
    sealed: int | None = row["sealed_seq"]
    return sealed


_INSERT_PIPELINE = (
    f"INSERT INTO {{s}}.pipeline ({', '.join(PIPELINE_FIELDS)}) VALUES "
    f"({', '.join(f'${i + 1}' for i in range(len(PIPELINE_FIELDS)))}) "
    "ON CONFLICT (name) DO UPDATE SET "
    + ", ".join(f"{name} = EXCLUDED.{name}" for name in PIPELINE_FIELDS if name != "name")
)
_EXTRA = ("shard", "root", "owner", "epoch", "sealed_event", "retired_at",
          "spool_epoch", "spool_sha256", "spool_blocks", "spool_bytes")
_N = len(CHUNK_FIELDS)
_INSERT_CHUNK = (
    f"INSERT INTO {{s}}.chunk ({', '.join(CHUNK_FIELDS + _EXTRA)}) VALUES "
    f"({', '.join(f'${i + 1}' for i in range(_N + len(_EXTRA)))})"
)
_INSERT_RANGE = ("INSERT INTO {s}.chunk_range (chunk, pipeline, shard, first_seq, last_seq,"
                 " position) VALUES ($1, $2, $3, $4, $5, $6)")
_INSERT_KEYS = """
INSERT INTO {s}.key_ledger (pipeline, key, shard, chunk, position)
SELECT $1, t.key, $2, t.chunk, t.position
FROM unnest($3::text[], $4::text[], $5::bytea[]) AS t(key, chunk, position)
"""
# The page's keys listed by chunk, as a claim lists them (retention finds them so).
_LIST_KEYS = """
INSERT INTO {s}.key_list (pipeline, chunk, n, keys)
SELECT $1, t.chunk, count(*), array_agg(t.key)
FROM unnest($2::text[], $3::text[]) AS t(key, chunk) GROUP BY t.chunk
"""


def snapshot(p: ImportedPipeline, tombstones: Mapping[str, str | None]) -> dict[str, Any]:
    """The event's record: what :func:`merge` adds to a replayed state."""
    return {
        "pipeline": p.name,
        "origin": dict(p.origin),
        "state": {
            "pipeline": asdict(p.state),
            "chunks": [asdict(c) for c in p.chunks],
            "retired": [[c, b] for c, b in tombstones.items()],
        },
    }


def merge(state: ManifestState, seq: int, record: Mapping[str, Any]) -> None:
    """Replay a ``pipeline_imported`` record into *state* (``event_log.replay``)."""
    snap = record["state"]
    name = record["pipeline"]
    for raw in snap["chunks"]:
        chunk = ChunkState(**{**raw, "stage": Stage(raw["stage"])})
        state.chunks[chunk.chunk] = chunk
        if chunk.batch_id is not None:
            state.live_batches[chunk.batch_id] = chunk.chunk
        state._await_source(chunk)  # the index from_snapshot also rebuilds
    state.pipelines[name] = PipelineState(**snap["pipeline"])
    for chunk_id, batch in snap["retired"]:
        state.retired_chunks[chunk_id] = name
        if batch is not None:
            state.retired_batches[batch] = chunk_id
    state.seq = max(state.seq, seq)


def _tombstones(p: ImportedPipeline) -> dict[str, str | None]:
    live = {c.chunk for c in p.chunks}
    out: dict[str, str | None] = {c: b for c, b in p.retired.items() if c not in live}
    for chunk in sorted(p.ledger_chunks - live):
        out.setdefault(chunk, None)
    return out


async def _upload(conn: Any, sql: Sql, p: ImportedPipeline, chunk: ChunkState,
                  ) -> spool_blocks.SpoolDigest | None:
    path = p.spools.get(chunk.chunk)
    if path is None:
        if chunk.stage in _NEEDS_SPOOL:
            raise ImportRefused(f"chunk {chunk.chunk} (stage {chunk.stage}) has no spool "
                                f"file: run batchd repair on the state dir first")
        return None
    digest = await spool_blocks.upload(conn, sql, chunk.chunk, SPOOL_EPOCH, path)
    kept = p.sums.get(chunk.chunk)
    if kept is not None and kept != (digest.sha256, digest.raw_bytes):
        raise SpoolCorrupt(f"spool of chunk {chunk.chunk} ({path}): {digest.raw_bytes} bytes, "
                           f"sha256 {digest.sha256[:12]}; kept {kept[1]} bytes, sha256 "
                           f"{kept[0][:12]}: not imported")
    await spool_blocks.verify_stored(conn, sql, chunk.chunk, digest)
    return digest


async def _pend(conn: Any, sql: Sql, workspace: str, chunk: str) -> None:
    """Make *chunk* the create slot's pending intent (a live holder is fenced)."""
    await conn.execute(sql("INSERT INTO {s}.create_slot (workspace) VALUES ($1)"
                           " ON CONFLICT DO NOTHING"), workspace)
    row = await conn.fetchrow(sql("SELECT pending_chunk FROM {s}.create_slot"
                                  " WHERE workspace = $1 FOR UPDATE"), workspace)
    other = row["pending_chunk"]
    if other is not None:
        stage = await conn.fetchval(sql("SELECT stage FROM {s}.chunk WHERE chunk = $1"), other)
        if stage == Stage.INTENT:
            raise ImportRefused(
                f"the create slot of workspace {workspace!r} waits on chunk {other}'s create: "
                "let the cluster settle it, then import again")
    # A new epoch: a holder between taking the slot and recording its intent is fenced,
    # so no create goes out before this chunk's owner has looked for its batch.
    await conn.execute(sql(
        "UPDATE {s}.create_slot SET holder = NULL, epoch = epoch + 1, pending_chunk = $2,"
        " pending_epoch = 0, pending_since = now() WHERE workspace = $1"), workspace, chunk)


async def write(
    conn: Any, sql: Sql, p: ImportedPipeline, *, grace: float, workspace: str,
    queue_scope: str | None = None, queue_cap: float | None = None,
) -> Written:
    """
    Write one pipeline into the tables; the caller's transaction makes it all or nothing.

    Raises:
        ImportRefused: the cluster already ran (or imported elsewhere) this pipeline, a
            live worker reads it, a live chunk lacks its spool, or the create slot waits
            on another chunk's create.
        SpoolCorrupt: a spool is not what the daemon kept beside it.
    """
    name = p.name
    if await _already(conn, sql, p):
        return Written(name, already=True)
    sealed = await _take_shard(conn, sql, name, grace)
    await _refuse_if_run(conn, sql, name)
    if sealed is not None:
        raise ImportRefused(f"the cluster already read pipeline {name!r} (sealed up to seq "
                            f"{sealed}): an import only moves a pipeline the cluster has not run")
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))",
                       f"batchd:{sql.schema}:pipeline:{name}")
    tombstones = _tombstones(p)
    seq = await conn.fetchval(sql(
        "INSERT INTO {s}.event (ts, kind, pipeline, chunk, worker, fence, epoch, record)"
        " VALUES (extract(epoch FROM clock_timestamp()), $1, $2, NULL, NULL, 'none', NULL, $3)"
        " RETURNING seq"), KIND, name, to_json(snapshot(p, tombstones)))
    stages: dict[str, int] = {}
    spools = spool_bytes = 0
    for chunk in p.chunks:
        digest = await _upload(conn, sql, p, chunk)
        if digest is not None:
            spools += 1
            spool_bytes += digest.raw_bytes
        await conn.execute(
            sql(_INSERT_CHUNK), *chunk_params(chunk), SHARD, root_of(name, chunk.chunk), None,
            0, seq, None, None if digest is None else SPOOL_EPOCH,
            None if digest is None else digest.sha256, None if digest is None else digest.blocks,
            None if digest is None else digest.raw_bytes)
        await conn.execute(sql(_INSERT_RANGE), chunk.chunk, name, SHARD, chunk.first_seq,
                           chunk.last_seq, to_json(chunk.position))
        stages[str(chunk.stage)] = stages.get(str(chunk.stage), 0) + 1
    for chunk_id, batch in tombstones.items():
        await conn.execute(
            sql("INSERT INTO {s}.chunk (chunk, pipeline, attempt, requests, bytes, rejects,"
                " stage, batch_id, shard, root, epoch, sealed_event, retired_at)"
                " VALUES ($1, $2, $3, 0, 0, 0, 'retired', $4, $5, $6, 0, $7, now())"),
            chunk_id, name, attempt_of(chunk_id), batch, SHARD, root_of(name, chunk_id), seq)
    await conn.execute(sql(_INSERT_PIPELINE), *pipeline_params(p.state))
    state = p.state
    await conn.execute(sql(
        "UPDATE {s}.shard SET owner = NULL, epoch = epoch + 1, next_chunk_no = $3,"
        " sealed_seq = $4, sealed_position = $5::jsonb, committed_seq = $6,"
        " committed_position = $7::jsonb WHERE pipeline = $1 AND shard = $2"),
        name, SHARD, state.next_chunk_no, state.last_sealed_seq,
        to_json(state.last_sealed_position), state.committed_seq,
        to_json(state.committed_position))
    keys = 0
    if p.keys is not None:
        async for page in p.keys():
            page_keys, page_chunks = [k for k, _, _ in page], [c for _, c, _ in page]
            await conn.execute(sql(_INSERT_KEYS), name, SHARD, page_keys, page_chunks,
                               [pos for _, _, pos in page])
            await conn.execute(sql(_LIST_KEYS), name, page_keys, page_chunks)
            keys += len(page)
    # Budget counters defined before the pipeline was here (a worker's open) started at
    # nothing: the daemon's spend counts on them now. Scopes in order (the lock order).
    for scope in sorted(["budget:org", f"budget:{name}"]) if state.cost_usd else ():
        await conn.execute(sql(
            "UPDATE {s}.limit_counter SET spent = spent + $2::numeric, updated_at = now()"
            " WHERE scope = $1"), scope, str(state.cost_usd))
    if queue_scope is not None:  # limit counters before the create slot (the lock order)
        await limits.define(conn, sql, queue_scope, queue_cap)
        for chunk in p.chunks:
            if chunk.stage in _QUEUE_STAGES and chunk.requests:
                # Past the cap (the cluster's own batches fill the queue) the chunk is
                # still imported: its batch exists; the counter lags until it ends.
                await limits.reserve(conn, sql, [queue_scope], chunk.requests, chunk.chunk)
    if p.pending is not None:
        await _pend(conn, sql, workspace, p.pending)
    return Written(name, already=False, chunks=stages, retired=len(tombstones), keys=keys,
                   spools=spools, spool_bytes=spool_bytes, seq=seq)


async def pages(rows: Iterable[Sequence[Any]], size: int = 5000,
                ) -> AsyncIterator[list[tuple[str, str, bytes]]]:
    """(key, chunk, position) rows in lists of *size* (memory: one page)."""
    page: list[tuple[str, str, bytes]] = []
    for key, chunk, position in rows:
        page.append((key, chunk, position))
        if len(page) >= size:
            yield page
            page = []
    if page:
        yield page
