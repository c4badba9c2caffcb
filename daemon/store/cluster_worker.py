"""
What ``batchd run`` adds in cluster mode: the shared store opened, and its heartbeat.

Opening checks the schema (a worker never migrates: ``batchd cluster init`` does),
defines the limit counters from the config (the workspace's ``queue:<workspace>``
from ``[api] queue_limit`` or the tier's, each pipeline's ``budget:<pipeline>``
from its ``budget_usd``; this worker's config wins over a cap another worker set,
with a warning naming both) and registers the worker. The heartbeat renews every
lease each ``lease_ttl / 3``; the chunks a reply no longer lists were taken over
(this worker was silent past its TTL and the taker's grace), so their drivers are
cancelled at once: from then on the store fences whatever they would still record.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Mapping, Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import structlog

from batchd.daemon.batches.queue_limit import processing_requests, queue_limit_of
from batchd.daemon.cluster.budget_holds import budget_scope
from batchd.daemon.cluster.defaults import interval_from_env
from batchd.daemon.config import Config
from batchd.daemon.store.contract import ChunkLease
from batchd.daemon.store.mirror import MirroredStore
from batchd.daemon.wal.manifest_state import Stage

if TYPE_CHECKING:
    from batchd.daemon.batches.api import BatchesApi

__all__ = (
    "budget_scope",
    "cluster_limits",
    "define_budget",
    "heartbeat_loop",
    "open_cluster_store",
    "pipeline_fields",
    "queue_reconcile_loop",
    "queue_scope",
    "reconcile_interval",
)

log = structlog.get_logger("batchd.cluster")

#: Seconds between two readings of the API's processing queue (issue 15: 5 min).
RECONCILE_EVERY = 300.0
#: Tests shorten it (a whole drill lasts seconds); operators have no reason to.
RECONCILE_ENV = "BATCHD_QUEUE_RECONCILE_SECONDS"


def queue_scope(config: Config) -> str | None:
    """The workspace's queue counter, when a queue limit is known."""
    limit, _ = queue_limit_of(config.api)
    return None if limit is None else f"queue:{config.cluster.workspace}"


def cluster_limits(config: Config) -> dict[str, float | None]:
    """Every counter this worker's config defines, with its cap (None: counted only)."""
    limits: dict[str, float | None] = {}
    scope = queue_scope(config)
    if scope is not None:
        limit, _ = queue_limit_of(config.api)
        limits[scope] = float(limit)
    for pipeline in config.pipelines:
        limits[budget_scope(pipeline.name)] = pipeline.budget_usd
    return limits


def _log_defined(defined: Any) -> None:
    """A cap another worker's config had set and this one's replaced: say so, naming both."""
    if defined.changed:
        log.warning("limit cap changed: this worker's config wins (check that every worker's "
                    "config agrees)", scope=defined.scope,
                    previous=None if defined.previous is None else float(defined.previous),
                    now=None if defined.cap is None else float(defined.cap))


async def define_budget(store: Any, pipeline: str, cap: float | None,
                        bound: Callable[[int, int], float]) -> bool:
    """
    ``budget:<pipeline>`` at this config's cap, its chunks held at their upper bound from
    seal to commit (in those transactions; live chunks holding nothing, imported or
    sealed by an older batchd, are held now). True when the cap went up here or at open,
    so a budget pause may lift (as a raised ``budget_usd`` and a restart lift it locally).
    """
    scope = budget_scope(pipeline)
    inner = store.inner
    inner.budgets.register(pipeline, bound)
    defined = await inner.define_limit(scope, cap)
    _log_defined(defined)
    held = await inner.hold_unheld(pipeline)
    if held:
        log.info("budget holds taken for chunks sealed before the budget was wired",
                 pipeline=pipeline, chunks=held)
    at_open = [d for d in inner.limits_defined if d.scope == scope]
    inner.limits_defined = [d for d in inner.limits_defined if d.scope != scope]
    return bool(defined.raised or any(d.raised for d in at_open))


def reconcile_interval() -> float:
    """:data:`RECONCILE_EVERY`, or the seconds ``$BATCHD_QUEUE_RECONCILE_SECONDS`` says."""
    return interval_from_env(RECONCILE_ENV, RECONCILE_EVERY, "queue reconcile")


async def queue_reconcile_loop(store: Any, api: BatchesApi, scope: str,
                               interval: float) -> None:
    """
    Every *interval*: what others (other tools on the workspace's API key, a worker not
    in this cluster) hold of the processing queue, from the API's own count, set as
    ``external`` on the counter (``observed - reserved``, never below 0).
    """
    while True:
        try:
            observed = await processing_requests(api)
            external = await store.inner.reconcile_queue(scope, observed)
        except Exception as exc:  # the API or the database away: next round
            log.warning("queue reconciliation failed; will try again", scope=scope,
                        error=f"{type(exc).__name__}: {exc}")
        else:
            log.info("queue reconciled with the API", scope=scope, processing=observed,
                     external=external)
        await anyio.sleep(interval)


def pipeline_fields(config: Config) -> dict[str, dict[str, Any]]:
    """Each pipeline's fields every worker must share (``cluster/pipeline_config.py``)."""
    from batchd.daemon.cluster.pipeline_config import shared_fields

    return {p.name: shared_fields(config, p) for p in config.pipelines}


async def open_cluster_store(config: Config, stack: AsyncExitStack,
                             spool_dir: Path) -> MirroredStore:
    """The PostgreSQL store of ``[cluster]``, open, with its local view read once."""
    from batchd.daemon.cluster.errors import SchemaVersionError
    from batchd.daemon.cluster.migrations import check
    from batchd.daemon.cluster.pipeline_config import check_or_record
    from batchd.daemon.commands.cluster_connect import cluster_dsn, connect_cluster, located
    from batchd.daemon.store.postgres import PgStore

    # One probe first, for clear one-line errors (the DSN's, the schema version's).
    conn, sql = await connect_cluster(config, "run")
    try:
        await check(conn, sql)
        # Every worker of a pipeline runs it with the same shared fields (the first records
        # them): a worker whose config differs stops here, naming each field.
        await check_or_record(conn, sql, pipeline_fields(config),
                              recorded_by=f"{socket.gethostname()}:{os.getpid()}",
                              where=str(config.path))
    except SchemaVersionError as exc:
        raise located(config, exc, "schema") from None
    finally:
        await conn.close()
    cluster = config.cluster
    limits = cluster_limits(config)
    store = PgStore(
        cluster_dsn(config), spool_dir=spool_dir, schema=cluster.schema,
        name=f"{socket.gethostname()}:{os.getpid()}", lease_ttl=cluster.lease_ttl,
        takeover_grace=cluster.takeover_grace, lease_margin=cluster.lease_margin,
        limits=limits,
    )
    await store.open()
    stack.push_async_callback(store.aclose)
    for defined in store.limits_defined:
        _log_defined(defined)
    mirrored = MirroredStore(store)
    await mirrored.refresh()
    log.info("cluster store open", worker=store.worker_id, schema=cluster.schema,
             workspace=cluster.workspace, lease_ttl=cluster.lease_ttl)
    return mirrored


async def heartbeat_loop(store: MirroredStore, runners: Callable[[], Sequence[Any]],
                         ttl: float) -> None:
    """
    Renew the leases every ``ttl / 3``; cancel the drivers of chunks taken over; give up
    chunks the store says this worker holds that none of its runners drives (a seal or a
    claim that committed while the database link dropped its acknowledgement: held by a
    live worker, nobody would ever claim them).
    """
    failed = False
    strays: dict[str, int] = {}  # chunk -> epoch held in the store, driven by no runner
    while True:
        # After a failure, once more at once: a woken worker's pooled connections were
        # ended by the survivors (end_dead_sessions), and the pool replaces a dead one
        # on the next acquire; it must learn what it lost before it acts on.
        await anyio.sleep(0.05 if failed else ttl / 3)
        # Only what was held before the heartbeat went out can be missing from its reply:
        # a chunk sealed or claimed meanwhile is not in it, and is not lost.
        before = [(runner, {c: lease.epoch for c, lease in runner.leases.items()})
                  for runner in runners()]
        try:
            beat = await store.heartbeat()
        except Exception as exc:  # the database away: the deadline stops external actions
            log.warning("heartbeat failed; will try again", error=f"{type(exc).__name__}: {exc}")
            failed = not failed  # one quick retry, then the usual pace
            continue
        failed = False
        end_dead_sessions = store.inner.end_dead_sessions  # type: ignore[attr-defined]
        try:
            ended = await end_dead_sessions()  # PgStore's, not part of the contract
        except Exception as exc:  # no right to end them: the row locks wait for the server
            log.warning("cannot end a silent worker's sessions",
                        error=f"{type(exc).__name__}: {exc}")
        else:
            if ended:
                log.warning("ended a silent worker's database sessions", sessions=ended)
        for runner, held in before:
            lost = {c for c in beat.lost_chunks(held)
                    if (lease := runner.leases.get(c)) is not None and lease.epoch == held[c]}
            if lost:
                log.warning("leases lost: another worker took these chunks over",
                            chunks=sorted(lost))
                runner.leases_lost(lost)
        strays = await _release_strays(store, beat.chunks, before, runners(), strays)


_DONE = (Stage.COMMITTED, Stage.SOURCE_COMMITTED)


async def _release_strays(store: MirroredStore, owned: Mapping[str, int],
                          before: Sequence[tuple[Any, Mapping[str, int]]],
                          runners: Sequence[Any], strays: dict[str, int]) -> dict[str, int]:
    """
    Release the chunks the store gives this worker that no runner held before the beat or
    holds now, once they were so at the previous beat too (a seal's lease is taken within
    moments of its commit); anyone's next claim takes them at a new epoch. The chunks
    found so now are returned, to be checked at the next beat.
    """
    known = {c for _, held in before for c in held}
    for runner in runners:
        known.update(runner.leases)
    # A chunk whose results this worker committed stays its own, without a lease, until
    # the source's reader retires it (in source order): not a stray.
    done = {c for c, chunk in store.state.chunks.items() if chunk.stage in _DONE}
    found = {c: epoch for c, epoch in owned.items() if c not in known and c not in done}
    for chunk, epoch in found.items():
        if strays.get(chunk) != epoch:
            continue
        try:
            released = await store.release(ChunkLease(chunk, store.worker_id, epoch))
        except Exception as exc:  # the database away: the next beat tries again
            log.warning("cannot release a chunk nobody here drives; will try again",
                        chunk=chunk, error=f"{type(exc).__name__}: {exc}")
            continue
        if released:
            log.warning("released a chunk held in the store but driven by nobody here "
                        "(its acknowledgement was lost with the database link); the next "
                        "claim takes it", chunk=chunk, epoch=epoch)
    return found
