"""
The web dashboard: server-rendered HTML from the same dict ``batchd status --json`` prints.

No build step, no JavaScript, no write actions: a page that refreshes itself every
few seconds, in the spirit of Sidekiq's web UI or Oban Web, for an operator who
wants to see a run at a glance. Every number carries ``data-field``/``data-value``
attributes with the raw figure, so a test (or a scraper) can compare it with
``status --json`` exactly. Every string shown passes through the log redaction, and
nothing from the config but names and types is shown: no DSN, no API key.
"""

from __future__ import annotations

import time
import urllib.parse
from functools import cache
from importlib import resources
from typing import Any

from batchd.daemon.models.pricing import format_budget
from batchd.daemon.ops.dashboard.markup import age as _age
from batchd.daemon.ops.dashboard.markup import escape as _e

__all__ = ("REFRESH_SECONDS", "render_key", "render_overview")

REFRESH_SECONDS = 5


@cache
def _css() -> str:
    return resources.files(__package__).joinpath("style.css").read_text(encoding="utf-8")


def _num(pipeline: str, field: str, value: Any, shown: str | None = None) -> str:
    raw = "" if value is None else str(value)
    text = shown if shown is not None else (f"{value:,}" if isinstance(value, int) else raw)
    return (f'<b data-pipeline="{_e(pipeline)}" data-field="{_e(field)}" '
            f'data-value="{_e(raw)}">{_e(text)}</b>')


def _page(title: str, body: str, *, refresh: bool, pipelines: list[str], key: str = "",
          pipeline: str = "") -> str:
    options = "".join(f"<option{' selected' if p == pipeline else ''}>{_e(p)}</option>"
                      for p in pipelines)
    meta = f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">' if refresh else ""
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        '<meta name=viewport content="width=device-width,initial-scale=1">'
        f"{meta}<title>{_e(title)}</title><style>{_css()}</style></head><body>"
        '<header><h1><a href="/" style="color:#fff;text-decoration:none">batchd</a></h1>'
        f'<span class=meta>{_e(title)} · {time.strftime("%Y-%m-%d %H:%M:%S %Z")}'
        f'{f" · refreshes every {REFRESH_SECONDS}s" if refresh else ""}</span>'
        '<form action="/key" method="get" role="search">'
        f'<select name="pipeline" aria-label="pipeline">{options}</select>'
        f'<input name="key" placeholder="a record key" aria-label="key" value="{_e(key)}" '
        'required><button type="submit">Show history</button></form></header>'
        f"<main>{body}</main></body></html>"
    )


def _key_link(pipeline: str, key: str) -> str:
    query = urllib.parse.urlencode({"pipeline": pipeline, "key": key})
    return f'<a href="/key?{_e(query)}"><code>{_e(key)}</code></a>'


def _pipeline_section(p: dict[str, Any], dead: list[dict[str, Any]]) -> str:
    name = p["name"]
    progress = p["progress"]
    total = progress["rows_total"]
    percent = 100 * progress["fraction"]
    basis = {"bytes": "file bytes", "rows": "table row estimate", "messages": "topic offsets",
             "rows read": "rows read so far"}.get(progress["basis"], progress["basis"])
    paused = f'<span class=paused>PAUSED: {_e(p["paused"])}</span>' if p["paused"] else ""
    of_total = (f' of {"~" if p["rows_read"] < (total or 0) else ""}'
                f'{_num(name, "rows_total", total)}' if total is not None else "")
    parts = [
        f'<section data-pipeline-section="{_e(name)}"><h2>{_e(name)}{paused}</h2>',
        f'<div class=bar><div style="width:{percent:.1f}%"></div></div>',
        f'<div>{_num(name, "rows_done", p["rows_done"])}{of_total} rows terminal · '
        f'{_num(name, "fraction", progress["fraction"], f"{percent:.0f}%")} '
        f'<span class=mute>by {_e(basis)}</span></div>',
        "<h3>Rows by outcome</h3><div class=cards>",
    ]
    cards = [("succeeded", "succeeded", "ok"), ("truncated", "truncated", "warn"),
             ("dead_lettered", "dead-lettered", "bad"), ("retried", "retried (transient)", ""),
             ("rows_pending", "in flight", ""), ("rows_read", "read from source", ""),
             ("requests_submitted", "requests sent", ""), ("batches_submitted", "batches", "")]
    for field, label, tone in cards:
        parts.append(f'<div class="card {tone}">{_num(name, field, p[field])}'
                     f"<span>{_e(label)}</span></div>")
    parts.append("</div><h3>Cost</h3><div class=cards>")
    cost = p["cost_usd"]
    parts.append(f'<div class=card>{_num(name, "cost_usd", cost, f"${cost:,.4f}")}'
                 "<span>spent (batch prices)</span></div>")
    budget = p["budget_usd"]
    if budget:
        parts.append(f'<div class=card>{_num(name, "budget_usd", budget, format_budget(budget))}'
                     f"<span>budget · {100 * cost / budget:.0f}% used</span></div>")
    parts.append(f'<div class=card>{_num(name, "input_tokens", p["input_tokens"])}'
                 "<span>input tokens</span></div>"
                 f'<div class=card>{_num(name, "output_tokens", p["output_tokens"])}'
                 "<span>output tokens</span></div></div>")
    parts.append("<h3>Live batches</h3>")
    if p["batches"]:
        owned = any("owner" in b for b in p["batches"])  # cluster mode: whose chunk it is
        parts.append("<table><tr><th>chunk</th><th>batch</th><th>stage</th><th>requests</th>"
                     "<th>attempt</th><th>age</th><th>API counts</th>"
                     f"{'<th>owner</th>' if owned else ''}</tr>")
        for b in p["batches"]:
            counts = b.get("counts") or {}
            shown = ", ".join(f"{k} {v}" for k, v in counts.items() if v) or "-"
            owner = f"<td><code>{_e(b.get('owner') or '(none)')}</code></td>" if owned else ""
            parts.append(
                f"<tr data-batch=\"{_e(b['batch_id'] or '')}\"><td><code>{_e(b['chunk'])}</code>"
                f"</td><td><code>{_e(b['batch_id'] or '-')}</code></td><td>{_e(b['stage'])}</td>"
                f"<td class=num>{b['requests']:,}</td><td class=num>{b['attempt']}</td>"
                f"<td class=num>{_age(b.get('age_seconds'))}</td><td>{_e(shown)}</td>"
                f"{owner}</tr>")
        parts.append("</table>")
    else:
        parts.append("<p class=none>none</p>")
    parts.append("<h3>Newest dead letters</h3>")
    if dead:
        parts.append("<table><tr><th>key</th><th>error</th><th>attempts</th><th>reason</th></tr>")
        for row in dead:
            message = str(row.get("error_message") or "")[:240]
            parts.append(
                f"<tr class=dead><td>{_key_link(name, str(row.get('key')))}</td>"
                f"<td><code>{_e(row.get('error_type'))}</code></td>"
                f"<td class=num>{_e(row.get('attempts'))}</td><td>{_e(message)}</td></tr>")
        parts.append("</table>")
    else:
        parts.append("<p class=none>none</p>")
    parts.append("</section>")
    return "".join(parts)


def render_overview(
    status: dict[str, Any], dead_letters: dict[str, list[dict[str, Any]]], *, title: str
) -> str:
    """The main page: every pipeline, then the newest alarms."""
    names = [p["name"] for p in status["pipelines"]]
    body = [_pipeline_section(p, dead_letters.get(p["name"], [])) for p in status["pipelines"]]
    if status.get("store") == "postgres":
        from batchd.daemon.ops.dashboard.cluster import cluster_section

        body.append(cluster_section(status.get("cluster") or {
            "workers": [], "error": "not read yet (the first read is under way)"}))
    alarms = list(reversed(status["alarms"]))[:10]
    body.append("<section><h2>Newest alarms</h2>")
    if alarms:
        body.append("<table><tr><th>when</th><th>pipeline</th><th>alarm</th><th>message</th>"
                    "</tr>")
        for a in alarms:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(a["ts"])) if a["ts"] else "-"
            body.append(f"<tr class=alarm><td>{_e(when)}</td><td>{_e(a['pipeline'] or '-')}</td>"
                        f"<td><code>{_e(a['kind'])}</code></td><td>{_e(a['message'])}</td></tr>")
        body.append("</table>")
    else:
        body.append("<p class=none>none</p>")
    body.append("</section>")
    return _page(title, "".join(body), refresh=True, pipelines=names)


def render_key(history: dict[str, Any], *, title: str, pipelines: list[str]) -> str:
    """One key's history (``batchd show``), with the search box to look up another."""
    key, name = history["key"], history["pipeline"]
    read = history["read"]
    where = (", ".join(f"{k} {v}" for k, v in (read["position"] or {}).items())
             if read else "not in the key ledger (not read yet, or not a usable row)")
    rows = [("outcome", history["outcome"]), ("reason", history.get("reason")),
            ("read into chunk", read["chunk"] if read else None), ("source position", where),
            ("custom_id", history["custom_id"]),
            ("cost", f"${history['cost_usd']:.6f}" if history["cost_usd"] is not None else None)]
    body = [f'<section><h2>{_e(key)} <span class=mute>in {_e(name)}</span></h2><table>']
    for label, value in rows:
        if value is not None:
            body.append(f"<tr><th>{_e(label)}</th><td data-field=\"{_e(label)}\">{_e(value)}"
                        "</td></tr>")
    body.append("</table><h3>Attempts</h3>")
    if history["attempts"]:
        body.append("<table><tr><th>#</th><th>outcome</th><th>batch</th><th>chunk</th>"
                    "<th>error</th></tr>")
        for a in history["attempts"]:
            error = f"{a['error_type']}: {a['error_message']}" if a["error_type"] else ""
            body.append(f"<tr class=attempt><td class=num>{a['attempt']}</td>"
                        f"<td>{_e(a['outcome'])}</td><td><code>{_e(a['batch_id'] or '-')}"
                        f"</code></td><td><code>{_e(a['chunk'] or '-')}</code></td>"
                        f"<td>{_e(error)}</td></tr>")
        body.append("</table>")
    else:
        body.append("<p class=none>none</p>")
    for dup in history.get("duplicates", ()):
        where = ", ".join(f"{k} {v}" for k, v in (dup["position"] or {}).items()) or "-"
        body.append(f"<p class=duplicate>duplicate: read again at {_e(where)}, not sent "
                    f"({_e(dup['error_type'])}: {_e(dup['error_message'])})</p>")
    body.append("<h3>Where it landed</h3>")
    if history["landed"]:
        body.append("<table><tr><th>sink</th><th>where</th><th>value</th></tr>")
        for landed in history["landed"]:
            row = landed["row"]
            value = row.get("output") if "output" in row else row.get("error_type")
            body.append(f"<tr><td>{_e(landed['sink'])} ({_e(landed['type'])})</td>"
                        f"<td><code>{_e(landed['where'])}</code></td><td>{_e(value)}</td></tr>")
        body.append("</table>")
    else:
        body.append("<p class=none>nowhere yet</p>")
    for note in history["notes"]:
        body.append(f"<p class=mute>{_e(note)}</p>")
    body.append("</section>")
    return _page(title, "".join(body), refresh=False, pipelines=pipelines, key=key,
                 pipeline=name)
