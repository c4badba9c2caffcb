"""
LocalStore: the state store contract on today's files in one state dir.

It wraps what a single daemon has always kept, unchanged on disk: the manifest
(``manifest.jsonl``, :class:`Manifest`), the key ledger (``keys.sqlite``, bound to
the manifest as at every start) and the spool dir (``spool/<chunk>.jsonl``). An
existing state dir, from any release, opens as it is.

The state dir's flock is the fence: one process holds it, so every lease is at
epoch 0, a claim hands out the live chunks nobody in this process holds yet, a
heartbeat reports nothing lost and the deadline never passes. What a lease
cannot fence inside one process, ``expected`` still does: a record for a chunk
that moved past the caller's expected stage is a fenced no-op, as on PgStore.

Two additions, both additive:

* ``spool/<chunk>.jsonl.sha256`` beside a spool kept through :meth:`put_spool`,
  which :meth:`fetch_spool` checks. A spool written before this file existed
  has none and is taken as it is (there is nothing to check it against).
* Limits are the budget check, not counters: a :class:`LocalLimit` says what a
  live chunk holds while at which stages, so "in flight" is read from the
  manifest and is exact across restarts, as ``Budget.refusal`` and
  ``QueueLimit`` read it today. A reservation therefore takes effect when the
  record that puts the chunk at such a stage (its seal, its intent) is
  appended; the single daemon's packer and create lock serialise those.
"""

from __future__ import annotations

import copy
import hashlib
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import anyio

from batchd.daemon.cluster.errors import IllegalTransition
from batchd.daemon.cluster.transitions import (
    CHUNK_KINDS,
    PIPELINE_KINDS,
    SHARD_KINDS,
    Loaded,
    Plan,
    plan,
)
from batchd.daemon.cluster.workers import Heartbeat
from batchd.daemon.intake.ledger import Claim, KeyLedger
from batchd.daemon.intake.ledger_binding import open_bound_ledger
from batchd.daemon.store.contract import (
    Applied,
    ChunkLease,
    Claimed,
    CreateSlot,
    Expected,
    Lease,
    LimitUndefined,
    PendingIntent,
    ShardLease,
    SpoolCorrupt,
    SpoolDigest,
    StateStore,
    check_lease,
    illegal,
    stages,
)
from batchd.daemon.wal.chunk_ids import number_of
from batchd.daemon.wal.manifest import DEFAULT_COMPACT_BYTES, Manifest
from batchd.daemon.wal.manifest_state import ChunkState, ManifestState, PipelineState, Stage
from batchd.daemon.wal.records import ChunkRetired, Record, SubmitIntent, Submitted
from batchd.plugins.fsync import fsync_dir

__all__ = ("LocalLimit", "LocalStore")

_SPOOL_READ = 1 << 20
# Kinds whose effect replay can decide from the rows they touch (an alarm always adds one).
_PLANNED = (CHUNK_KINDS | SHARD_KINDS | PIPELINE_KINDS) - {"alarm"}
_UNSETTLED = (Stage.SEALED, Stage.INTENT, Stage.SUBMITTED, Stage.ENDED)


@dataclass(frozen=True)
class LocalLimit:
    """
    A limit read from the manifest: ``spent`` plus what live chunks hold, under ``cap``.

    Args:
        cap: the most that may be in use; None counts without capping.
        stages: a chunk holds its share while at one of these.
        share: what one chunk holds (its cost's upper bound, its requests).
        pipelines: whose chunks count; None for every pipeline.
        spent: what is used for good (a pipeline's recorded cost).
    """

    cap: float | None
    stages: tuple[Stage, ...]
    share: Callable[[ChunkState], float]
    pipelines: frozenset[str] | None = None
    spent: Callable[[ManifestState], float] = field(default=lambda state: 0.0)

    @classmethod
    def budget(cls, pipeline: str, cap: float | None,
               upper_bound: Callable[[int, int], float]) -> LocalLimit:
        """``budget:<pipeline>``, by ``Budget.refusal``'s rule (*upper_bound* as it has it)."""

        def spent(state: ManifestState) -> float:
            known = state.pipelines.get(pipeline)
            return 0.0 if known is None else known.cost_usd

        return cls(cap, _UNSETTLED, lambda c: upper_bound(c.requests, c.bytes),
                   frozenset({pipeline}), spent)

    @classmethod
    def queue(cls, cap: int | None) -> LocalLimit:
        """``queue:<workspace>``: requests announced for create or submitted, not yet ended."""
        return cls(cap, (Stage.INTENT, Stage.SUBMITTED), lambda c: float(c.requests))

    def used(self, state: ManifestState, *, besides: str) -> float:
        """In use now, not counting *besides* (a holder reserving again counts once)."""
        held = sum(
            self.share(c) for c in state.chunks.values()
            if c.stage in self.stages and c.chunk != besides
            and (self.pipelines is None or c.pipeline in self.pipelines)
        )
        return self.spent(state) + held


class _Unbounded:
    """The deadline of a store fenced by a flock: it never passes."""

    def valid(self) -> bool:
        return True

    def remaining(self) -> float:
        return float("inf")

    def check(self, action: str) -> None:
        return None


def _loaded(state: ManifestState, kind: str, fields: Mapping[str, Any]) -> Loaded:
    """The rows a record touches, as PgStore would lock them, from the replayed state."""
    ids = [fields.get("chunk"), fields.get("parent")]
    retry = fields.get("retry_chunk")
    if isinstance(retry, dict):
        ids.append(retry.get("chunk"))
    chunks = tuple(state.chunks[c] for c in ids if isinstance(c, str) and c in state.chunks)
    retired = {c: state.retired_chunks[c] for c in ids
               if isinstance(c, str) and c in state.retired_chunks}
    name = fields.get("pipeline")
    if not isinstance(name, str):
        name = chunks[0].pipeline if chunks else None
    return Loaded(chunks, retired, None if name is None else state.pipelines.get(name))


def _digest(path: Path, epoch: int) -> SpoolDigest:
    content = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while block := f.read(_SPOOL_READ):
            content.update(block)
            size += len(block)
    return SpoolDigest(epoch, 0, size, content.hexdigest(), "")


class LocalStore:
    """
    The contract on one state dir (see the module docstring).

    ``manifest`` and ``ledger`` stay reachable for what the contract does not
    cover yet (compaction, ``batchd repair``, status).
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        worker: str = "local",
        limits: Mapping[str, LocalLimit] | None = None,
        compact_bytes: int = DEFAULT_COMPACT_BYTES,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.spool_dir = self.state_dir / "spool"
        self.worker_id = worker
        self._limits = dict(limits or {})
        self._compact_bytes = compact_bytes
        self._manifest: Manifest | None = None
        self._ledger: KeyLedger | None = None
        self._held: dict[str, None] = {}  # chunks handed out, in claim order
        self._shards: set[tuple[str, str]] = set()
        self._slots: dict[str, int] = {}  # workspace -> epoch of the slot held
        self._slot_epochs = 0
        self._deadline = _Unbounded()
        self._borrowed = False  # manifest and ledger opened (and closed) by someone else

    @classmethod
    def over(
        cls,
        manifest: Manifest,
        ledger: KeyLedger,
        *,
        worker: str = "local",
        limits: Mapping[str, LocalLimit] | None = None,
    ) -> LocalStore:
        """
        The store on a manifest and ledger already open: the runtime's own.

        ``batchd run`` opens them itself (they outlive a reload), so its records go
        through the store while its reads of ``manifest.state`` see the very same
        state. :meth:`open` and :meth:`aclose` leave them alone.
        """
        store = cls(manifest.state_dir, worker=worker, limits=limits)
        store._manifest, store._ledger, store._borrowed = manifest, ledger, True
        return store

    # -- lifecycle -------------------------------------------------------------

    @property
    def deadline(self) -> _Unbounded:
        return self._deadline

    @property
    def manifest(self) -> Manifest:
        if self._manifest is None:
            raise RuntimeError(f"store of {self.state_dir} is not open")
        return self._manifest

    @property
    def ledger(self) -> KeyLedger:
        if self._ledger is None:
            raise RuntimeError(f"store of {self.state_dir} is not open")
        return self._ledger

    async def open(self) -> None:
        """Lock the state dir, replay the manifest, open the ledger bound to it."""
        if self._borrowed:
            return
        manifest = await Manifest.open(self.state_dir, compact_bytes=self._compact_bytes)
        try:
            self._ledger = await open_bound_ledger(self.state_dir, manifest)
            self.spool_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except BaseException:
            if self._ledger is not None:
                self._ledger.close()
                self._ledger = None
            await manifest.aclose()
            raise
        self._manifest = manifest

    async def aclose(self) -> None:
        if self._borrowed:
            return
        if self._ledger is not None:
            self._ledger.close()
            self._ledger = None
        if self._manifest is not None:
            await self._manifest.aclose()
            self._manifest = None

    async def __aenter__(self) -> LocalStore:
        await self.open()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()

    # -- records -----------------------------------------------------------------

    async def append(
        self,
        record: Record,
        /,
        *,
        lease: Lease | None = None,
        expected: Expected | None = None,
        spool: SpoolDigest | None = None,
    ) -> Applied:
        kind, fields = record.KIND, record.to_fields()
        check_lease(kind, fields, lease)
        state = self.manifest.state
        chunk_id = fields.get("chunk") if isinstance(fields.get("chunk"), str) else None
        if kind in _PLANNED:
            decided: Plan | None = None
            refusal: IllegalTransition | None = None
            try:
                decided = plan(kind, fields, _loaded(state, kind, fields))
            except IllegalTransition as exc:
                refusal = exc
            current = None if chunk_id is None else state.chunks.get(chunk_id)
            if decided is not None and decided.noop:
                return Applied(True, chunk=copy.deepcopy(current))
            wanted = stages(expected)
            if (wanted is not None and kind in CHUNK_KINDS and current is not None
                    and current.stage not in wanted):
                return Applied(True, chunk=copy.deepcopy(current), fenced=(
                    f"chunk {chunk_id}: at stage {current.stage}, expected "
                    f"{' or '.join(sorted(str(s) for s in wanted))}"))
            if refusal is not None:
                raise illegal(kind, str(refusal))
        stored = await self.manifest.append(record)
        return self._applied(kind, fields, stored, chunk_id)

    def _applied(self, kind: str, fields: Mapping[str, Any], stored: dict[str, Any],
                 chunk_id: str | None) -> Applied:
        state = self.manifest.state
        created: list[ChunkLease] = []
        if kind == "chunk_sealed":
            created.append(ChunkLease(fields["chunk"], self.worker_id, 0))
        elif kind == "results_committed" and fields["retry_chunk"] is not None:
            created.append(ChunkLease(fields["retry_chunk"]["chunk"], self.worker_id, 0))
        for lease in created:
            self._held[lease.chunk] = None
        if kind == ChunkRetired.KIND and chunk_id is not None:
            self._held.pop(chunk_id, None)
            for path in (self.spool_path(chunk_id), self._sum_path(chunk_id)):
                path.unlink(missing_ok=True)
        after = None if chunk_id is None else state.chunks.get(chunk_id)
        return Applied(False, stored, copy.deepcopy(after), tuple(created))

    # -- reads -------------------------------------------------------------------

    async def chunk(self, chunk_id: str) -> ChunkState | None:
        return copy.deepcopy(self.manifest.state.chunks.get(chunk_id))

    async def chunks(self, pipeline: str, *, owned: bool = False) -> list[ChunkState]:
        return [copy.deepcopy(c) for c in self.manifest.state.chunks.values()
                if c.pipeline == pipeline and (not owned or c.chunk in self._held)]

    async def pipeline(self, name: str) -> PipelineState | None:
        return copy.deepcopy(self.manifest.state.pipelines.get(name))

    async def batch_owner(self, batch_id: str) -> str | None:
        return self.manifest.state.batch_owner(batch_id)

    async def snapshot(self) -> ManifestState:
        return ManifestState.from_snapshot(self.manifest.state.to_snapshot())

    # -- leases ------------------------------------------------------------------

    async def claim_chunks(self, pipeline: str, limit: int, *,
                           stages: Sequence[str] = ()) -> list[Claimed]:
        claimed: list[Claimed] = []
        for chunk in self.manifest.state.chunks.values():
            if len(claimed) >= limit:
                break
            if stages and str(chunk.stage) not in stages:
                continue
            if chunk.pipeline == pipeline and chunk.chunk not in self._held:
                self._held[chunk.chunk] = None
                claimed.append(Claimed(ChunkLease(chunk.chunk, self.worker_id, 0),
                                       str(chunk.stage), None))
        return claimed

    async def release(self, lease: ChunkLease) -> bool:
        return self._held.pop(lease.chunk, False) is None

    async def heartbeat(self) -> Heartbeat:
        live = self.manifest.state.chunks
        return Heartbeat(
            time.time(),
            {c: 0 for c in self._held if c in live},
            dict.fromkeys(self._shards, 0),
            dict(self._slots),
        )

    async def acquire_shard(
        self, pipeline: str, shard: str = "0", *, force: bool = False
    ) -> ShardLease | None:
        known = self.manifest.state.pipelines.get(pipeline) or PipelineState(pipeline)
        self._shards.add((pipeline, shard))
        return ShardLease(
            pipeline=pipeline, shard=shard, owner=self.worker_id, epoch=0,
            next_chunk_no=known.next_chunk_no, sealed_seq=known.last_sealed_seq,
            sealed_position=copy.deepcopy(known.last_sealed_position),
            committed_seq=known.committed_seq,
            committed_position=copy.deepcopy(known.committed_position), previous_owner=None,
        )

    # -- creates -----------------------------------------------------------------

    def _latest_intent(self) -> ChunkState | None:
        """The chunk whose intent was written last, if still waiting on it (``_latest_intent``)."""
        latest: ChunkState | None = None
        for other in self.manifest.state.chunks.values():
            if other.last_intent_at is not None and (
                latest is None or other.last_intent_at > (latest.last_intent_at or 0.0)
            ):
                latest = other
        return latest if latest is not None and latest.stage is Stage.INTENT else None

    async def acquire_create_slot(self, workspace: str) -> CreateSlot | None:
        if workspace in self._slots:
            return None
        self._slot_epochs += 1
        self._slots[workspace] = self._slot_epochs
        latest = self._latest_intent()
        pending = None
        if latest is not None:
            assert latest.intent_at is not None and latest.last_intent_at is not None
            pending = PendingIntent(latest.chunk, latest.requests, latest.intent_at,
                                    latest.last_intent_at, 0, None)
        return CreateSlot(workspace, self.worker_id, self._slot_epochs, pending, None)

    def _holds(self, slot: CreateSlot) -> bool:
        return self._slots.get(slot.workspace) == slot.epoch

    async def record_intent(
        self, slot: CreateSlot, lease: ChunkLease, requests: int, *,
        queue_scope: str | None = None,
    ) -> Applied | None:
        if not self._holds(slot):
            return Applied(True, fenced=f"create slot {slot.workspace}: lost at epoch {slot.epoch}")
        if queue_scope is not None and not await self.reserve([queue_scope], requests,
                                                               lease.chunk):
            return None
        return await self.append(
            SubmitIntent(chunk=lease.chunk, at=time.time(), requests=requests),
            lease=lease, expected=(Stage.SEALED, Stage.INTENT),
        )

    async def record_submitted(
        self, slot: CreateSlot, lease: ChunkLease, batch_id: str, created_at: str
    ) -> Applied:
        applied = await self.append(
            Submitted(chunk=lease.chunk, batch_id=batch_id, created_at=created_at),
            lease=lease, expected=Stage.INTENT,
        )
        if applied.written and self._holds(slot):
            del self._slots[slot.workspace]
        return applied

    async def release_create_slot(self, slot: CreateSlot, *, keep_pending: bool = False) -> bool:
        # The latest intent stays pending whatever is asked: it is read from the manifest.
        if not self._holds(slot):
            return False
        del self._slots[slot.workspace]
        return True

    # -- limits ------------------------------------------------------------------

    async def reserve(self, scopes: Sequence[str], amount: float, holder: str) -> bool:
        missing = sorted(s for s in set(scopes) if s not in self._limits)
        if missing:
            raise LimitUndefined(f"limit scope {', '.join(missing)} is not defined")
        if isinstance(amount, bool) or not amount >= 0:
            raise ValueError(f"reservation for {holder} must be a non-negative number, "
                             f"not {amount!r}")
        state = self.manifest.state
        for scope in set(scopes):
            limit = self._limits[scope]
            if limit.cap is not None and limit.used(state, besides=holder) + amount > limit.cap:
                return False
        return True

    async def settle(self, holder: str, spent: Mapping[str, float] | None = None) -> None:
        """Nothing to do: what is spent is the manifest's recorded cost."""

    # -- key ledger --------------------------------------------------------------

    async def claim_keys(
        self, shard: ShardLease, chunk: str,
        entries: Sequence[tuple[str, dict[str, Any] | None]],
    ) -> Claim:
        return self.ledger.claim(shard.pipeline, number_of(shard.pipeline, chunk), chunk,
                                 entries)

    async def release_keys(self, pipeline: str, keys: Sequence[str]) -> int:
        held = self.ledger.owners(pipeline, keys)
        self.ledger.release(pipeline, keys)
        return len(held)

    # -- spool -------------------------------------------------------------------

    def spool_path(self, chunk: str) -> Path:
        return self.spool_dir / f"{chunk}.jsonl"

    def _sum_path(self, chunk: str) -> Path:
        return self.spool_dir / f"{chunk}.jsonl.sha256"

    async def put_spool(self, chunk: str, epoch: int, path: Path) -> SpoolDigest:
        dest, sums = self.spool_path(chunk), self._sum_path(chunk)

        def keep() -> SpoolDigest:
            digest = _digest(path, epoch)
            tmp = sums.with_name(sums.name + ".tmp")
            with tmp.open("w") as f:
                f.write(f"{digest.sha256} {digest.raw_bytes}\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, sums)
            if Path(path) != dest:
                os.replace(path, dest)
            fsync_dir(self.spool_dir)
            return digest

        return await anyio.to_thread.run_sync(keep)

    def spool_held(self, chunk: str) -> bool:
        """Every spool in the state dir is this daemon's (its flock): held if it is there."""
        return self.spool_path(chunk).exists()

    async def fetch_spool(self, chunk: str) -> SpoolDigest:
        path, sums = self.spool_path(chunk), self._sum_path(chunk)

        def check() -> SpoolDigest:
            if not path.exists():
                raise SpoolCorrupt(f"spool of chunk {chunk}: none kept at {path}")
            digest = _digest(path, 0)
            try:
                sha256, _, size = sums.read_text().strip().partition(" ")
            except FileNotFoundError:
                return digest  # kept before checksums were: nothing to check it against
            if (digest.sha256, str(digest.raw_bytes)) != (sha256, size):
                raise SpoolCorrupt(
                    f"spool of chunk {chunk} ({path}): {digest.raw_bytes} bytes, sha256 "
                    f"{digest.sha256[:12]}; kept {size} bytes, sha256 {sha256[:12]}"
                )
            return digest

        return await anyio.to_thread.run_sync(check)


if TYPE_CHECKING:  # mypy checks that the class keeps the contract
    def _keeps_the_contract(store: LocalStore) -> StateStore:
        return store
