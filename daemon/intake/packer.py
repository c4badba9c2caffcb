"""
Reads a source, shapes records into requests and seals them into chunks.

A chunk closes at the first of ``max_requests``, ``max_bytes``, ``linger``
or a drained source. Sealing is the durable hand-off: the spool file is
fsynced and renamed, *then* ``chunk_sealed`` is appended — only after that
may the source position move past these records. Backpressure reaches the
source: no new chunk is started while ``max_in_flight`` chunks are active
or the pipeline is paused.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import anyio
import orjson
import structlog

from batchd.daemon.config import MAX_BATCH_BYTES, PipelineConfig
from batchd.daemon.intake.custom_ids import CustomIdAllocator, hashed_custom_id, is_valid_custom_id
from batchd.daemon.intake.ledger import Claim, KeyLedger
from batchd.daemon.intake.shaper import ModelCheck, ShapeError, Shaper
from batchd.daemon.intake.spool import BODY_CLOSE, BODY_OPEN, SpoolWriter
from batchd.daemon.wal.chunk_ids import fresh_id
from batchd.plugins.backoff import Backoff
from batchd.plugins.contract import Source
from batchd.plugins.errors import RetriableError
from batchd.plugins.records import Record

__all__ = (
    "ChunkBuilder", "Packer", "add_reject", "request_line", "shape_record",
)

log = structlog.get_logger("batchd.packer")
# One shrink per this many seconds of 429s; grow back after this long without one.
_SHRINK_EPISODE = 30.0
_REGROW_AFTER = 300.0
# Keys checked against the ledger at once: by the single daemon's SQLite ledger, and by
# the cluster's shared one; and, for both, the pending requests' bytes that claim sooner.
CLAIM_EVERY = 1000
CLAIM_EVERY_SHARED = 2000
CLAIM_BYTES = 16 << 20


@dataclass(slots=True)
class _Pending:
    record: Record
    seq: int
    request: bytes | None  # None: reject
    error_type: str | None = None
    error: str | None = None


# Cluster mode's key claim: (chunk id, [(key, position)]) -> Claim, in the shared ledger.
ClaimKeys = Callable[[str, Sequence[tuple[str, dict[str, Any] | None]]], Awaitable[Claim]]


def shape_record(shaper: Shaper, max_bytes: int, record: Record, seq: int) -> _Pending:
    """A record as a request body, or as a reject saying why it cannot be one."""
    if record.error is not None:
        return _Pending(record, seq, None, "bad_record", record.error)
    try:
        params = shaper.params(record)
        body = orjson.dumps(params)
    except ShapeError as exc:
        return _Pending(record, seq, None, exc.error_type, str(exc))
    except Exception as exc:  # any record-level failure is that record's
        # A field too deep to serialise, a value orjson refuses, a hook that raised:
        # that record is a dead letter, never the daemon's exit (and a restart loop).
        return _Pending(record, seq, None, "shape_error",
                        f"cannot build the request: {type(exc).__name__}: {exc}")
    limit = max_bytes - len(BODY_OPEN) - len(BODY_CLOSE) - 100
    if len(body) > limit:
        return _Pending(
            record, seq, None, "request_too_large",
            f"request is {len(body) / 1e6:.1f} MB; a batch holds at most "
            f"{max_bytes / 1e6:.0f} MB (max_bytes)",
        )
    return _Pending(record, seq, body)


def request_line(custom_id: str, body: bytes) -> bytes:
    """The spool's request half: ``{"custom_id":…,"params":…}``."""
    return b'{"custom_id":"' + custom_id.encode() + b'","params":' + body + b"}"


def add_reject(writer: SpoolWriter, meta: dict[str, Any]) -> None:
    """Spool a reject; a key or position JSON cannot hold (a lone surrogate) is written
    escaped rather than failing the chunk."""
    try:
        writer.add_reject(meta)
    except (TypeError, orjson.JSONEncodeError):
        safe = {name: ascii(value) if isinstance(value, str) else value
                for name, value in meta.items() if name != "position"}
        writer.add_reject({**safe, "position": None})


class BatchOwners(Protocol):
    """Batches on the API that the state does not know (``batches.reconcile.Reconciler``)."""

    def active(self) -> bool:
        """Whether any such batch still waits for its chunk."""

    async def owners(self, custom_ids: list[str]) -> dict[str, tuple[str, int]]:
        """custom_id → (batch id, its request count) for those such batches hold."""


class ChunkBuilder:
    """One chunk under construction; writes straight to its ``.tmp`` spool file."""

    def __init__(self, pipeline: str, number: int, spool_dir: Path, max_bytes: int) -> None:
        self.pipeline = pipeline
        self.number = number
        self.id = fresh_id(pipeline, number)
        self.writer = SpoolWriter(spool_dir / f"{self.id}.jsonl")
        self.max_bytes = max_bytes
        self.ids = CustomIdAllocator()
        self.keys: set[str] = set()
        self.pending: list[_Pending] = []
        self.pending_bytes = 0
        self.pending_requests = 0
        self.first_seq: int | None = None
        self.last_seq: int | None = None
        self.position: dict[str, Any] | None = None
        self.started = time.monotonic()
        # A chunk rebuilt to the boundaries of a batch the API already has (see
        # Packer.follow): that batch's id and how many requests it holds.
        self.follows: str | None = None
        self.target = 0

    @property
    def requests(self) -> int:
        return self.writer.requests + self.pending_requests

    @property
    def body_bytes(self) -> int:
        return self.writer.body_bytes + self.pending_bytes + self.pending_requests

    def fits(self, size: int) -> bool:
        return self.requests == 0 or self.body_bytes + size + 1 <= self.max_bytes


class Packer:
    """The intake loop of one pipeline."""

    def __init__(
        self,
        pipeline: PipelineConfig,
        source: Source,
        ledger: KeyLedger,
        spool_dir: Path,
        seal: Callable[[ChunkBuilder], Awaitable[None]],
        room: Callable[[], Awaitable[None]],
        resume: tuple[dict[str, Any] | None, int, int],
        between_chunks: Callable[[], Awaitable[None]] | None = None,
        model_check: ModelCheck | None = None,
        owners: BatchOwners | None = None,
        claim_keys: ClaimKeys | None = None,
        number: Callable[[], Awaitable[int]] | None = None,
    ) -> None:
        self.pipeline = pipeline
        # Cluster readers of a source split in shards take each chunk's number from the
        # store (readers of other shards number theirs too); else ``next_chunk`` counts.
        self._number = number
        # Cluster mode claims keys in the shared ledger (under the shard lease); one
        # daemon claims them in its own ledger, synchronously, as it always has.
        self._claim_keys = claim_keys
        # A shared claim is a round trip to PostgreSQL, with its own CPU on both sides
        # whatever its size (docs/benchmarks.md §10): fewer, larger claims there.
        self._claim_every = CLAIM_EVERY if claim_keys is None else CLAIM_EVERY_SHARED
        self.source = source
        self.ledger = ledger
        self.spool_dir = spool_dir
        self.shaper = Shaper(pipeline, model_check)
        self._seal = seal
        self._room = room
        self._between_chunks = between_chunks
        # custom_ids → (batch id, its request count) for batches on the API that the state
        # does not know (a restored backup): records they hold are packed to their
        # boundaries, whatever max_requests says now, so the chunk adopts the batch.
        self._owners = owners
        self.resume_position, self.seq, self.next_chunk = resume
        self.max_requests = pipeline.batching.max_requests
        self._shrunk_at = -_REGROW_AFTER
        self.max_bytes = min(pipeline.batching.max_bytes, MAX_BATCH_BYTES)
        self.builder: ChunkBuilder | None = None
        self.drained = anyio.Event()
        self.read = 0
        self.started = False

    def shrink(self) -> None:
        """
        A create was refused with 429 (the processing queue is full, or a rate
        limit): make the next chunks half the size — once per episode, not once
        per refusal — so smaller batches fit while in-flight ones drain.
        """
        now = time.monotonic()
        if now - self._shrunk_at < _SHRINK_EPISODE:
            return
        self._shrunk_at = now
        self.max_requests = max(1, self.max_requests // 2)
        log.warning("chunks made smaller after a 429 at create", pipeline=self.pipeline.name,
                    max_requests=self.max_requests)

    def _regrow(self) -> None:
        """After a quiet period without 429s, chunks grow back towards the configured size."""
        configured = self.pipeline.batching.max_requests
        if self.max_requests < configured and time.monotonic() - self._shrunk_at > _REGROW_AFTER:
            self.max_requests = min(configured, self.max_requests * 2)
            self._shrunk_at = time.monotonic() - _REGROW_AFTER + _SHRINK_EPISODE

    async def start(self) -> None:
        """Open the source just after the last sealed record; retried while it is unreachable."""
        if not self.started:
            await self._retrying(lambda: self.source.start(self.resume_position), "start")
            self.started = True

    async def run(self, until_drained: bool, idle: float = 1.0) -> None:
        await self.start()
        while True:
            if self.builder is None:
                await self._room()
                if self._between_chunks is not None:
                    await self._between_chunks()
            records = await self._retrying(self.source.poll, "poll")
            if records is None:
                if self.builder is not None:
                    await self.seal_current()
                self.drained.set()
                if until_drained:
                    return
                await anyio.sleep(idle)
                continue
            if not records:
                if self.builder is not None and self._lingered():
                    await self.seal_current()
                await anyio.sleep(min(0.2, idle))
                continue
            self.drained = anyio.Event() if self.drained.is_set() else self.drained
            follows = await self._follows(records)
            for record, batch in zip(records, follows, strict=True):
                await self.add(record, follow=batch)
            if self.builder is not None:
                if self._claim_keys is None:  # a shared claim waits for CLAIM_EVERY_SHARED
                    await self._claim(self.builder)
                if self._lingered():
                    await self.seal_current()

    async def _follows(self, records: list[Record]) -> list[tuple[str, int] | None]:
        """For each record, the unknown batch already holding its custom_id, if any."""
        if self._owners is None or not self._owners.active():
            return [None] * len(records)
        natural = [self._natural_custom_id(r) for r in records]
        owners = await self._owners.owners([cid for cid in natural if cid is not None])
        return [owners.get(cid) if cid is not None else None for cid in natural]

    def _natural_custom_id(self, record: Record) -> str | None:
        """The custom_id a record gets as the first of its key in a chunk (as allocated)."""
        if record.error is not None:
            return None
        try:
            preferred = self.shaper.preferred_custom_id(record)
        except Exception:  # the template failed on this record: it becomes a reject
            return None
        candidate = preferred if preferred is not None else record.key
        return candidate if is_valid_custom_id(candidate) else hashed_custom_id(record.key)

    async def _retrying(self, call: Callable[[], Awaitable[Any]], what: str) -> Any:
        backoff = Backoff(0.5, 30.0)
        while True:
            try:
                return await call()
            except RetriableError as exc:
                delay = backoff.next_delay()
                log.warning("source unavailable; retrying", pipeline=self.pipeline.name,
                            action=what, error=str(exc), retry_in=round(delay, 1))
                await anyio.sleep(delay)

    def _lingered(self) -> bool:
        assert self.builder is not None
        if self.builder.follows is not None:
            return False  # its boundary is the batch's, not the clock's
        return time.monotonic() - self.builder.started >= self.pipeline.batching.linger

    def _shape(self, record: Record, seq: int) -> _Pending:
        return shape_record(self.shaper, self.max_bytes, record, seq)

    async def replay(self, source: Source, keys: set[str]) -> int:
        """
        Re-read ``keys`` from a fresh ``source`` and seal them as new chunks.

        This is an operator's retry of dead letters: the records are shaped
        with the current config and go the normal way. Their chunks carry no
        read sequence, so they never move the source's commit position.
        """
        assert self.builder is None
        self.ledger.release(self.pipeline.name, sorted(keys))
        found = 0
        await self._retrying(lambda: source.start(None), "start")
        while keys and (records := await self._retrying(source.poll, "poll")) is not None:
            for record in records:
                if record.key in keys and record.error is None:
                    keys.discard(record.key)
                    await self.add(record, replay=True)
                    found += 1
        await self.seal_current()
        return found

    async def add(
        self, record: Record, *, replay: bool = False, follow: tuple[str, int] | None = None
    ) -> None:
        if not replay:
            self.seq += 1
        self.read += 1
        pending = self._shape(record, self.seq)
        size = len(pending.request) + 100 if pending.request is not None else 0
        follows = follow[0] if follow is not None else None
        if self.builder is not None and (
            self.builder.follows != follows
            if self.builder.follows is not None or follows is not None
            else not self.builder.fits(size) or self.builder.requests >= self.max_requests
        ):
            await self.seal_current()
            await self._room()
        if self.builder is None:
            self._regrow()
            number = self.next_chunk if self._number is None else await self._number()
            self.builder = ChunkBuilder(self.pipeline.name, number, self.spool_dir, self.max_bytes)
            if follow is not None:
                self.builder.follows, self.builder.target = follow
        builder = self.builder
        if not replay:
            if builder.first_seq is None:
                builder.first_seq = pending.seq
            builder.last_seq = pending.seq
            builder.position = record.position
        builder.pending.append(pending)
        if pending.request is not None:
            builder.pending_requests += 1
            builder.pending_bytes += len(pending.request) + 100
        if len(builder.pending) >= self._claim_every or builder.pending_bytes >= CLAIM_BYTES:
            await self._claim(builder)
        if builder.follows is not None and builder.requests >= builder.target:
            await self.seal_current()  # the batch's last record: the chunk ends here too
            await self._room()

    async def _claim(self, builder: ChunkBuilder) -> None:
        """Check pending keys against the ledger, then write them to the spool."""
        pending, builder.pending = builder.pending, []
        builder.pending_bytes = builder.pending_requests = 0
        entries = [(p.record.key, p.record.position) for p in pending if p.request is not None]
        if self._claim_keys is not None:
            claim = await self._claim_keys(builder.id, entries)
        else:
            claim = self.ledger.claim(self.pipeline.name, builder.number, builder.id, entries)
        keys, replays, duplicates = builder.keys, claim.replays, claim.duplicates
        preferred = self.shaper.preferred_custom_id
        for item in pending:
            key = item.record.key
            if item.request is not None:
                if key in replays:
                    continue
                if key in keys or key in duplicates:
                    owner = duplicates.get(key, builder.id)
                    item.request, item.error_type = None, "duplicate_key"
                    item.error = f"duplicate key {key!r} (already read into chunk {owner})"
            custom_id = ""
            if item.request is not None:
                try:
                    custom_id = builder.ids.allocate(key, preferred(item.record))
                except Exception as exc:  # the custom_id template failed on this record
                    item.request, item.error_type = None, "shape_error"
                    item.error = f"cannot build the custom_id: {type(exc).__name__}: {exc}"
            if item.request is None:
                add_reject(builder.writer, {
                    "key": key, "position": item.record.position, "seq": item.seq,
                    "error_type": item.error_type, "error": item.error,
                })
                continue
            request = request_line(custom_id, item.request)
            try:
                builder.writer.add_request(request, {
                    "key": key, "position": item.record.position, "seq": item.seq,
                    "custom_id": custom_id, "attempt": 1,
                })
            except (TypeError, orjson.JSONEncodeError) as exc:  # a key JSON cannot hold
                add_reject(builder.writer, {
                    "key": key, "position": item.record.position, "seq": item.seq,
                    "error_type": "bad_record", "error": f"cannot store the record: {exc}",
                })
                continue
            keys.add(key)

    async def seal_current(self) -> None:
        builder = self.builder
        if builder is None:
            return
        await self._claim(builder)
        self.builder = None
        if builder.writer.requests == 0 and builder.writer.rejects == 0:
            builder.writer.discard()  # every record was a replay of a sealed chunk
            return
        await self._seal(builder)
        self.next_chunk += 1
