"""
What ``batchd run`` adds in cluster mode: the shared store opened, and its heartbeat.

Opening checks the schema (a worker never migrates: ``batchd cluster init`` does),
defines the workspace's queue limit from ``[api] queue_limit`` (or the tier's) and
registers the worker. The heartbeat renews every lease each ``lease_ttl / 3``; the
chunks a reply no longer lists were taken over (this worker was silent past its
TTL and the taker's grace), so their drivers are cancelled at once: from then on
the store fences whatever they would still record.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import anyio
import structlog

from batchd.daemon.batches.queue_limit import queue_limit_of
from batchd.daemon.config import Config
from batchd.daemon.store.mirror import MirroredStore

__all__ = ("heartbeat_loop", "open_cluster_store", "pipeline_fields", "queue_scope")

log = structlog.get_logger("batchd.cluster")


def queue_scope(config: Config) -> str | None:
    """The workspace's queue counter, when a queue limit is known."""
    limit, _ = queue_limit_of(config.api)
    return None if limit is None else f"queue:{config.cluster.workspace}"


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
    limit, _ = queue_limit_of(config.api)
    limits: dict[str, float | None] = {}
    scope = queue_scope(config)
    if scope is not None:
        limits[scope] = None if limit is None else float(limit)
    store = PgStore(
        cluster_dsn(config), spool_dir=spool_dir, schema=cluster.schema,
        name=f"{socket.gethostname()}:{os.getpid()}", lease_ttl=cluster.lease_ttl,
        takeover_grace=cluster.takeover_grace, lease_margin=cluster.lease_margin,
        limits=limits,
    )
    await store.open()
    stack.push_async_callback(store.aclose)
    mirrored = MirroredStore(store)
    await mirrored.refresh()
    log.info("cluster store open", worker=store.worker_id, schema=cluster.schema,
             workspace=cluster.workspace, lease_ttl=cluster.lease_ttl)
    return mirrored


async def heartbeat_loop(store: MirroredStore, runners: Callable[[], Sequence[Any]],
                         ttl: float) -> None:
    """Renew the leases every ``ttl / 3``; cancel the drivers of chunks taken over."""
    while True:
        await anyio.sleep(ttl / 3)
        # Only what was held before the heartbeat went out can be missing from its reply:
        # a chunk sealed or claimed meanwhile is not in it, and is not lost.
        before = [(runner, {c: lease.epoch for c, lease in runner.leases.items()})
                  for runner in runners()]
        try:
            beat = await store.heartbeat()
        except Exception as exc:  # the database away: the deadline stops external actions
            log.warning("heartbeat failed; will try again", error=f"{type(exc).__name__}: {exc}")
            continue
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
