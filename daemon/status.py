"""
``batchd status``: what the manifest says, for a human or a script.

It reads the manifest file without taking the daemon's lock (read-only,
never truncating), so it works while the daemon runs.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress_bar import ProgressBar
from rich.table import Table

from daemon.config import Config
from daemon.manifest import MANIFEST_NAME, replay
from daemon.queue_limit import queue_limit_of

__all__ = ("collect_status", "render_status")


def collect_status(config: Config) -> dict[str, Any]:
    path = Path(config.state_dir) / MANIFEST_NAME
    if path.exists():
        state, _ = replay(path, truncate=False)
    else:
        from daemon.manifest_state import ManifestState

        state = ManifestState()
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
            }
            for c in chunks
        ]
        done = ps.rows_done if ps else 0
        pending = sum(c.requests + c.rejects for c in chunks if c.stage.value in (
            "sealed", "intent", "submitted", "ended"))
        pipelines.append({
            "name": pipeline.name,
            "paused": ps.paused if ps else None,
            "pause_kind": ps.pause_kind if ps else None,
            "chunks_by_stage": dict(stages),
            "batches": batches,
            "rows_read": ps.last_sealed_seq or 0 if ps else 0,
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
        })
    alarms = [
        {"pipeline": a.pipeline, "chunk": a.chunk, "kind": a.kind, "message": a.message, "ts": a.ts}
        for a in list(state.alarms)[-20:]
    ]
    limit, origin = queue_limit_of(config.api)
    return {
        "state_dir": str(config.state_dir),
        "api_version": config.api.version,
        "queue_limit": limit,
        "queue_limit_from": origin,
        "pipelines": pipelines,
        "alarms": alarms,
    }


def render_status(status: dict[str, Any], console: Console) -> None:
    console.print(f"API version {status['api_version']}, processing queue limit "
                  f"{status['queue_limit']:,} ({status['queue_limit_from']})")
    for p in status["pipelines"]:
        total = max(p["rows_read"], p["rows_done"] + p["rows_pending"])
        title = f"[bold]{p['name']}[/bold]"
        if p["paused"]:
            kind = f" ({p['pause_kind']})" if p.get("pause_kind") else ""
            title += f"  [red]PAUSED{kind}: {p['paused']}[/red]"
        console.print(title)
        bar = ProgressBar(total=max(total, 1), completed=p["rows_done"], width=40)
        console.print(bar, f" {p['rows_done']:,}/{total:,} rows terminal")
        summary = Table(show_header=True, header_style="bold")
        for col in ("succeeded", "truncated", "dead-lettered", "retried", "batches", "cost"):
            summary.add_column(col, justify="right")
        cost = f"${p['cost_usd']:.4f}"
        if p["budget_usd"]:
            cost += f" / ${p['budget_usd']:.2f}"
        if p["unpriced"]:
            cost += f" + {p['unpriced']:,} answers of unpriced models"
        summary.add_row(
            f"{p['succeeded']:,}", f"{p['truncated']:,}", f"{p['dead_lettered']:,}",
            f"{p['retried']:,}", f"{p['batches_submitted']:,}", cost,
        )
        console.print(summary)
        if p["batches"]:
            table = Table("chunk", "batch", "stage", "requests", "attempt", title="live chunks")
            for b in p["batches"]:
                table.add_row(b["chunk"], b["batch_id"] or "-", b["stage"], str(b["requests"]),
                              str(b["attempt"]))
            console.print(table)
    if status["alarms"]:
        table = Table("pipeline", "chunk", "alarm", "message", title="recent alarms")
        for a in status["alarms"]:
            table.add_row(a["pipeline"] or "-", a["chunk"] or "-", a["kind"], a["message"])
        console.print(table)
