"""
The dashboard's cluster section: every worker, its heartbeat and what it owns.

Shown only in cluster mode, from the status dict's ``cluster`` entry (the
overview this worker last read, :mod:`batchd.daemon.ops.cluster_watch`). A read
that fails leaves the last overview on the page with a line saying since when it
could not be refreshed and why; the page itself never waits on the database.
Each worker row carries ``data-worker`` and each figure ``data-field`` and
``data-value``, like every number on the page, so a test compares them exactly.
"""

from __future__ import annotations

import time
from typing import Any

from batchd.daemon.cluster.overview import shown_workers
from batchd.daemon.ops.dashboard.markup import age as _age
from batchd.daemon.ops.dashboard.markup import escape as _e

__all__ = ("cluster_section",)

_TONE = {"alive": "ok", "silent": "warn", "dead": "bad", "stopped": "mute"}


def _cell(worker: str, field: str, value: Any, shown: str) -> str:
    return (f'<td class=num data-worker="{_e(worker)}" data-field="{_e(field)}" '
            f'data-value="{_e(value)}">{_e(shown)}</td>')


def cluster_section(cluster: dict[str, Any]) -> str:
    """The workers table, unowned chunks, pending intents and the limit counters."""
    workers = cluster["workers"]
    alive = sum(1 for w in workers if w["state"] == "alive")
    me = cluster.get("this_worker")
    parts = ['<section data-cluster><h2>Cluster workers</h2>',
             f'<p>{len(workers)} workers, {alive} alive · schema '
             f'<code>{_e(cluster.get("schema", "-"))}</code> in '
             f'<code>{_e(cluster.get("database", "-"))}</code>']
    if cluster.get("read_age_seconds") is not None:
        parts.append(f' · read {_age(cluster["read_age_seconds"])} ago')
    parts.append("</p>")
    if cluster.get("error"):
        since = cluster.get("failing_since")
        when = time.strftime("%H:%M:%S", time.localtime(since)) if since else "-"
        parts.append(f'<p class="paused store-error">cannot read the cluster\'s database '
                     f'since {_e(when)}: {_e(cluster["error"])}</p>')
    shown, hidden = shown_workers(workers)
    if shown:
        parts.append("<table><tr><th>worker</th><th>state</th><th>heartbeat</th><th>host</th>"
                     "<th>pid</th><th>chunks</th><th>shards</th><th>create slots</th>"
                     "<th>fenced</th></tr>")
        for w in shown:
            wid = w["worker_id"]
            mark = " <span class=mute>(this one)</span>" if wid == me else ""
            tone = _TONE.get(w["state"], "")
            shards = ", ".join(f"{h['pipeline']}/{h['shard']}" for h in w["shards"]) or "-"
            slots = ", ".join(s["workspace"] for s in w["create_slots"]) or "-"
            parts.append(
                f'<tr data-worker="{_e(wid)}" data-state="{_e(w["state"])}">'
                f"<td><code>{_e(wid)}</code>{mark}</td>"
                f'<td class="{tone}" data-worker="{_e(wid)}" data-field="state" '
                f'data-value="{_e(w["state"])}">{_e(w["state"])}</td>'
                f'{_cell(wid, "heartbeat_age", w["heartbeat_age"], _age(w["heartbeat_age"]))}'
                f"<td>{_e(w['host'])}</td><td class=num>{_e(w['pid'])}</td>"
                f'{_cell(wid, "chunks", len(w["chunks"]), str(len(w["chunks"])))}'
                f"<td>{_e(shards)}</td><td>{_e(slots)}</td>"
                f'{_cell(wid, "fenced", w["fenced"], str(w["fenced"]))}</tr>')
        parts.append("</table>")
    else:
        parts.append("<p class=none>none</p>")
    if hidden:
        parts.append(f"<p class=mute>and {hidden} workers stopped over an hour ago "
                     "(<code>batchd cluster status --json</code> lists them)</p>")
    for pipeline, count in cluster.get("unowned_chunks", {}).items():
        parts.append(f"<p>unowned chunks of {_e(pipeline)}: {count:,} "
                     "<span class=mute>(the next live worker claims them)</span></p>")
    for s in cluster.get("create_slots", ()):
        if s["pending_chunk"] is not None:
            parts.append(f"<p>create slot {_e(s['workspace'])}: pending intent of chunk "
                         f"<code>{_e(s['pending_chunk'])}</code> for "
                         f"{_age(s['pending_age'])}</p>")
    if cluster.get("limits"):
        parts.append("<h3>Limits</h3><table><tr><th>scope</th><th>cap</th><th>reserved</th>"
                     "<th>spent</th><th>external</th><th>available</th></tr>")
        for c in cluster["limits"]:
            cells = "".join(
                f'<td class=num data-scope="{_e(c["scope"])}" data-field="{k}" '
                f'data-value="{_e("" if c[k] is None else c[k])}">'
                f'{"-" if c[k] is None else _e(f"{c[k]:,}")}</td>'
                for k in ("cap", "reserved", "spent", "external", "available"))
            parts.append(f"<tr><td><code>{_e(c['scope'])}</code></td>{cells}</tr>")
        parts.append("</table>")
    parts.append("</section>")
    return "".join(parts)
