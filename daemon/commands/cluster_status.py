"""
``batchd cluster status CONFIG [--json]``: every worker, its heartbeat and what it owns.

Read from the cluster's rows with no lock taken, in one repeatable-read snapshot
so the workers, their chunks, shards and create slots and the limit counters
all describe the same moment. A worker is *alive* while its heartbeat is younger
than its own lease TTL, *silent* after that, and *dead* once a survivor may take
its work (TTL + this config's ``takeover_grace``); *stopped* when it
deregistered. The schema must be at the version this batchd uses
(``migrations.check``), as a worker would require.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from batchd.daemon.cluster.errors import SchemaVersionError
from batchd.daemon.cluster.overview import shown_workers
from batchd.daemon.cluster.schema import Sql
from batchd.daemon.commands.cluster_connect import connect_cluster, describe_target, located
from batchd.daemon.config import Config
from batchd.daemon.wal.manifest_state import ManifestState

__all__ = ("ClusterRead", "cluster_status", "read_cluster", "status_lines")


@dataclass(frozen=True)
class ClusterRead:
    """One snapshot of the cluster: the overview, and the pipelines' state if asked for."""

    overview: dict[str, Any]
    state: ManifestState | None = None
    ledger: dict[str, Any] | None = None


async def read_cluster(conn: Any, sql: Sql, config: Config, *,
                       progress: bool = False) -> ClusterRead:
    """
    The cluster on *conn* in one read-only repeatable-read snapshot (see the module
    docstring); with *progress*, also every pipeline's state and live chunks (the
    whole cluster's) and the shared key ledger's size, as ``batchd status`` shows them.

    Raises:
        ConfigError: the schema is missing or at another version (``[cluster]: schema``).
    """
    from batchd.daemon.cluster import migrations, reads
    from batchd.daemon.cluster.overview import read_overview

    async with conn.transaction(isolation="repeatable_read", readonly=True):
        try:
            version = await migrations.check(conn, sql)
        except SchemaVersionError as exc:
            raise located(config, exc, "schema") from None
        overview = await read_overview(conn, sql, grace=config.cluster.takeover_grace)
        state = await reads.live_state(conn, sql) if progress else None
        ledger = await reads.ledger_summary(conn, sql) if progress else None
    return ClusterRead({"database": describe_target(config), "schema": sql.schema,
                        "schema_version": version, **overview}, state, ledger)


async def cluster_status(config: Config, *, progress: bool = False) -> ClusterRead:
    """The cluster as the database sees it now, on a connection of its own."""
    from batchd.connectors._pg import close_quietly

    conn, sql = await connect_cluster(config, "cluster-status")
    try:
        return await read_cluster(conn, sql, config, progress=progress)
    finally:
        await close_quietly(conn)


def _seconds(value: float) -> str:
    return f"{value:.1f}s" if value < 120 else f"{value / 60:.1f}m"


def status_lines(status: dict[str, Any]) -> list[str]:
    """The status as plain lines for a terminal (``--json`` gives the dict itself)."""
    workers = status["workers"]
    alive = sum(1 for w in workers if w["state"] == "alive")
    lines = [
        f"cluster schema {status['schema']!r} at version {status['schema_version']} "
        f"in {status['database']}",
        f"workers: {len(workers)} ({alive} alive)",
    ]
    shown, hidden = shown_workers(workers)
    for w in shown:
        owns = (f"{len(w['chunks'])} chunks, {len(w['shards'])} shards, "
                f"{len(w['create_slots'])} create slots")
        lines.append(
            f"  {w['worker_id']}  {w['state']}  heartbeat {_seconds(w['heartbeat_age'])} ago "
            f"(ttl {_seconds(w['lease_ttl'])})  {w['host']} pid {w['pid']}  owns {owns}"
            f"  fenced {w['fenced']}"
        )
        for c in w["chunks"]:
            lines.append(f"    chunk {c['chunk']} ({c['pipeline']}): {c['stage']}, "
                         f"epoch {c['epoch']}")
        for h in w["shards"]:
            lines.append(f"    shard {h['pipeline']}/{h['shard']}: epoch {h['epoch']}")
        for s in w["create_slots"]:
            lines.append(f"    create slot {s['workspace']}: epoch {s['epoch']}")
        for workspace in w.get("sweeps", ()):
            lines.append(f"    stray sweeper of workspace {workspace}")
    if hidden:
        lines.append(f"  and {hidden} workers stopped over an hour ago (--json lists them)")
    for pipeline, count in status["unowned_chunks"].items():
        lines.append(f"unowned chunks of {pipeline!r}: {count} (claimed by the next live worker)")
    for s in status["create_slots"]:
        if s["pending_chunk"] is not None:
            lines.append(f"create slot {s['workspace']}: pending intent of chunk "
                         f"{s['pending_chunk']} for {_seconds(s['pending_age'] or 0.0)}")
    if not status["limits"]:
        lines.append("limits: none defined")
    else:
        lines.append("limits:")
    for c in status["limits"]:
        cap = "no cap" if c["cap"] is None else f"cap {c['cap']}"
        available = "" if c["available"] is None else f", available {c['available']}"
        lines.append(f"  {c['scope']}: {cap}, reserved {c['reserved']}, spent {c['spent']}, "
                     f"external {c['external']}{available}")
    return lines
