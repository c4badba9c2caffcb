"""
A chunk whose spool file is gone: rebuilt from the source, or its rows dead-lettered.

The spool is the chunk's durable copy: the create body, and the custom_id → key map
that joins results back. Deleted by hand, lost with a disk, or missing because the
manifest was cut back to a time before the chunk retired, it must not turn into a
loop (a create that fails forever, a collect that retries ``FileNotFoundError``).

* A fresh chunk is re-read from the source: the records between the previous
  chunk's position and its own, shaped with the same config, classified against the
  key ledger as the packer did, so the custom_ids are the ones its batch holds.
* A retry chunk is cut again from its parent's results, as it was the first time.
* An operator's retry chunk re-reads its keys (the ledger says which).

When the source no longer yields the same rows (it changed, or cannot be re-read),
:func:`give_up` dead-letters the chunk's keys as ``spool_lost`` so that ``batchd
dead-letters retry`` can send them again when the operator decides to.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import anyio
import structlog

from batchd.daemon.batches.driver_deps import DriverDeps
from batchd.daemon.intake.custom_ids import CustomIdAllocator
from batchd.daemon.intake.ledger import position_identity
from batchd.daemon.intake.packer import _Pending, add_reject, request_line, shape_record
from batchd.daemon.intake.shaper import Shaper
from batchd.daemon.intake.spool import SpoolWriter
from batchd.daemon.wal.chunk_ids import root_of
from batchd.daemon.wal.manifest_state import ChunkState, ManifestState
from batchd.plugins.backoff import Backoff
from batchd.plugins.contract import Source
from batchd.plugins.errors import BatchdError, RetriableError
from batchd.plugins.records import Record

__all__ = ("give_up_spool", "rebuild_spool")

log = structlog.get_logger("batchd.spool")

_EMPTY_POLLS = 300  # polls returning nothing (a source still settling) before giving up


async def rebuild_spool(deps: DriverDeps, chunk: ChunkState) -> str | None:
    """Write ``chunk``'s spool file again; None when done, else why it cannot be."""
    try:
        if chunk.parent is not None:
            return await _cut_retry_again(deps, chunk)
        if deps.make_source is None or not deps.source.rereadable:
            return "the pipeline's source cannot be read a second time beside the running one"
        if chunk.first_seq is None:
            keys = {key for key, _ in deps.ledger.keys_of(deps.pipeline.name, chunk.chunk)}
            return await _reread(deps, chunk, None, 0, keys=keys)
        start, start_seq = _start_before(deps.manifest.state, chunk)
        return await _reread(deps, chunk, start, start_seq, keys=None)
    except BatchdError as exc:
        return str(exc)


def _start_before(state: ManifestState, chunk: ChunkState) -> tuple[dict[str, Any] | None, int]:
    """The last known position (and its read sequence) before the chunk's first record."""
    assert chunk.first_seq is not None
    best: tuple[int, dict[str, Any] | None] = (0, None)
    pipeline = state.pipelines.get(chunk.pipeline)
    if pipeline is not None and pipeline.committed_seq is not None:
        if pipeline.committed_seq < chunk.first_seq:
            best = (pipeline.committed_seq, pipeline.committed_position)
    for other in state.chunks.values():
        if other.pipeline != chunk.pipeline or other.parent is not None or other.last_seq is None:
            continue
        if best[0] < other.last_seq < chunk.first_seq:
            best = (other.last_seq, other.position)
    return best[1], best[0]


async def _poll(source: Source) -> list[Record] | None:
    backoff = Backoff(0.2, 25.6)
    for _ in range(8):
        try:
            return await source.poll()
        except RetriableError:
            await anyio.sleep(backoff.next_delay())
    return await source.poll()


async def _reread(
    deps: DriverDeps,
    chunk: ChunkState,
    start: dict[str, Any] | None,
    start_seq: int,
    *,
    keys: set[str] | None,
) -> str | None:
    """Read the chunk's records again (a seq range, or a key set) into a new spool."""
    assert deps.make_source is not None
    records: list[tuple[Record, int | None]] = []
    source = deps.make_source()
    try:
        await source.start(start)
        seq, empty = start_seq, 0
        last = chunk.last_seq
        while (last is None or seq < last) and (keys is None or len(records) < len(keys)):
            batch = await _poll(source)
            if batch is None:
                break
            if not batch:
                empty += 1
                if empty > _EMPTY_POLLS:
                    break
                await anyio.sleep(0.1)
                continue
            for record in batch:
                seq += 1
                if keys is not None:
                    if record.key in keys and record.error is None:
                        records.append((record, None))
                elif chunk.first_seq is not None and last is not None:
                    if chunk.first_seq <= seq <= last:
                        records.append((record, seq))
                    if seq >= last:
                        break
    finally:
        await source.aclose()
    expected = chunk.requests + chunk.rejects
    if keys is None and len(records) != expected:
        return (f"the source now yields {len(records)} records where the chunk read "
                f"{expected}")
    return _write(deps, chunk, records)


def _write(
    deps: DriverDeps, chunk: ChunkState, records: Sequence[tuple[Record, int | None]]
) -> str | None:
    """Shape and classify the records as the packer did, and seal them as the chunk's spool."""
    pipeline = deps.pipeline
    shaper = Shaper(pipeline, deps.model_check)
    max_bytes = pipeline.batching.max_bytes
    shaped: list[_Pending] = [
        shape_record(shaper, max_bytes, record, seq or 0) for record, seq in records
    ]
    owners = deps.ledger.owners(
        pipeline.name, [p.record.key for p in shaped if p.request is not None]
    )
    writer = SpoolWriter(deps.spool_path(chunk.chunk))
    ids = CustomIdAllocator()
    seen: set[str] = set()
    try:
        for item, (_, seq) in zip(shaped, records, strict=True):
            record, key = item.record, item.record.key
            if item.request is not None:
                owner = owners.get(key)
                if owner is not None and owner[1] != chunk.chunk:
                    if owner[2] == position_identity(record.position):
                        continue  # a replay of a record another chunk holds: never spooled
                    item.request, item.error_type = None, "duplicate_key"
                    item.error = f"duplicate key {key!r} (already read into chunk {owner[1]})"
                elif key in seen:
                    item.request, item.error_type = None, "duplicate_key"
                    item.error = f"duplicate key {key!r} (already read into chunk {chunk.chunk})"
            if item.request is None:
                add_reject(writer, {"key": key, "position": record.position, "seq": seq,
                                    "error_type": item.error_type, "error": item.error})
                continue
            seen.add(key)
            custom_id = ids.allocate(key, shaper.preferred_custom_id(record))
            writer.add_request(request_line(custom_id, item.request), {
                "key": key, "position": record.position, "seq": seq,
                "custom_id": custom_id, "attempt": chunk.attempt,
            })
        if (writer.requests, writer.rejects) != (chunk.requests, chunk.rejects):
            found = (writer.requests, writer.rejects)
            writer.discard()
            return (f"the rows read again make {found[0]} requests and {found[1]} rejects; "
                    f"the chunk had {chunk.requests} and {chunk.rejects}")
        claimed = {key for key, _ in deps.ledger.keys_of(pipeline.name, chunk.chunk)}
        if claimed and claimed != seen:
            writer.discard()
            return (f"the rows read again hold other keys than the chunk claimed "
                    f"({len(seen - claimed)} new, {len(claimed - seen)} missing)")
        writer.seal()
    except BaseException:
        writer.discard()
        raise
    return None


async def _cut_retry_again(deps: DriverDeps, chunk: ChunkState) -> str | None:
    """A retry chunk's spool is cut from its parent's results: collect the parent again."""

    state = deps.manifest.state
    parent = state.chunks.get(chunk.parent or "")
    if parent is None or parent.batch_id is None:
        return f"its parent chunk {chunk.parent} is no longer known"
    parent_spool = deps.spool_path(parent.chunk)
    if not parent_spool.exists():
        reason = await rebuild_spool(deps, parent)
        if reason is not None:
            return f"its parent's spool is lost too ({reason})"
    batch_id = parent.batch_id
    collector = deps.collector()
    summary = await collector.collect(
        chunk=parent.chunk, root=root_of(deps.pipeline.name, parent.chunk),
        batch_id=batch_id, spool=parent_spool, attempt=parent.attempt,
        blocks=lambda: deps.api.result_blocks(batch_id),
    )
    cut = summary.retry_chunk
    if cut is None or cut.chunk != chunk.chunk or cut.requests != chunk.requests:
        return "its parent's results no longer give the same retries"
    return None


async def give_up_spool(deps: DriverDeps, chunk: ChunkState, reason: str) -> bool:
    """
    Replace a lost spool by dead letters (``spool_lost``) for the keys the ledger says the
    chunk held; False if even those are unknown (a retry chunk, whose keys only its spool
    knew), for the caller to hold the chunk and report it.
    """
    if chunk.parent is not None:
        return False
    keys = list(deps.ledger.keys_of(deps.pipeline.name, chunk.chunk))
    if not keys and chunk.requests:
        return False  # not even the keys are known: nothing to dead-letter under
    message = (f"the spool of chunk {chunk.chunk} is lost and its rows could not be read "
               f"again ({reason}); `batchd dead-letters retry` sends them again")
    writer = SpoolWriter(deps.spool_path(chunk.chunk))
    try:
        for key, _ in keys:
            writer.add_reject({"key": key, "position": None, "seq": None,
                               "error_type": "spool_lost", "error": message})
        writer.seal()
    except BaseException:
        writer.discard()
        raise
    log.error("spool lost; rows dead-lettered", pipeline=deps.pipeline.name,
              chunk=chunk.chunk, rows=len(keys), reason=reason)
    return True
