"""
``batchd status``: what the manifest says, for a human or a script.

It reads the manifest file without taking the daemon's lock (read-only,
never truncating), so it works while the daemon runs. The daemon builds the
very same dict from its in-memory state for the dashboard (:func:`status_of`),
so the page and ``status --json`` cannot disagree on a number.

In cluster mode (``[cluster] store = "postgres"``) the local state dir holds
nothing: the pipelines' progress, their live chunks (every worker's) and the
key ledger are read from the shared store instead, in the same snapshot as the
cluster's workers, their heartbeats and what each owns
(:func:`batchd.daemon.commands.cluster_status.read_cluster`), shown under
``cluster``. A database that cannot be reached is one line naming the DSN's
``user@host:port/db`` and a non-zero exit, never a status of an empty state dir.
"""

from __future__ import annotations

import functools
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from batchd.daemon.batches.queue_limit import queue_limit_of
from batchd.daemon.config import Config
from batchd.daemon.intake.ledger import LEDGER_NAME, ledger_summary
from batchd.daemon.models.pricing import format_budget
from batchd.daemon.ops.progress import MeasuredSize, progress_of, source_sizes
from batchd.daemon.wal.manifest import MANIFEST_NAME, replay
from batchd.daemon.wal.manifest_state import ManifestState

if TYPE_CHECKING:  # rich is imported where it draws: `batchd run` reads progress lines only
    from rich.console import Console, RenderableType

__all__ = ("cluster_renderables", "collect_status", "read_state", "render_status", "status_of",
           "status_renderable")

_IN_FLIGHT = ("sealed", "intent", "submitted", "ended")
_UNITS = {"bytes": "file bytes", "rows": "table row estimate", "messages": "topic offsets"}


def read_state(config: Config) -> ManifestState:
    """The manifest's state as the daemon last wrote it (empty if it never ran)."""
    path = Path(config.state_dir) / MANIFEST_NAME
    if not path.exists():
        return ManifestState()
    state, _ = replay(path, truncate=False)
    return state


def collect_status(config: Config, *, sizes: bool = True) -> dict[str, Any]:
    """
    Status from the manifest on disk (or the cluster's store), with each source's size
    unless ``sizes`` is off.

    Raises:
        ConfigError: cluster mode and the DSN or schema is wrong (exit 2).
        RetriableError: cluster mode and the database did not answer (exit 1).
    """
    cluster: dict[str, Any] | None = None
    ledger: dict[str, Any] | None = None
    if config.cluster.shared:
        from batchd.daemon.commands.cluster_status import cluster_status

        read = anyio.run(functools.partial(cluster_status, config, progress=True))
        assert read.state is not None
        state, cluster, ledger = read.state, read.overview, read.ledger
    else:
        state = read_state(config)
    found: dict[str, MeasuredSize | None] = {}
    if sizes:
        measured = anyio.run(source_sizes, config, _positions(config, state))
        for name, size in measured.items():
            ps = state.pipelines.get(name)
            found[name] = None if size is None else MeasuredSize(
                size, (ps.last_sealed_seq or 0) if ps else 0)
    return status_of(config, state, found, cluster=cluster, ledger=ledger)


def _positions(config: Config, state: ManifestState) -> dict[str, dict[str, Any] | None]:
    out: dict[str, dict[str, Any] | None] = {}
    for pipeline in config.pipelines:
        ps = state.pipelines.get(pipeline.name)
        out[pipeline.name] = ps.last_sealed_position if ps else None
    return out


def _age(created_at: str | None, now: float) -> float | None:
    from batchd.daemon.batches.api import timestamp

    try:
        return round(max(now - timestamp(created_at), 0.0), 1) if created_at else None
    except (TypeError, ValueError):
        return None


def status_of(
    config: Config,
    state: ManifestState,
    sizes: dict[str, MeasuredSize | None] | None = None,
    *,
    cluster: dict[str, Any] | None = None,
    ledger: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """
    The status dict (``status --json``) of ``state``; ``sizes`` by pipeline name.

    In cluster mode, *cluster* is the overview of the workers (each live chunk then
    names its ``owner``) and *ledger* the shared key ledger's summary, if it was read.
    """
    sizes = sizes or {}
    now = time.time()
    owners = {c["chunk"]: w["worker_id"] for w in (cluster or {}).get("workers", ())
              for c in w["chunks"]}
    pipelines = []
    for pipeline in config.pipelines:
        ps = state.pipelines.get(pipeline.name)
        chunks = [c for c in state.chunks.values() if c.pipeline == pipeline.name]
        stages = Counter(c.stage.value for c in chunks)
        batches = [
            {
                "chunk": c.chunk,
                "batch_id": c.batch_id,
                "stage": c.stage.value,
                "requests": c.requests,
                "attempt": c.attempt,
                "counts": c.counts,
                "created_at": c.created_at,
                "age_seconds": _age(c.created_at, now),
                **({"owner": owners.get(c.chunk)} if config.cluster.shared else {}),
            }
            for c in chunks
        ]
        done = ps.rows_done if ps else 0
        pending = sum(c.requests + c.rejects for c in chunks if c.stage.value in _IN_FLIGHT)
        rows_read = (ps.last_sealed_seq or 0) if ps else 0
        measured = sizes.get(pipeline.name)
        size = measured.size if measured else None
        pipelines.append({
            "name": pipeline.name,
            "paused": ps.paused if ps else None,
            "pause_kind": ps.pause_kind if ps else None,
            "chunks_by_stage": dict(stages),
            "batches": batches,
            "rows_read": rows_read,
            "rows_done": done,
            "rows_pending": pending,
            "succeeded": ps.succeeded if ps else 0,
            "truncated": ps.truncated if ps else 0,
            "dead_lettered": ps.dead_letters if ps else 0,
            "retried": ps.retried if ps else 0,
            "requests_submitted": ps.requests_submitted if ps else 0,
            "batches_submitted": ps.batches_submitted if ps else 0,
            "input_tokens": ps.input_tokens if ps else 0,
            "output_tokens": ps.output_tokens if ps else 0,
            "cost_usd": round(ps.cost_usd, 6) if ps else 0.0,
            "unpriced": ps.unpriced if ps else 0,
            "budget_usd": pipeline.budget_usd,
            "source_committed_seq": ps.committed_seq if ps else None,
            "source_size": (None if size is None else
                            {"unit": size.unit, "total": size.total, "done": size.done}),
            "progress": progress_of(rows_read, done, pending, size,
                                    measured.rows_read if measured else None),
        })
    alarms = [
        {"pipeline": a.pipeline, "chunk": a.chunk, "kind": a.kind, "message": a.message, "ts": a.ts}
        for a in list(state.alarms)[-20:]
    ]
    names = [p.name for p in config.pipelines]
    if config.cluster.shared:
        where = (None if cluster is None else
                 f"{cluster['schema']}.key_ledger in {cluster['database']}")
        ledger = (None if ledger is None else
                  {"path": where, "bytes": ledger["bytes"], "keys": ledger["keys"]})
    else:
        ledger = ledger_summary(Path(config.state_dir) / LEDGER_NAME, names)
    for entry, pipeline in zip(pipelines, config.pipelines, strict=True):
        entry["ledger_keys"] = None if ledger is None else ledger["keys"].get(pipeline.name, 0)
        entry["ledger_retention_seconds"] = pipeline.ledger_retention
    limit, origin = queue_limit_of(config.api)
    out = {
        "state_dir": str(config.state_dir),
        "store": "postgres" if config.cluster.shared else "local",
        "api_version": config.api.version,
        "queue_limit": limit,
        "queue_limit_from": origin,
        "pipelines": pipelines,
        "alarms": alarms,
        "ledger": None if ledger is None else {"path": ledger["path"], "bytes": ledger["bytes"]},
    }
    if config.cluster.shared:
        out["cluster"] = cluster
    return out


def progress_line(p: dict[str, Any]) -> str:
    """``1,234 of ~3,000 rows terminal (41%, by file bytes)``: one pipeline's progress."""
    progress = p["progress"]
    total = progress["rows_total"]
    basis = progress["basis"]
    if total is None:
        return f"{p['rows_done']:,} rows terminal (source not read yet)"
    approx = "~" if basis not in ("rows read",) and p["rows_read"] < total else ""
    by = "rows read so far" if basis == "rows read" else _UNITS.get(basis, basis)
    return (f"{p['rows_done']:,} of {approx}{total:,} rows terminal "
            f"({100 * progress['fraction']:.0f}%, by {by})")


def status_renderable(status: dict[str, Any]) -> RenderableType:
    """Everything ``batchd status`` shows, as one rich renderable (also what --watch redraws)."""
    from rich.console import Group
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    parts: list[RenderableType] = []
    parts.append(Text(f"API version {status['api_version']}, processing queue limit "
                      f"{status['queue_limit']:,} ({status['queue_limit_from']})"))
    if status.get("cluster"):  # first: --watch crops what does not fit the terminal
        parts.extend(cluster_renderables(status["cluster"]))
    for p in status["pipelines"]:
        title = Text.from_markup(f"[bold]{p['name']}[/bold]")
        if p["paused"]:
            kind = f" ({p['pause_kind']})" if p.get("pause_kind") else ""
            title.append(f"  PAUSED{kind}: {p['paused']}", style="red")
        parts.append(title)
        total = p["progress"]["rows_total"] or max(p["rows_done"], 1)
        bar = ProgressBar(total=max(total, 1), completed=p["rows_done"], width=24)
        line = Table.grid(padding=(0, 1))
        line.add_row(bar, progress_line(p))
        parts.append(line)
        summary = Table(show_header=True, header_style="bold")
        for col in ("succeeded", "truncated", "dead-lettered", "retried", "batches", "cost"):
            summary.add_column(col, justify="right")
        cost = f"${p['cost_usd']:.4f}"
        if p["budget_usd"]:
            cost += f" / {format_budget(p['budget_usd'])}"
        if p["unpriced"]:
            cost += f" + {p['unpriced']:,} answers of unpriced models"
        summary.add_row(
            f"{p['succeeded']:,}", f"{p['truncated']:,}", f"{p['dead_lettered']:,}",
            f"{p['retried']:,}", f"{p['batches_submitted']:,}", cost,
        )
        parts.append(summary)
        if p["batches"]:
            owned = any("owner" in b for b in p["batches"])
            table = Table("chunk", "batch", "stage", "requests", "attempt", "age",
                          *(("owner",) if owned else ()), title="live chunks")
            for b in p["batches"]:
                age = "-" if b["age_seconds"] is None else _duration(b["age_seconds"])
                table.add_row(b["chunk"], b["batch_id"] or "-", b["stage"], str(b["requests"]),
                              str(b["attempt"]), age,
                              *((b.get("owner") or "(none)",) if owned else ()))
            parts.append(table)
    ledger = status.get("ledger")
    if ledger:
        keys = sum(p.get("ledger_keys") or 0 for p in status["pipelines"])
        parts.append(Text(f"key ledger: {keys:,} keys, {ledger['bytes'] / 1e6:.1f} MB "
                          f"({ledger['path']})"))
    if status["alarms"]:
        table = Table("pipeline", "chunk", "alarm", "message", title="recent alarms")
        for a in status["alarms"]:
            table.add_row(a["pipeline"] or "-", a["chunk"] or "-", a["kind"], a["message"])
        parts.append(table)
    return Group(*parts)


def cluster_renderables(cluster: dict[str, Any]) -> list[RenderableType]:
    """The cluster's workers (state, heartbeat, what each owns) and its limit counters."""
    from rich.table import Table
    from rich.text import Text

    from batchd.daemon.cluster.overview import shown_workers

    workers = cluster["workers"]
    alive = sum(1 for w in workers if w["state"] == "alive")
    parts: list[RenderableType] = [Text(
        f"cluster: {len(workers)} workers ({alive} alive), schema {cluster['schema']!r} "
        f"in {cluster['database']}")]
    # The worker id is <host>:<pid>/<random> already: no host and pid columns to crowd it.
    table = Table("worker", "state", "heartbeat", "chunks", "shards", "create slots", "fenced",
                  title="cluster workers")
    table.columns[0].overflow = "fold"
    shown, hidden = shown_workers(workers)
    for w in shown:
        style = {"alive": "green", "silent": "yellow", "dead": "red"}.get(w["state"], "")
        shards = ", ".join(f"{h['pipeline']}/{h['shard']}" for h in w["shards"]) or "-"
        table.add_row(w["worker_id"], Text(w["state"], style=style),
                      f"{_duration(w['heartbeat_age'])} ago", str(len(w["chunks"])), shards,
                      ", ".join(s["workspace"] for s in w["create_slots"]) or "-",
                      str(w["fenced"]))
    parts.append(table)
    if hidden:
        parts.append(Text(f"and {hidden} workers stopped over an hour ago "
                          "(batchd cluster status --json lists them)", style="dim"))
    for pipeline, count in cluster["unowned_chunks"].items():
        parts.append(Text(f"unowned chunks of {pipeline}: {count} (the next live worker "
                          "claims them)"))
    if cluster["limits"]:
        limits = Table("scope", "cap", "reserved", "spent", "external", "available",
                       title="cluster limits")
        for c in cluster["limits"]:
            limits.add_row(c["scope"], *("-" if c[k] is None else f"{c[k]:,}" for k in
                                          ("cap", "reserved", "spent", "external", "available")))
        parts.append(limits)
    return parts


def render_status(status: dict[str, Any], console: Console) -> None:
    console.print(status_renderable(status))


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"
