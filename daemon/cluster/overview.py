"""
The cluster as its rows say now: every worker, its heartbeat and what it owns.

One reader for every view of the cluster (``batchd cluster status``, ``batchd
status``, the dashboard and the metrics), so they cannot disagree on what a
worker is or holds. It takes no lock; call it inside a read-only repeatable-read
transaction when the parts must describe the same moment. A worker's state is
:meth:`WorkerInfo.state` against the reader's ``takeover_grace``.
"""

from __future__ import annotations

from collections import defaultdict
from decimal import Decimal
from typing import Any

from batchd.daemon.cluster import limits, workers
from batchd.daemon.cluster.schema import Sql
from batchd.daemon.cluster.stray_sweeper import LEASE_SHARD, lease_pipeline

__all__ = ("STOPPED_SHOWN_FOR", "WORKER_STATES", "number", "read_overview", "shown_workers")

WORKER_STATES = ("alive", "silent", "dead", "stopped")
# Seconds a stopped worker stays in the text and page views: every restart is a new
# worker row, kept for a week (the workers' retention pass purges them: cluster/retention.py).
STOPPED_SHOWN_FOR = 3600.0

_CHUNKS = """SELECT owner, pipeline, chunk, stage, epoch FROM {s}.chunk
             WHERE owner IS NOT NULL AND stage <> 'retired' ORDER BY owner, sealed_event"""
_SHARDS = """SELECT owner, pipeline, shard, epoch FROM {s}.shard
             WHERE owner IS NOT NULL ORDER BY owner, pipeline, shard"""
_SLOTS = """SELECT workspace, holder, epoch, pending_chunk, pending_epoch,
                   extract(epoch FROM now() - pending_since)::float8 AS pending_age
            FROM {s}.create_slot ORDER BY workspace"""
_UNOWNED = """SELECT pipeline, count(*) AS n FROM {s}.chunk
              WHERE owner IS NULL AND stage <> 'retired' GROUP BY pipeline ORDER BY pipeline"""


def number(value: Decimal | None) -> int | float | None:
    """A counter for JSON: integral amounts (requests) as int, money as float."""
    if value is None:
        return None
    return int(value) if value == value.to_integral_value() else float(value)


SWEEPER_PREFIX = lease_pipeline("")  # "workspace:", the sweeper lease's pipeline value


async def read_overview(conn: Any, sql: Sql, *, grace: float) -> dict[str, Any]:
    """
    Workers (state, heartbeat age, TTL, fenced count, owned chunks, source shards,
    create slots and the workspaces whose stray sweeper they run), the create slots
    with any pending intent, live chunks nobody owns by pipeline, and every limit
    counter, as plain JSON-ready values.
    """
    found = await workers.workers(conn, sql)
    chunks = await conn.fetch(sql(_CHUNKS))
    shards = await conn.fetch(sql(_SHARDS))
    slots = await conn.fetch(sql(_SLOTS))
    unowned = await conn.fetch(sql(_UNOWNED))
    counters = await limits.counters(conn, sql)
    owned: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(
        lambda: {"chunks": [], "shards": [], "create_slots": [], "sweeps": []})
    for r in chunks:
        owned[r["owner"]]["chunks"].append(
            {"pipeline": r["pipeline"], "chunk": r["chunk"], "stage": r["stage"],
             "epoch": r["epoch"]})
    for r in shards:
        if r["shard"] == LEASE_SHARD and r["pipeline"].startswith(SWEEPER_PREFIX):
            # The workspace's stray sweeper lease: a role, not a source shard.
            owned[r["owner"]]["sweeps"].append(r["pipeline"].removeprefix(SWEEPER_PREFIX))
            continue
        owned[r["owner"]]["shards"].append(
            {"pipeline": r["pipeline"], "shard": r["shard"], "epoch": r["epoch"]})
    for r in slots:
        if r["holder"] is not None:
            owned[r["holder"]]["create_slots"].append(
                {"workspace": r["workspace"], "epoch": r["epoch"]})
    return {
        "takeover_grace": grace,
        "workers": [
            {"worker_id": w.worker_id, "name": w.name, "host": w.host, "pid": w.pid,
             "state": w.state(grace), "heartbeat_age": round(w.heartbeat_age, 3),
             "lease_ttl": w.lease_ttl, "fenced": w.fenced, **owned[w.worker_id]}
            for w in found
        ],
        "create_slots": [
            {"workspace": r["workspace"], "holder": r["holder"], "epoch": r["epoch"],
             "pending_chunk": r["pending_chunk"], "pending_epoch": r["pending_epoch"],
             "pending_age": None if r["pending_age"] is None else round(r["pending_age"], 3)}
            for r in slots
        ],
        "unowned_chunks": {r["pipeline"]: r["n"] for r in unowned},
        "limits": [
            {"scope": c.scope, "cap": number(c.cap), "reserved": number(c.reserved),
             "spent": number(c.spent), "external": number(c.external),
             "available": number(c.available)}
            for c in counters
        ],
    }


def shown_workers(workers: list[dict[str, Any]], *,
                  stopped_for: float = STOPPED_SHOWN_FOR) -> tuple[list[dict[str, Any]], int]:
    """
    The workers a person is shown (all but those stopped more than *stopped_for*
    seconds ago) and how many were left out; ``--json`` keeps every one.
    """
    shown = [w for w in workers
             if w["state"] != "stopped" or w["heartbeat_age"] <= stopped_for]
    return shown, len(workers) - len(shown)
