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

from collections import defaultdict
from decimal import Decimal
from typing import Any

from batchd.daemon.cluster.errors import SchemaVersionError
from batchd.daemon.commands.cluster_connect import connect_cluster, describe_target, located
from batchd.daemon.config import Config

__all__ = ("cluster_status", "status_lines")

_CHUNKS = """SELECT owner, pipeline, chunk, stage, epoch FROM {s}.chunk
             WHERE owner IS NOT NULL AND stage <> 'retired' ORDER BY owner, sealed_event"""
_SHARDS = """SELECT owner, pipeline, shard, epoch FROM {s}.shard
             WHERE owner IS NOT NULL ORDER BY owner, pipeline, shard"""
_SLOTS = """SELECT workspace, holder, epoch, pending_chunk, pending_epoch,
                   extract(epoch FROM now() - pending_since)::float8 AS pending_age
            FROM {s}.create_slot ORDER BY workspace"""
_UNOWNED = """SELECT pipeline, count(*) AS n FROM {s}.chunk
              WHERE owner IS NULL AND stage <> 'retired' GROUP BY pipeline ORDER BY pipeline"""


def _number(value: Decimal | None) -> int | float | None:
    """A counter for JSON: integral amounts (requests) as int, money as float."""
    if value is None:
        return None
    return int(value) if value == value.to_integral_value() else float(value)


async def cluster_status(config: Config) -> dict[str, Any]:
    """The cluster as the database sees it now (see the module docstring)."""
    from batchd.connectors._pg import close_quietly
    from batchd.daemon.cluster import limits, migrations, workers

    conn, sql = await connect_cluster(config, "cluster-status")
    try:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            try:
                version = await migrations.check(conn, sql)
            except SchemaVersionError as exc:
                raise located(config, exc, "schema") from None
            found = await workers.workers(conn, sql)
            chunks = await conn.fetch(sql(_CHUNKS))
            shards = await conn.fetch(sql(_SHARDS))
            slots = await conn.fetch(sql(_SLOTS))
            unowned = await conn.fetch(sql(_UNOWNED))
            counters = await limits.counters(conn, sql)
    finally:
        await close_quietly(conn)
    grace = config.cluster.takeover_grace
    owned: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(
        lambda: {"chunks": [], "shards": [], "create_slots": []})
    for r in chunks:
        owned[r["owner"]]["chunks"].append(
            {"pipeline": r["pipeline"], "chunk": r["chunk"], "stage": r["stage"],
             "epoch": r["epoch"]})
    for r in shards:
        owned[r["owner"]]["shards"].append(
            {"pipeline": r["pipeline"], "shard": r["shard"], "epoch": r["epoch"]})
    for r in slots:
        if r["holder"] is not None:
            owned[r["holder"]]["create_slots"].append(
                {"workspace": r["workspace"], "epoch": r["epoch"]})
    rows = []
    for w in found:
        if w.stopped:
            state = "stopped"
        elif w.alive:
            state = "alive"
        elif w.heartbeat_age > w.lease_ttl + grace:
            state = "dead"
        else:
            state = "silent"
        rows.append({
            "worker_id": w.worker_id, "name": w.name, "host": w.host, "pid": w.pid,
            "state": state, "heartbeat_age": round(w.heartbeat_age, 3),
            "lease_ttl": w.lease_ttl, "fenced": w.fenced, **owned[w.worker_id],
        })
    return {
        "database": describe_target(config),
        "schema": sql.schema,
        "schema_version": version,
        "takeover_grace": grace,
        "workers": rows,
        "create_slots": [
            {"workspace": r["workspace"], "holder": r["holder"], "epoch": r["epoch"],
             "pending_chunk": r["pending_chunk"], "pending_epoch": r["pending_epoch"],
             "pending_age": None if r["pending_age"] is None else round(r["pending_age"], 3)}
            for r in slots
        ],
        "unowned_chunks": {r["pipeline"]: r["n"] for r in unowned},
        "limits": [
            {"scope": c.scope, "cap": _number(c.cap), "reserved": _number(c.reserved),
             "spent": _number(c.spent), "external": _number(c.external),
             "available": _number(c.available)}
            for c in counters
        ],
    }


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
    for w in workers:
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
