"""
Reconcile with the API before paying: batches the state does not know.

The manifest is the only record of which batch holds which rows; when it is older than
the API's view — a backup restored, a manifest cut short — batches created after it
exist on the API and nowhere in the state. Their rows would be read, sealed and paid
for again. So at start, before anything is created:

1. List the workspace's batches created after the newest batch the state knows (or
   after the state dir was made), leaving out those the state records or an operator
   disowned. These are the *unknown* batches; usually there are none.
2. Wait for each to end, then read its results' custom_ids (the only place the API
   shows them) into ``reconcile.sqlite``, a cache beside the manifest.
3. Before each create, compare the chunk's custom_ids with them: a batch holding
   exactly the chunk's custom_ids *is* that chunk's batch (chunks are rebuilt with the
   same ids and boundaries) and is adopted, not paid again; a batch sharing only some
   of them cannot be attributed, and the pipeline stops with the ``unknown_batches``
   alarm until the operator decides (``batchd reconcile``). Batches sharing none are
   another tool's and do not matter — unless the chunk's custom_ids were made under
   another id scheme (``id_scheme``: the ``custom_id`` template, the key) than the
   pipeline's newest recorded batch: then the unknown batches may be this state's
   under the old ids, sharing none by construction, and the pipeline stops the same
   way (:class:`SchemeChanged`) rather than paying for the rows again.

While unknown batches are still in progress, creates wait (there is no way to see
their custom_ids earlier); polling and collecting go on.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import orjson
import structlog

from batchd.daemon.batches.api import BatchesApi, StreamCut, timestamp
from batchd.daemon.batches.api_errors import ApiError, NotFoundError
from batchd.daemon.intake.spool import iter_spool
from batchd.daemon.wal.manifest import Manifest
from batchd.daemon.wal.manifest_state import ChunkState
from batchd.daemon.wal.state_db import REPAIR, StateFileDamaged, check_reconcile_cache
from batchd.plugins.backoff import Backoff
from batchd.plugins.errors import FatalError

__all__ = ("RECONCILE_NAME", "FoundBatch", "Reconciler", "SchemeChanged", "Unattributable",
           "unknown_batches")

log = structlog.get_logger("batchd.reconcile")

RECONCILE_NAME = "reconcile.sqlite"
_WAIT_LOG_EVERY = 600.0
_GROUP = 500


@dataclass(frozen=True, slots=True)
class FoundBatch:
    """A batch on the API that the state does not know."""

    batch_id: str
    created_at: str
    requests: int


class Unattributable(Exception):
    """Unknown batches hold some of a chunk's custom_ids but are not its batch."""

    def __init__(self, chunk: ChunkState, overlaps: dict[str, int]) -> None:
        self.chunk = chunk
        self.overlaps = overlaps
        listed = ", ".join(f"{b} ({n} of them)" for b, n in sorted(overlaps.items()))
        super().__init__(
            f"batches on the API that this state does not know hold custom_ids of chunk "
            f"{chunk.chunk} ({chunk.requests} requests) without being its batch: {listed}. "
            f"batchd cannot tell whose they are, so it sends nothing. Stop batchd, then run "
            f"`batchd reconcile CONFIG --adopt BATCH --chunk {chunk.chunk}` (collect that "
            f"batch for this chunk) or `batchd reconcile CONFIG --ignore BATCH` (not this "
            f"state's: the chunk is sent, its shared rows paid again), and start it again"
        )


class SchemeChanged(Unattributable):
    """Unknown batches exist and the pipeline's custom_ids are made under a changed scheme."""

    def __init__(self, pipeline: str, batches: list[str], then: str | None, now: str | None,
                 chunk: ChunkState | None = None) -> None:
        what = (f"chunk {chunk.chunk} shares no custom_id with them" if chunk is not None
                else "chunks made now would share no custom_id with them")
        Exception.__init__(
            self,
            f"batches on the API that this state does not know were created after its "
            f"newest batch ({', '.join(batches[:20])}{' …' if len(batches) > 20 else ''}), "
            f"and pipeline {pipeline}'s custom_id scheme changed since those batches may "
            f"have been made (custom_id template {then!r} then, {now!r} now): {what}, yet "
            f"they may hold its rows under the old ids, so batchd sends nothing. Restore the "
            f"old `custom_id` (and key) settings and start again (the batches are then "
            f"adopted), or stop batchd and decide with `batchd reconcile CONFIG --adopt "
            f"BATCH --chunk CHUNK` or `batchd reconcile CONFIG --ignore BATCH` (not this "
            f"state's, or paid again knowingly), and start it again",
        )
        self.chunk = chunk  # type: ignore[assignment]
        self.overlaps = {}


class _Cache:
    """``reconcile.sqlite``: the unknown batches' custom_ids, derived, safe to delete."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @contextlib.contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        try:
            with self._connect() as db:
                yield db
        except sqlite3.Error as exc:
            name = getattr(exc, "sqlite_errorname", "")
            if name == "SQLITE_NOTADB" or name.startswith("SQLITE_CORRUPT"):  # not a loop
                raise StateFileDamaged(f"reconcile cache {self.path} is damaged ({exc}): "
                                       f"{REPAIR}, which keeps it aside") from None
            raise FatalError(f"reconcile cache {self.path}: {exc} (it is safe to delete it; "
                             "batchd reads the batches again)") from None

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(
                "CREATE TABLE IF NOT EXISTS batches (batch_id TEXT PRIMARY KEY,"
                " created_at TEXT, requests INTEGER, ready INTEGER NOT NULL DEFAULT 0)"
            )
            db.execute(
                "CREATE TABLE IF NOT EXISTS ids (custom_id TEXT NOT NULL, batch_id TEXT NOT NULL,"
                " PRIMARY KEY (custom_id, batch_id)) WITHOUT ROWID"
            )
            yield db
        finally:
            db.close()

    def ready(self) -> set[str]:
        with self.connect() as db:
            return {row[0] for row in db.execute("SELECT batch_id FROM batches WHERE ready = 1")}

    def keep_only(self, batch_ids: set[str]) -> None:
        with self.connect() as db:
            stale = [row[0] for row in db.execute("SELECT batch_id FROM batches")
                     if row[0] not in batch_ids]
            for batch_id in stale:
                db.execute("DELETE FROM ids WHERE batch_id = ?", (batch_id,))
                db.execute("DELETE FROM batches WHERE batch_id = ?", (batch_id,))

    def store(self, batch: FoundBatch, custom_ids: list[str], *, done: bool) -> None:
        with self.connect() as db:
            db.execute("BEGIN")
            db.execute("INSERT OR IGNORE INTO batches VALUES (?, ?, ?, 0)",
                       (batch.batch_id, batch.created_at, batch.requests))
            db.executemany("INSERT OR IGNORE INTO ids VALUES (?, ?)",
                           [(cid, batch.batch_id) for cid in custom_ids])
            if done:
                db.execute("UPDATE batches SET ready = 1 WHERE batch_id = ?", (batch.batch_id,))
            db.execute("COMMIT")

    def holders(self, custom_ids: list[str]) -> list[tuple[str, str]]:
        """(custom_id, batch id) for every cached batch holding one of ``custom_ids``."""
        found: list[tuple[str, str]] = []
        with self.connect() as db:
            for start in range(0, len(custom_ids), _GROUP):
                part = custom_ids[start : start + _GROUP]
                marks = ",".join("?" * len(part))
                found.extend(db.execute(
                    f"SELECT custom_id, batch_id FROM ids WHERE custom_id IN ({marks})", part
                ))
        return found

    def overlaps(self, custom_ids: list[str], candidates: set[str]) -> Counter[str]:
        found: Counter[str] = Counter()
        with self.connect() as db:
            for start in range(0, len(custom_ids), _GROUP):
                part = custom_ids[start : start + _GROUP]
                marks = ",".join("?" * len(part))
                for batch_id, count in db.execute(
                    f"SELECT batch_id, COUNT(*) FROM ids WHERE custom_id IN ({marks})"
                    " GROUP BY batch_id", part,
                ):
                    if batch_id in candidates:
                        found[batch_id] += count
        return found


def _chunk_custom_ids(spool: Path) -> list[str]:
    return [meta["custom_id"] for request, meta in iter_spool(spool) if request is not None]


class Reconciler:
    """
    The workspace's unknown batches, shared by every pipeline of the daemon.

    ``ready`` is set once each is readable (ended, custom_ids cached) or gone; creates
    wait for it. :meth:`clearance` then says, per chunk, adopt / send / stop.
    """

    def __init__(self, manifest: Manifest, api: BatchesApi, state_dir: Path,
                 poll_interval: float) -> None:
        self.manifest = manifest
        self.api = api
        self.poll_interval = poll_interval
        self.cache = _Cache(state_dir / RECONCILE_NAME)
        self.ready = anyio.Event()
        self.unknown: dict[str, FoundBatch] = {}
        self._readable: set[str] = set()
        # Per pipeline, the id scheme its newest recorded batch was made with (else the
        # latest it recorded), as the state was at start: a restored backup's view.
        state = manifest.state
        self._made_with = {**state.id_schemes, **state.batch_schemes}
        self._templates = dict(state.scheme_templates)

    async def run(self) -> None:
        """Find the unknown batches, then read each once it has ended; set ``ready``."""
        backoff = Backoff(1.0, 60.0)
        while True:
            try:
                await self._scan()
                break
            except (ApiError, StreamCut) as exc:
                delay = backoff.next_delay()
                log.warning("cannot list the API's batches yet; creates wait",
                            error=f"{type(exc).__name__}: {exc}", retry_in=round(delay, 1))
                await anyio.sleep(delay)
        logged = -_WAIT_LOG_EVERY
        while True:
            for batch in self._pending():
                try:
                    await self._read(batch)
                except (ApiError, StreamCut) as exc:
                    log.warning("cannot read a batch the state does not know yet",
                                batch_id=batch.batch_id, error=f"{type(exc).__name__}: {exc}")
            waiting = self._pending()
            if not waiting:
                break
            if time.monotonic() - logged >= _WAIT_LOG_EVERY:
                logged = time.monotonic()
                log.warning(
                    "creates wait: batches on the API that this state does not know are still "
                    "in progress; their custom_ids can be read once they end (`batchd "
                    "reconcile CONFIG --ignore BATCH` if they are another tool's)",
                    batches=[b.batch_id for b in waiting][:20], count=len(waiting))
            await anyio.sleep(self.poll_interval)
        if self.unknown:
            log.warning("batches on the API that this state does not know; chunks holding "
                        "exactly their custom_ids adopt them instead of paying again",
                        batches=sorted(self.unknown)[:20], count=len(self.unknown))
        self.ready.set()

    def _pending(self) -> list[FoundBatch]:
        state = self.manifest.state
        return [b for b in self.unknown.values()
                if b.batch_id not in self._readable and not state.is_known_batch(b.batch_id)]

    async def _scan(self) -> None:
        state = self.manifest.state
        if state.newest_batch_at is not None:
            # Both on the API's clock: strictly the batches made after it.
            since = state.newest_batch_at
        elif state.born_at is not None:
            # No batch of ours can predate the state dir. The Date header's whole seconds
            # make the measured skew err low, which only widens the window towards ours;
            # no margin beyond that, or another installation's batch of a moment before
            # (the same keys, in the same workspace) would be taken for ours.
            skew = await self.api.clock_skew()
            since = state.born_at + (skew if skew is not None else 0.0)
        else:
            since = time.time()
        found: dict[str, FoundBatch] = {}
        async for batch in self.api.recent(since=since):
            if state.is_known_batch(batch.id):
                continue
            counts = batch.request_counts
            total = (counts.processing + counts.succeeded + counts.errored + counts.canceled
                     + counts.expired)
            found[batch.id] = FoundBatch(batch.id, str(batch.created_at), int(total))
        await anyio.to_thread.run_sync(self.cache.keep_only, set(found))
        self._readable = await anyio.to_thread.run_sync(self.cache.ready) & set(found)
        self.unknown = found

    async def _read(self, batch: FoundBatch) -> None:
        """Cache an ended unknown batch's custom_ids; nothing yet if it is in progress."""
        try:
            current = await self.api.retrieve(batch.batch_id)
        except NotFoundError:
            log.warning("a batch the state did not know is gone from the API; its rows, if "
                        "they were this state's, are sent again", batch_id=batch.batch_id)
            self._readable.add(batch.batch_id)
            self.unknown.pop(batch.batch_id, None)
            return
        if current.processing_status != "ended":
            return
        if current.archived_at is not None:
            self._readable.add(batch.batch_id)
            self.unknown.pop(batch.batch_id, None)
            return
        pending: list[str] = []
        async for block in self.api.result_blocks(batch.batch_id):
            for line in block:
                if line.strip():
                    pending.append(str(orjson.loads(line)["custom_id"]))
            if len(pending) >= 5000:
                await anyio.to_thread.run_sync(self._store, batch, pending, False)
                pending = []
        await anyio.to_thread.run_sync(self._store, batch, pending, True)
        self._readable.add(batch.batch_id)

    def _store(self, batch: FoundBatch, custom_ids: list[str], done: bool) -> None:
        self.cache.store(batch, custom_ids, done=done)

    def _candidates(self) -> set[str]:
        state = self.manifest.state
        return {b for b in self._readable if b in self.unknown and not state.is_known_batch(b)}

    def scheme_changed(self, pipeline: str, scheme: str, template: str | None,
                       chunk: ChunkState | None = None) -> SchemeChanged | None:
        """
        Why custom_ids made under ``scheme`` must not be sent yet: unknown batches wait
        and the pipeline's newest recorded batch was made under another scheme (they may
        be ours under the old ids). None when no unknown batch waits, the scheme is the
        same, or the state recorded none (written before schemes were recorded).
        """
        then = self._made_with.get(pipeline)
        candidates = self._candidates()
        if then is None or then == scheme or not candidates:
            return None
        order = sorted(candidates, key=lambda b: timestamp(self.unknown[b].created_at))
        return SchemeChanged(pipeline, order, self._templates.get(then), template, chunk)

    def active(self) -> bool:
        """Whether an unknown batch still waits for the chunk it belongs to (cheap)."""
        return bool(self.unknown) and bool(self._candidates())

    async def owners(self, custom_ids: list[str]) -> dict[str, tuple[str, int]]:
        """
        custom_id → (batch id, request count) of the oldest unknown batch holding it, for
        the packer to rebuild chunks to those batches' boundaries.
        """
        candidates = self._candidates()
        if not candidates or not custom_ids:
            return {}
        order = sorted(candidates, key=lambda b: timestamp(self.unknown[b].created_at))
        rank = {b: i for i, b in enumerate(order)}

        def lookup() -> dict[str, tuple[str, int]]:
            found: dict[str, str] = {}
            for custom_id, batch_id in self.cache.holders(custom_ids):
                if batch_id in rank and (custom_id not in found
                                         or rank[batch_id] < rank[found[custom_id]]):
                    found[custom_id] = batch_id
            return {cid: (b, self.unknown[b].requests) for cid, b in found.items()}

        return await anyio.to_thread.run_sync(lookup)

    async def holds_exactly(self, batch_id: str, chunk: ChunkState, spool: Path) -> bool | None:
        """Whether a batch holds exactly the chunk's custom_ids; None if its ids are not read."""
        if batch_id not in self._readable or batch_id not in self.unknown:
            return None

        def compare() -> Counter[str]:
            return self.cache.overlaps(_chunk_custom_ids(spool), {batch_id})

        overlaps = await anyio.to_thread.run_sync(compare)
        return (overlaps.get(batch_id, 0) == chunk.requests
                and self.unknown[batch_id].requests == chunk.requests)

    async def clearance(self, chunk: ChunkState, spool: Path) -> FoundBatch | None:
        """
        The unknown batch that is this chunk's (adopt it), or None (send the chunk).

        Raises:
            Unattributable: unknown batches share some of the chunk's custom_ids only.
        """
        candidates = self._candidates()
        if not candidates:
            return None

        def compare() -> Counter[str]:
            return self.cache.overlaps(_chunk_custom_ids(spool), candidates)

        overlaps = await anyio.to_thread.run_sync(compare)
        if not overlaps:
            state = self.manifest.state
            scheme = state.chunk_schemes.get(chunk.chunk)
            if scheme is not None:
                template = state.scheme_templates.get(scheme)
                changed = self.scheme_changed(chunk.pipeline, scheme, template, chunk)
                if changed is not None:
                    raise changed
            return None
        exact = [self.unknown[b] for b, n in overlaps.items()
                 if n == chunk.requests and self.unknown[b].requests == chunk.requests]
        if exact:
            return min(exact, key=lambda b: timestamp(b.created_at))
        raise Unattributable(chunk, dict(overlaps))


def unknown_batches(state_dir: Path) -> list[FoundBatch]:
    """The batches ``reconcile.sqlite`` holds (for ``batchd reconcile`` to list)."""
    path = state_dir / RECONCILE_NAME
    check_reconcile_cache(path)
    if not path.exists() or path.stat().st_size == 0:
        return []
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        return [FoundBatch(b, c, r) for b, c, r in db.execute(
            "SELECT batch_id, created_at, requests FROM batches ORDER BY created_at")]
