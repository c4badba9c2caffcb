"""
PgStore: the state store contract on the cluster tables in PostgreSQL.

Thin on purpose: every method is one function of ``daemon/cluster`` (the table
in docs/cluster.md, "PgStore"), run on a connection of the store's asyncpg
pool. What this module adds is the translation to the contract:

* ``append`` dispatches on the record's kind to the lease that fences it:
  chunk records to ``fencing.apply_transition``, a seal to ``seal_chunk``, a
  source commit to ``commit_source``, a retirement to ``retire_chunk`` (the
  spool's blocks are dropped afterwards, outside its transaction), pauses,
  resumes and alarms to ``record_pipeline_event``;
* ``FencedOut`` becomes a no-op :class:`Applied` whose ``fenced`` says why:
  the caller drops the chunk; it is counted on the worker row, not alarmed;
* ``IllegalTransition`` becomes the ``ValueError`` ``Manifest.append`` raises.

One PgStore is one worker incarnation: ``open`` checks the schema version
(``batchd cluster init`` creates it; a worker never migrates), registers the
worker and sends a first heartbeat, which starts the lease deadline; ``aclose``
deregisters it, handing back what it held. Heartbeats after that are the
caller's (every TTL/3), as is stopping the drivers of chunks a heartbeat no
longer lists.

Each worker keeps a local copy of the spools it sends or collects in
``spool_dir``: ``put_spool`` uploads the file and keeps it there,
``fetch_spool`` downloads it there, checked against the seal's checksum.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Container, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import anyio
import asyncpg

from batchd.daemon.cluster import (
    budget_holds,
    create_slot,
    event_log,
    fencing,
    key_ledger,
    leases,
    limits,
    migrations,
    reads,
    retry_requests,
    shards,
    spool_blocks,
    workers,
)
from batchd.daemon.cluster.deadline import LeaseDeadline
from batchd.daemon.cluster.defaults import (
    DEFAULT_LEASE_TTL,
    DEFAULT_TAKEOVER_GRACE,
    default_margin,
)
from batchd.daemon.cluster.errors import FencedOut, IllegalTransition, LimitRefused
from batchd.daemon.cluster.limits import Defined
from batchd.daemon.cluster.schema import DEFAULT_SCHEMA, Sql
from batchd.daemon.cluster.transitions import CHUNK_KINDS, PIPELINE_KINDS, SHARD_KINDS
from batchd.daemon.intake.spool_check import mark_whole
from batchd.daemon.store.contract import (
    Applied,
    ChunkLease,
    Claim,
    Claimed,
    CreateSlot,
    Expected,
    Heartbeat,
    Lease,
    ShardLease,
    SpoolDigest,
    StateStore,
    check_lease,
    illegal,
    stages,
)
from batchd.daemon.wal.manifest_state import ChunkState, ManifestState, PipelineState, Stage
from batchd.daemon.wal.records import Record

__all__ = ("PgStore",)

_ANY_STAGE = tuple(Stage)


def _applied(result: fencing.Applied) -> Applied:
    return Applied(result.noop, result.record, result.chunk, result.created)


class PgStore:
    """
    The contract on one cluster schema, as one worker (see the module docstring).

    Args:
        dsn: the cluster database.
        schema: the schema ``batchd cluster init`` created.
        name: the worker's name; its id is ``<name>/<random>``, new at every open.
        spool_dir: this machine's copies of the spools it sends or collects.
        lease_ttl: seconds a heartbeat keeps this worker's leases.
        takeover_grace: seconds past another worker's TTL before taking its work.
        lease_margin: seconds before the TTL at which this worker stops acting
            (default ``cluster.defaults.default_margin``: 5 s, or a sixth of a short TTL).
        limits: scope -> cap (None: counted, not capped), defined at open.
        pool_size: connections in the pool.
    """

    def __init__(
        self,
        dsn: str,
        *,
        spool_dir: Path,
        schema: str = DEFAULT_SCHEMA,
        name: str = "batchd",
        lease_ttl: float = DEFAULT_LEASE_TTL,
        takeover_grace: float = DEFAULT_TAKEOVER_GRACE,
        lease_margin: float | None = None,
        limits: Mapping[str, float | None] | None = None,
        pool_size: int = 4,
    ) -> None:
        self.dsn = dsn
        self.sql = Sql(schema)
        self.name = name
        self.spool_dir = Path(spool_dir)
        self.lease_ttl = lease_ttl
        self.grace = takeover_grace
        self._deadline = LeaseDeadline(
            lease_ttl, default_margin(lease_ttl) if lease_margin is None else lease_margin
        )
        self._limits = dict(limits or {})
        # What open's definitions found (a cap another worker's config had set differs).
        self.limits_defined: list[Defined] = []
        # Each pipeline's budget bound, held in the seal's and the commit's transactions.
        self.budgets = budget_holds.BudgetHolds()
        self._pool_size = pool_size
        # Spools this process kept or fetched: a file an earlier incarnation left in
        # spool_dir may hold other rows under the same chunk id, and is fetched again.
        self._held_spools: set[str] = set()
        self._pool: Any = None
        self.worker_id = ""
        # Slots this worker holds, by workspace: the table lets a holder take its own slot
        # again (a new epoch), so creates of one worker are serialised here.
        self._slots: dict[str, CreateSlot] = {}

    # -- lifecycle -------------------------------------------------------------

    @property
    def deadline(self) -> LeaseDeadline:
        return self._deadline

    async def open(self) -> None:
        """
        Check the schema, define the limits, register this worker and heartbeat once.

        Raises:
            SchemaVersionError: the schema is missing, older or newer than this batchd.
        """
        # No connection floor (min_size 0): asyncpg restores a floor in the background and
        # logs a traceback at each failed try while the database is away; the worker's own
        # loops (heartbeat, claims) reconnect on their next call and say so in one line.
        self._pool = await asyncpg.create_pool(
            self.dsn, min_size=0, max_size=self._pool_size, reset=_released,
            server_settings={
                "application_name": f"batchd:{self.name}:store",
                # A worker paused inside a transaction (SIGSTOP, a long GC) would hold its
                # row locks, and every other worker's claim of those rows would wait for
                # it: the server ends such a session once it has idled for a lease TTL.
                "idle_in_transaction_session_timeout": str(max(1000, int(self.lease_ttl * 1000))),
            },
        )
        try:
            async with self._conn() as conn:
                await migrations.check(conn, self.sql)
                for scope, cap in sorted(self._limits.items()):
                    self.limits_defined.append(await limits.define(conn, self.sql, scope, cap))
                self.worker_id = await workers.register(conn, self.sql, self.name,
                                                        ttl=self.lease_ttl)
                await workers.heartbeat(conn, self.sql, self.worker_id, deadline=self._deadline)
            await anyio.to_thread.run_sync(
                lambda: self.spool_dir.mkdir(parents=True, exist_ok=True, mode=0o700))
        except BaseException:
            await self._pool.close()
            self._pool = None
            raise

    async def aclose(self) -> None:
        """Deregister (everything held goes back at once) and close the pool."""
        if self._pool is None:
            return
        self._deadline.expire()
        try:
            if self.worker_id:
                await self._deregister()
        finally:
            await self._pool.close()
            self._pool = None

    async def _deregister(self) -> None:
        """
        Hand back everything at once; once more on a fresh connection if the pooled one
        was closed since its last use (the link lost meanwhile: nothing checks it at
        release, see :func:`_released`).
        """
        try:
            async with self._conn() as conn:
                await workers.deregister(conn, self.sql, self.worker_id)
        except (asyncpg.InterfaceError, asyncpg.ConnectionDoesNotExistError):
            async with self._conn() as conn:
                await workers.deregister(conn, self.sql, self.worker_id)

    async def __aenter__(self) -> PgStore:
        await self.open()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()

    @asynccontextmanager
    async def _conn(self) -> AsyncIterator[Any]:
        if self._pool is None:
            raise RuntimeError(f"cluster store {self.sql.schema} is not open")
        async with self._pool.acquire() as conn:
            yield conn

    def connection(self) -> AbstractAsyncContextManager[Any]:
        """A connection of the pool, for a cluster-only loop with its own statements."""
        return self._conn()

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
        try:
            async with self._conn() as conn:
                result = await self._dispatch(conn, kind, fields, lease, expected, spool)
        except FencedOut as exc:
            return Applied(True, fenced=str(exc))
        except IllegalTransition as exc:
            raise illegal(kind, str(exc)) from None
        except LimitRefused:
            if kind == "chunk_sealed":  # not recorded: its uploaded blocks are nobody's
                async with self._conn() as conn:
                    await spool_blocks.delete(conn, self.sql, fields["chunk"])
            raise
        if kind == "chunk_retired" and not result.noop:
            async with self._conn() as conn:  # normally none left: settled at the commit
                await budget_holds.release_retired(conn, self.sql, fields["chunk"])
            await self._drop_spool(fields["chunk"])
        return _applied(result)

    async def _dispatch(
        self, conn: Any, kind: str, fields: dict[str, Any], lease: Lease | None,
        expected: Expected | None, spool: SpoolDigest | None,
    ) -> fencing.Applied:
        sql = self.sql
        if kind in CHUNK_KINDS:
            assert isinstance(lease, ChunkLease)  # check_lease
            on_applied = None
            if kind == "results_committed":
                on_applied = self.budgets.at_commit(sql, fields)
            elif kind == "ended":
                on_applied = budget_holds.queue_release(sql, fields["chunk"])
            return await fencing.apply_transition(
                conn, sql, lease, stages(expected) or _ANY_STAGE, kind, fields,
                retry_spool=spool, on_applied=on_applied,
            )
        if kind in SHARD_KINDS:
            assert isinstance(lease, ShardLease)  # check_lease
            if kind == "chunk_sealed":
                if spool is None:
                    raise ValueError(f"chunk_sealed of {fields['chunk']} needs its spool "
                                     f"(put_spool) first")
                return await fencing.seal_chunk(conn, sql, lease, fields, spool=spool,
                                                on_applied=self.budgets.at_seal(sql, fields))
            if kind == "source_committed":
                return await fencing.commit_source(conn, sql, lease, fields)
            return await fencing.retire_chunk(conn, sql, lease, fields["chunk"])
        if kind in PIPELINE_KINDS:
            return await fencing.record_pipeline_event(conn, sql, kind, fields,
                                                       worker=self.worker_id)
        raise ValueError(f"{kind} records have no place in the cluster store yet")

    async def _drop_spool(self, chunk: str) -> None:
        async with self._conn() as conn:
            await spool_blocks.delete(conn, self.sql, chunk)
        self.spool_path(chunk).unlink(missing_ok=True)
        self._held_spools.discard(chunk)

    # -- reads -------------------------------------------------------------------

    async def chunk(self, chunk_id: str) -> ChunkState | None:
        async with self._conn() as conn:
            return await reads.chunk(conn, self.sql, chunk_id)

    async def chunks(self, pipeline: str, *, owned: bool = False) -> list[ChunkState]:
        async with self._conn() as conn:
            return await reads.chunks(conn, self.sql, pipeline,
                                      owner=self.worker_id if owned else None)

    async def pipeline(self, name: str) -> PipelineState | None:
        async with self._conn() as conn:
            return await reads.pipeline(conn, self.sql, name)

    async def batch_owner(self, batch_id: str) -> str | None:
        async with self._conn() as conn:
            return await reads.batch_owner(conn, self.sql, batch_id)

    async def snapshot(self) -> ManifestState:
        """The rows as a ManifestState, read in one snapshot."""
        state, _ = await self.snapshot_seqs(0)
        return state

    async def snapshot_seqs(self, window: int) -> tuple[ManifestState, list[int]]:
        """
        The rows as a ManifestState, and the event seqs visible among its last *window*.

        Read in one snapshot: a seq of that window absent from the list belonged to a
        transaction still open (or rolled back) when the rows were read, so a reader
        that goes on from the state's seq must ask for it again (:meth:`events`).
        """
        async with self._conn() as conn:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                state = await event_log.rows_state(conn, self.sql)
                seen = (await event_log.present(conn, self.sql, state.seq, window)
                        if window > 0 else [])
        return state, seen

    async def events(self, after: int, missing: Sequence[int] = (), *,
                     limit: int = 5000) -> list[dict[str, Any]]:
        """The records after seq *after* and those of the seqs in *missing*, in seq order."""
        async with self._conn() as conn:
            return await event_log.since(conn, self.sql, after, missing, limit=limit)

    # -- leases ------------------------------------------------------------------

    async def claim_chunks(self, pipeline: str, limit: int, *,
                           stages: Sequence[str] = ()) -> list[Claimed]:
        async with self._conn() as conn:
            return await leases.claim_chunks(conn, self.sql, self.worker_id, pipeline, limit,
                                             grace=self.grace, stages=stages)

    async def release(self, lease: ChunkLease) -> bool:
        async with self._conn() as conn:
            return await leases.release(conn, self.sql, lease)

    async def heartbeat(self) -> Heartbeat:
        """
        Renew this worker's leases and its deadline.

        Raises:
            WorkerGone: the worker was stopped or purged; it holds nothing.
        """
        async with self._conn() as conn:
            beat = await workers.heartbeat(conn, self.sql, self.worker_id,
                                           deadline=self._deadline)
        for workspace, slot in list(self._slots.items()):
            if beat.slots.get(workspace) != slot.epoch:
                del self._slots[workspace]  # taken over: another worker creates now
        return beat

    async def end_dead_sessions(self) -> int:
        """
        End the database sessions of workers silent past their TTL and the grace.

        A worker paused in the middle of a statement's exchange (SIGSTOP between two
        protocol messages) is neither idle in a transaction nor done: the server waits
        on it, and its row locks hold every other worker's claim of those rows. Its work
        is being taken over anyway; ending its sessions frees the rows (and whatever it
        would still write when it wakes fails, as its leases do).
        """
        async with self._conn() as conn:
            ended = await conn.fetchval(self.sql(
                "SELECT count(pg_terminate_backend(a.pid)) FROM pg_stat_activity a"
                " JOIN {s}.worker w ON a.application_name = left('batchd:' || w.name"
                " || ':store', 63)"
                " WHERE w.stopped_at IS NULL AND w.worker_id <> $1"
                " AND w.heartbeat_at + w.lease_ttl + $2 * interval '1 second' < now()"
                " AND a.pid <> pg_backend_pid() AND a.datname = current_database()"),
                self.worker_id, self.grace)
        return int(ended or 0)

    async def db_clock_skew(self) -> float:
        """
        The database's clock minus this machine's, in seconds.

        Intents are stamped on the database's clock (``clock_timestamp()``), so a worker
        that looks for an intent's batch on the API's clock converts through this.
        """
        sent = time.time()
        async with self._conn() as conn:
            db_now = await conn.fetchval("SELECT extract(epoch FROM clock_timestamp())::float8")
        return float(db_now) - (sent + time.time()) / 2

    async def acquire_shard(
        self, pipeline: str, shard: str = "0", *, force: bool = False
    ) -> ShardLease | None:
        async with self._conn() as conn:
            return await shards.acquire(conn, self.sql, self.worker_id, pipeline, shard,
                                        grace=self.grace, force=force)

    async def release_shard(self, lease: ShardLease) -> bool:
        """Stop reading a shard (over this worker's share, or read to its end)."""
        async with self._conn() as conn:
            return await shards.release(conn, self.sql, lease)

    async def next_chunk_number(self, pipeline: str) -> int:
        """A chunk number unique across the pipeline's shard readers."""
        async with self._conn() as conn:
            return await shards.next_chunk_number(conn, self.sql, pipeline)

    async def free_shards(self, pipeline: str, names: list[str]) -> list[str]:
        """Which of *names* nobody else live holds (worth an ``acquire_shard``)."""
        async with self._conn() as conn:
            return await shards.free_shards(conn, self.sql, self.worker_id, pipeline, names,
                                            grace=self.grace)

    async def join_readers(self, pipeline: str) -> None:
        """List this worker among the readers of *pipeline*'s shards."""
        async with self._conn() as conn:
            await shards.join_readers(conn, self.sql, pipeline, self.worker_id)

    async def live_readers(self, pipeline: str) -> int:
        """How many live workers share *pipeline*'s shards."""
        async with self._conn() as conn:
            return await shards.live_readers(conn, self.sql, pipeline)

    # -- creates -----------------------------------------------------------------

    async def acquire_create_slot(self, workspace: str) -> CreateSlot | None:
        if workspace in self._slots:
            return None
        async with self._conn() as conn:
            slot = await create_slot.take(conn, self.sql, workspace, self.worker_id,
                                          grace=self.grace)
        if slot is not None:
            self._slots[workspace] = slot
        return slot

    def _freed(self, slot: CreateSlot) -> None:
        if self._slots.get(slot.workspace) == slot:
            del self._slots[slot.workspace]

    async def record_intent(
        self, slot: CreateSlot, lease: ChunkLease, requests: int, *,
        queue_scope: str | None = None,
    ) -> Applied | None:
        try:
            async with self._conn() as conn:
                result = await create_slot.record_intent(conn, self.sql, slot, lease, requests,
                                                         queue_scope=queue_scope)
        except FencedOut as exc:
            return Applied(True, fenced=str(exc))
        except IllegalTransition as exc:
            raise illegal("submit_intent", str(exc)) from None
        return None if result is None else _applied(result)

    async def record_submitted(
        self, slot: CreateSlot, lease: ChunkLease, batch_id: str, created_at: str
    ) -> Applied:
        try:
            async with self._conn() as conn:
                result = await create_slot.record_submitted(conn, self.sql, slot, lease,
                                                            batch_id, created_at)
        except FencedOut as exc:
            return Applied(True, fenced=str(exc))
        except IllegalTransition as exc:
            raise illegal("submitted", str(exc)) from None
        if not result.noop:
            self._freed(slot)
        return _applied(result)

    async def release_create_slot(self, slot: CreateSlot, *, keep_pending: bool = False) -> bool:
        self._freed(slot)
        async with self._conn() as conn, conn.transaction():
            if not keep_pending:
                await create_slot.clear_pending(conn, self.sql, slot)
            return await create_slot.release(conn, self.sql, slot)

    # -- limits ------------------------------------------------------------------

    async def reserve(self, scopes: Sequence[str], amount: float, holder: str) -> bool:
        async with self._conn() as conn:
            return await limits.reserve(conn, self.sql, scopes, amount, holder)

    async def settle(self, holder: str, spent: Mapping[str, float] | None = None) -> None:
        async with self._conn() as conn:
            await limits.settle(conn, self.sql, holder, spent)

    async def define_limit(self, scope: str, cap: float | None) -> limits.Defined:
        """Set *scope*'s cap to this worker's (the config wins); what it was before."""
        async with self._conn() as conn:
            return await limits.define(conn, self.sql, scope, cap)

    async def hold_unheld(self, pipeline: str) -> int:
        """Live chunks of *pipeline* holding nothing on its budget get their bound held."""
        bound = self.budgets.bound_of(pipeline)
        if bound is None:
            return 0
        async with self._conn() as conn:
            return await budget_holds.hold_unheld(conn, self.sql, pipeline, bound)

    async def counter(self, scope: str) -> limits.Counter | None:
        """A limit counter as it is now (for the budget's pre-check and its message)."""
        async with self._conn() as conn:
            return await limits.counter(conn, self.sql, scope)

    async def reconcile_queue(self, scope: str, observed: int) -> float:
        """What others use of *scope*: the API's processing count minus ours."""
        async with self._conn() as conn:
            return float(await limits.reconcile_external(conn, self.sql, scope, observed))

    # -- key ledger --------------------------------------------------------------

    async def claim_keys(
        self, shard: ShardLease, chunk: str,
        entries: Sequence[tuple[str, dict[str, Any] | None]],
    ) -> Claim:
        """
        Raises:
            FencedOut: the shard lease was lost; nothing was claimed.
        """
        async with self._conn() as conn:
            return await key_ledger.claim_keys(conn, self.sql, shard, chunk, entries)

    async def release_keys(self, pipeline: str, keys: Sequence[str]) -> int:
        async with self._conn() as conn:
            return await key_ledger.release_keys(conn, self.sql, pipeline, keys)

    async def take_retries(self, lease: ShardLease) -> list[retry_requests.RetryRequest]:
        """Operators' pending dead-letter retries, taken under the source's shard lease."""
        async with self._conn() as conn:
            return await retry_requests.take_retries(conn, self.sql, lease)

    # -- spool -------------------------------------------------------------------

    def spool_path(self, chunk: str) -> Path:
        return self.spool_dir / f"{chunk}.jsonl"

    def spool_held(self, chunk: str) -> bool:
        return chunk in self._held_spools and self.spool_path(chunk).exists()

    def drop_retired_spools(self, retired: Container[str]) -> int:
        """
        Delete the local copies of the spools this process holds whose chunks are in
        *retired* (retired by any worker: a retirement deletes only its writer's copy).
        """
        gone = [chunk for chunk in self._held_spools if chunk in retired]
        for chunk in gone:
            self.spool_path(chunk).unlink(missing_ok=True)
            self._held_spools.discard(chunk)
        return len(gone)

    async def put_spool(self, chunk: str, epoch: int, path: Path) -> SpoolDigest:
        async with self._conn() as conn:
            digest = await spool_blocks.upload(conn, self.sql, chunk, epoch, path)
        dest = self.spool_path(chunk)
        if Path(path) != dest:
            await anyio.to_thread.run_sync(os.replace, path, dest)
        self._held_spools.add(chunk)
        return digest

    async def fetch_spool(self, chunk: str) -> SpoolDigest:
        async with self._conn() as conn:
            digest = await spool_blocks.download(conn, self.sql, chunk, self.spool_path(chunk))
        mark_whole(self.spool_path(chunk))  # the sealed bytes (SHA-256 checked): not read again
        self._held_spools.add(chunk)
        return digest


async def _released(conn: Any) -> None:
    """
    Nothing to reset when a connection goes back to the pool: asyncpg's default sends
    ``RESET ALL; UNLISTEN *; CLOSE ALL; pg_advisory_unlock_all()`` at every release, a
    round trip per store call that costs both sides CPU (docs/benchmarks.md §10), for
    session state no pool user sets (the retention's advisory lock and the overview's
    settings are on connections of their own). An open transaction is still rolled
    back: asyncpg does that before calling this.
    """


if TYPE_CHECKING:  # mypy checks that the class keeps the contract
    def _keeps_the_contract(store: PgStore) -> StateStore:
        return store
