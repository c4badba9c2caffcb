"""The human form of a key's history (``batchd show`` without ``--json``)."""

from __future__ import annotations

from typing import Any

__all__ = ("history_lines",)


def history_lines(history: dict[str, Any]) -> list[str]:
    key, pipeline = history["key"], history["pipeline"]
    lines = [f"{key}  (pipeline {pipeline})", f"  outcome:    {history['outcome']}"]
    if history.get("reason"):
        lines.append(f"  reason:     {history['reason']}")
    read = history["read"]
    if read is None:
        lines.append("  read:       not in the key ledger (not read yet, or not a usable row)")
    else:
        where = ", ".join(f"{k} {v}" for k, v in (read['position'] or {}).items()) or "-"
        chunk = f"into chunk {read['chunk']} " if read["chunk"] else ""
        lines.append(f"  read:       {chunk}at {where}")
    if history["custom_id"]:
        lines.append(f"  custom_id:  {history['custom_id']}")
    if history["cost_usd"] is not None:
        lines.append(f"  cost:       ${history['cost_usd']:.6f}")
    for a in history["attempts"]:
        error = f"  {a['error_type']}: {a['error_message']}" if a["error_type"] else ""
        if not error and a["outcome"] == "retried":
            error = "  (its error is not kept once the retry chunk has retired)"
        lines.append(f"  attempt {a['attempt']}:  {a['outcome']:<12} batch {a['batch_id'] or '-'}"
                     f" (chunk {a['chunk'] or '-'}){error}")
    for dup in history.get("duplicates", ()):
        where = ", ".join(f"{k} {v}" for k, v in (dup["position"] or {}).items()) or "-"
        lines.append(f"  duplicate:  read again at {where}, not sent  {dup['error_type']}: "
                     f"{dup['error_message']}")
    for landed in history["landed"]:
        row = landed["row"]
        what = row.get("output") if "output" in row else row.get("error_type")
        lines.append(f"  landed:     {landed['sink']} ({landed['type']}) {landed['where']}"
                     f" -> {what!r}")
    lines += [f"  note:       {note}" for note in history["notes"]]
    return lines
