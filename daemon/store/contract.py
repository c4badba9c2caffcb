"""
The state store contract: what the runtime asks of the manifest, the key ledger,
the spool and the limits, whichever store keeps them.

Two stores implement it: :class:`~batchd.daemon.store.local.LocalStore` (today's
files in one state dir, fenced by the state dir's flock) and
:class:`~batchd.daemon.store.postgres.PgStore` (cluster mode: rows in PostgreSQL,
fenced by lease epochs). ``tests/test_store_contract.py`` runs one suite against
both, so a runtime written against this Protocol behaves the same on either.

Shape, and why (docs/cluster.md "The store contract" has the longer story):

* ``append(record, lease=, expected=, spool=)`` takes a typed record of
  ``daemon/wal/records.py``. The lease says who may write it: a
  :class:`ChunkLease` for submit_intent, submitted, ended and results_committed;
  a :class:`ShardLease` for chunk_sealed, source_committed and chunk_retired; none
  for a pause, a resume or an alarm. ``expected`` is the stage the caller
  believes the chunk is at.
* Outcomes are :class:`Applied`. A record whose effect is already present is a
  no-op on both stores (nothing is written). A lease or expected stage that no
  longer holds is a no-op too, with ``fenced`` saying why: the caller drops the
  chunk, it is not an error. A transition replay refuses raises ``ValueError``
  with replay's words (``illegal <kind> record: ...``), as ``Manifest.append``
  always did.
* A lease of the wrong sort (or for another chunk or pipeline) is a ``ValueError``
  on both stores (:func:`check_lease`); LocalStore's leases are all at epoch 0.
* ``claim_keys`` under a shard lease that was lost raises ``FencedOut`` (PgStore;
  LocalStore's shard cannot be lost): nothing was claimed, stop reading.
* Reads return the replay state's own types (``ChunkState``, ``PipelineState``,
  ``ManifestState``) as copies: mutating them changes nothing stored.
* Spools: ``put_spool`` takes the file a packer wrote and returns its
  :class:`SpoolDigest`, which the seal needs (PgStore verifies the stored blocks
  against it in the seal's transaction); ``fetch_spool`` makes ``spool_path(chunk)``
  hold the chunk's verified spool, or raises ``SpoolCorrupt``: a mismatching spool
  is never sent.
* Limits: ``reserve(scopes, amount, holder)`` is all or nothing and ``False`` when a
  cap refuses; an unknown scope is ``LimitUndefined``. Limits are given to each
  store's constructor (their local form needs to know what a chunk holds, the
  cluster form is a counter row), so defining them is not part of the contract.

Left out, because only one side can do it today (each is listed in
docs/cluster.md "What remains to wire"):

* ``batch_disowned``, ``ledger_bound`` and ``id_scheme`` records: LocalStore appends
  them as the manifest always did; PgStore refuses them (``ValueError``). The cluster
  ledger lives in the same database as the log, so it needs no binding; disowning a
  batch cluster-wide, and the id scheme reconciling compares (the cluster runtime
  does not reconcile yet), need record kinds the cluster log does not take yet.
* The snapshot's ``born_at``, ``newest_batch_at``, ``ledger_id`` and
  ``disowned_batches``: PgStore's snapshot is read from the rows, which do not
  keep them (LocalStore's has them, replayed).
* A heartbeat *loop* and cancelling drivers of lost chunks: the runtime's part;
  the store answers one :meth:`StateStore.heartbeat` at a time.
* Compaction (LocalStore's manifest still compacts itself), retention of
  retired rows and the event log, ``batchd cluster import``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from batchd.daemon.cluster.create_slot import CreateSlot, PendingIntent
from batchd.daemon.cluster.errors import FencedOut, LimitUndefined, SpoolCorrupt
from batchd.daemon.cluster.leases import ChunkLease, Claimed
from batchd.daemon.cluster.shards import ShardLease
from batchd.daemon.cluster.spool_blocks import SpoolDigest
from batchd.daemon.cluster.transitions import CHUNK_KINDS, SHARD_KINDS
from batchd.daemon.cluster.workers import Heartbeat
from batchd.daemon.intake.ledger import Claim
from batchd.daemon.wal.manifest_state import ChunkState, ManifestState, PipelineState, Stage
from batchd.daemon.wal.records import Record

__all__ = (
    "Applied",
    "ChunkLease",
    "Claim",
    "Claimed",
    "CreateSlot",
    "Deadline",
    "FencedOut",
    "Heartbeat",
    "LimitUndefined",
    "PendingIntent",
    "ShardLease",
    "SpoolCorrupt",
    "SpoolDigest",
    "StateStore",
    "check_lease",
    "illegal",
    "stages",
)

Lease = ChunkLease | ShardLease
Expected = Stage | Iterable[Stage]


@dataclass(frozen=True)
class Applied:
    """
    What one append did: wrote a record, or nothing (a duplicate, or fenced out).

    ``record`` is the record as the log holds it (seq, ts, kind and its fields);
    ``chunk`` the chunk after it, for chunk records; ``created`` the lease on a chunk
    the record sealed (a new chunk, or a retry chunk), which the writer now holds.
    """

    noop: bool
    record: dict[str, Any] | None = None
    chunk: ChunkState | None = None
    created: tuple[ChunkLease, ...] = ()
    fenced: str | None = None  # why the lease or the expected stage no longer held

    @property
    def written(self) -> bool:
        return not self.noop


class Deadline(Protocol):
    """Until when this worker may act on what it holds (``cluster.deadline.LeaseDeadline``)."""

    def valid(self) -> bool: ...

    def remaining(self) -> float: ...

    def check(self, action: str) -> None: ...


def illegal(kind: str, message: str) -> ValueError:
    """The error both stores raise for a transition replay refuses (``Manifest.append``'s)."""
    return ValueError(f"illegal {kind} record: {message}")


def check_lease(kind: str, fields: Mapping[str, Any], lease: Lease | None) -> None:
    """
    Refuse a record whose lease is of the wrong sort, or for another chunk or pipeline.

    Both stores call it, so a runtime that passes the wrong lease fails on LocalStore
    (whose flock would not care) as it would on PgStore.

    Raises:
        ValueError: naming the record and the lease.
    """
    if kind in CHUNK_KINDS:
        if not isinstance(lease, ChunkLease):
            raise ValueError(f"{kind} record needs a chunk lease, not {lease!r}")
        if lease.chunk != fields["chunk"]:
            raise ValueError(f"{kind} record for chunk {fields['chunk']} under a lease on "
                             f"{lease.chunk}")
    elif kind in SHARD_KINDS:
        if not isinstance(lease, ShardLease):
            raise ValueError(f"{kind} record needs a shard lease, not {lease!r}")
        pipeline = fields.get("pipeline", lease.pipeline)
        if pipeline != lease.pipeline:
            raise ValueError(f"{kind} record of pipeline {pipeline} under a lease on "
                             f"{lease.pipeline}/{lease.shard}")


def stages(expected: Expected | None) -> tuple[Stage, ...] | None:
    """*expected* as a tuple of stages (None: any stage)."""
    if expected is None:
        return None
    if isinstance(expected, Stage):
        return (expected,)
    return tuple(Stage(s) for s in expected)


@runtime_checkable
class StateStore(Protocol):
    """
    One worker's view of the durable state: records, leases, keys, spools, limits.

    Lifecycle: ``await store.open()``; use it; ``await store.aclose()`` (or
    ``async with``). One instance is one worker: ``worker_id`` is the owner its
    leases carry.
    """

    worker_id: str
    spool_dir: Path

    @property
    def deadline(self) -> Deadline:
        """Checked before every external action (create, source commit, sink write)."""
        ...

    async def open(self) -> None: ...

    async def aclose(self) -> None: ...

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
        """
        Record one transition, if the lease and the expected stage still hold.

        Args:
            lease: what fences the record (see the module docstring).
            expected: the stage(s) the caller believes the chunk is at; None for any.
            spool: the digest of the new chunk's spool (``put_spool``), for a
                chunk_sealed and for a results_committed that cuts a retry chunk.

        Raises:
            ValueError: a record replay refuses, or one this store cannot keep.
            SpoolCorrupt: the seal's stored spool is not the one described.
        """
        ...

    # -- reads -----------------------------------------------------------------

    async def chunk(self, chunk_id: str) -> ChunkState | None:
        """A live chunk; None if unknown or retired."""
        ...

    async def chunks(self, pipeline: str, *, owned: bool = False) -> list[ChunkState]:
        """A pipeline's live chunks in seal order; with *owned*, those this worker holds."""
        ...

    async def pipeline(self, name: str) -> PipelineState | None: ...

    async def batch_owner(self, batch_id: str) -> str | None:
        """The chunk a batch id was recorded for (retired ones included); None if foreign."""
        ...

    async def snapshot(self) -> ManifestState:
        """Everything, as replay would hold it (see the module docstring for what differs)."""
        ...

    # -- leases ------------------------------------------------------------------

    async def claim_chunks(self, pipeline: str, limit: int, *,
                           stages: Sequence[str] = ()) -> list[Claimed]:
        """
        Up to *limit* live chunks nobody (live) holds, oldest seal first, now this worker's;
        only chunks at *stages* when given.
        """
        ...

    async def release(self, lease: ChunkLease) -> bool:
        """Give a chunk back; False if it was already lost."""
        ...

    async def heartbeat(self) -> Heartbeat:
        """Renew the leases; what is still held (``Heartbeat.lost_chunks(held)``)."""
        ...

    async def acquire_shard(
        self, pipeline: str, shard: str = "0", *, force: bool = False
    ) -> ShardLease | None:
        """The right to read a source shard and seal its chunks; None while another reads it."""
        ...

    # -- creates -----------------------------------------------------------------

    async def acquire_create_slot(self, workspace: str) -> CreateSlot | None:
        """
        The right to create in *workspace*; None while another create holds it.

        A ``pending`` intent on the slot may own a batch nobody recorded: resolve it
        (adopt the batch, or send again) before announcing any other.
        """
        ...

    async def record_intent(
        self, slot: CreateSlot, lease: ChunkLease, requests: int, *,
        queue_scope: str | None = None,
    ) -> Applied | None:
        """The submit_intent (at the store's clock), the queue reserved; None if it is full."""
        ...

    async def record_submitted(
        self, slot: CreateSlot, lease: ChunkLease, batch_id: str, created_at: str
    ) -> Applied:
        """The chunk's batch recorded and the slot freed, together."""
        ...

    async def release_create_slot(self, slot: CreateSlot, *, keep_pending: bool = False) -> bool:
        """
        A create failed for certain (no batch exists): clear the intent, free the slot.
        With *keep_pending* (its outcome is unknown) the intent stays for the next taker.
        """
        ...

    # -- limits ------------------------------------------------------------------

    async def reserve(self, scopes: Sequence[str], amount: float, holder: str) -> bool:
        """
        Reserve *amount* for *holder* (a chunk) on every scope, or on none.

        Raises:
            LimitUndefined: a scope this store has no limit for.
        """
        ...

    async def settle(self, holder: str, spent: Mapping[str, float] | None = None) -> None:
        """The holder's reservations end; *spent* counts per scope (a collect's cost)."""
        ...

    # -- key ledger --------------------------------------------------------------

    async def claim_keys(
        self, shard: ShardLease, chunk: str,
        entries: Sequence[tuple[str, dict[str, Any] | None]],
    ) -> Claim:
        """Claim ``(key, position)`` pairs for the chunk being built: duplicates, replays."""
        ...

    async def release_keys(self, pipeline: str, keys: Sequence[str]) -> int:
        """Forget keys (an operator resubmitting dead letters); how many were held."""
        ...

    # -- spool -------------------------------------------------------------------

    def spool_path(self, chunk: str) -> Path:
        """Where the chunk's spool is read from on this machine."""
        ...

    async def put_spool(self, chunk: str, epoch: int, path: Path) -> SpoolDigest:
        """
        Keep the spool file at *path* as *chunk*'s (moved to ``spool_path(chunk)``).

        *epoch* is the uploader's lease epoch (the shard's for a new chunk, the
        parent chunk's for a retry), so a fenced-out uploader never overwrites.
        """
        ...

    def spool_held(self, chunk: str) -> bool:
        """
        Whether ``spool_path(chunk)`` is a spool this store kept or fetched itself.

        Else it is missing, or a file an earlier process left: in a cluster that file
        may hold other rows than the chunk sealed under its id, so it is fetched first.
        """
        ...

    async def fetch_spool(self, chunk: str) -> SpoolDigest:
        """
        Make ``spool_path(chunk)`` hold the chunk's spool, checked against its checksum.

        Raises:
            SpoolCorrupt: none kept, or it does not match; nothing is to be sent.
        """
        ...
