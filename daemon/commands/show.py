"""
``batchd show CONFIG KEY``: one key's story, from the files the daemon keeps anyway.

Nothing extra is recorded for it. The story is assembled from:

* the key ledger (``keys.sqlite``): which chunk read the key and at what source position;
* the manifest: that chunk and its retry chunks, their batches and stages;
* the spool of a chunk still live: the request's ``custom_id``, attempt and the errors
  of earlier attempts;
* the sinks that can be searched (those with the ``find_rows`` capability: the
  built-in JSONL and SQLite sinks) and every dead letter written for the key, whose
  ``history`` lists each failed attempt with its batch and error.

It reads only, so it works beside a running daemon and on a stopped one's state.
The errors of attempts that failed and were retried *successfully* are kept in
the retry chunk's spool, which is removed once the chunk retires; after that the
batch ids of those attempts are still shown, their error types no longer.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import orjson

from batchd.daemon.config import Config, PipelineConfig, PluginSpec
from batchd.daemon.factories import build_sink
from batchd.daemon.intake.spool import iter_spool
from batchd.daemon.wal.chunk_ids import attempt_of, root_of
from batchd.daemon.wal.manifest_state import ManifestState
from batchd.daemon.wal.state_db import check_ledger
from batchd.plugins.contract import FoundRow, RowFinder
from batchd.plugins.errors import BatchdError

__all__ = ("chunk_family", "key_history")

FamilyFn = Callable[[str], list[dict[str, Any]]]


def chunk_family(state: ManifestState, pipeline: str, root: str) -> list[dict[str, Any]]:
    """The chunk ``root`` and its retry chunks: live ones with their stage, retired ones."""
    family: dict[str, dict[str, Any]] = {}
    for batch_id, retired in state.retired_batches.items():
        if root_of(pipeline, retired) == root:
            family[retired] = {"chunk": retired, "batch_id": batch_id, "stage": "retired",
                               "attempt": attempt_of(retired)}
    for chunk_id, pipeline_name in state.retired_chunks.items():
        if pipeline_name == pipeline and root_of(pipeline, chunk_id) == root:
            family.setdefault(chunk_id, {"chunk": chunk_id, "batch_id": None,
                                         "stage": "retired", "attempt": attempt_of(chunk_id)})
    for chunk in state.chunks.values():
        if chunk.pipeline == pipeline and root_of(pipeline, chunk.chunk) == root:
            family[chunk.chunk] = {"chunk": chunk.chunk, "batch_id": chunk.batch_id,
                                   "stage": chunk.stage.value, "attempt": chunk.attempt,
                                   "created_at": chunk.created_at, "counts": chunk.counts}
    return sorted(family.values(), key=lambda c: (c["attempt"], c["chunk"]))


def _ledger(state_dir: Path, pipeline: str, key: str) -> dict[str, Any] | None:
    path = state_dir / "keys.sqlite"
    check_ledger(path, allow_empty=True)
    if not path.exists() or path.stat().st_size == 0:
        return None
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        found = db.execute("SELECT chunk, position FROM keys WHERE pipeline = ? AND key = ?",
                           (pipeline, key)).fetchone()
    if found is None:
        return None
    chunk, position = found
    try:
        decoded = orjson.loads(position) if position else None
    except orjson.JSONDecodeError:
        decoded = None
    return {"chunk": chunk, "position": decoded}


def _search_sink(config: Config, pipeline: str, spec: PluginSpec, key: str,
                 groups: list[str] | None) -> list[FoundRow] | str:
    """The key's rows in one sink, or why it cannot be searched (a note for the operator)."""
    try:
        sink = build_sink(config, pipeline, spec)
        if not isinstance(sink, RowFinder):
            return "cannot be searched by batchd; look the key up in it directly"
        return list(sink.find_rows(key, groups=groups))
    except BatchdError as exc:  # a sink validate would refuse, or storage it cannot read
        return f"cannot be searched: {exc}"


def _spool_entries(state_dir: Path, family: list[dict[str, Any]], key: str,
                   ) -> list[tuple[dict[str, Any], dict[str, Any], bool]]:
    """(chunk, meta, is a request) for the key in every live chunk's spool."""
    found = []
    for chunk in family:
        if chunk["stage"] == "retired":
            continue
        path = state_dir / "spool" / f"{chunk['chunk']}.jsonl"
        if not path.exists():
            continue
        needle = orjson.dumps(key)
        try:
            for request, meta in iter_spool(path):
                if meta.get("key") == key or (needle in orjson.dumps(meta.get("key"))
                                              and str(meta.get("key")) == key):
                    found.append((chunk, meta, request is not None))
        except (OSError, orjson.JSONDecodeError):
            continue
    return found


def key_history(
    config: Config,
    pipeline: PipelineConfig,
    key: str,
    *,
    family_of: FamilyFn | None = None,
) -> dict[str, Any]:
    """
    Everything known about ``key`` in ``pipeline``; ``family_of(root)`` lists a chunk's
    family (the daemon answers it from memory; by default the manifest is replayed).
    """
    if family_of is None:
        from batchd.daemon.ops.status import read_state

        state = read_state(config)

        def family_of(root: str) -> list[dict[str, Any]]:
            return chunk_family(state, pipeline.name, root)

    read = _ledger(config.state_dir, pipeline.name, key)
    family = family_of(root_of(pipeline.name, read["chunk"])) if read else []
    chunk_ids = [c["chunk"] for c in family] or ([read["chunk"]] if read else [])
    history: dict[str, Any] = {
        "pipeline": pipeline.name,
        "key": key,
        "read": read,
        "custom_id": None,
        "outcome": "not read yet" if read is None else "pending",
        "batches": [{k: c.get(k) for k in ("chunk", "attempt", "batch_id", "stage")}
                    for c in family],
        "attempts": [],
        "cost_usd": None,
        "landed": [],
        # Later rows of the source with the same key: dead-lettered unsent, not attempts.
        "duplicates": [],
        "notes": [],
    }
    attempts: dict[tuple[int, str | None], dict[str, Any]] = {}

    def attempt(number: int, batch_id: str | None, outcome: str, error_type: str | None = None,
                error_message: str | None = None, chunk: str | None = None) -> None:
        slot = attempts.setdefault((number, batch_id), {
            "attempt": number, "batch_id": batch_id, "chunk": chunk, "outcome": outcome,
            "error_type": error_type, "error_message": error_message})
        if error_type and not slot["error_type"]:
            slot.update(error_type=error_type, error_message=error_message)
        if outcome.startswith(("succeeded", "truncated", "dead_letter")):
            slot["outcome"] = outcome

    for chunk, meta, is_request in _spool_entries(config.state_dir, family, key):
        history["custom_id"] = history["custom_id"] or meta.get("custom_id")
        for past in meta.get("history") or []:
            attempt(int(past.get("attempt") or 1), past.get("batch_id"), "retried",
                    past.get("error_type"), past.get("error_message"))
        if is_request:
            stage = chunk["stage"]
            outcome = "in flight" if stage in ("submitted", "ended") else f"waiting ({stage})"
            attempt(int(meta.get("attempt") or chunk["attempt"]), chunk["batch_id"], outcome,
                    chunk=chunk["chunk"])

    finals: list[dict[str, Any]] = []
    for index, spec in enumerate(pipeline.sinks):
        found = _search_sink(config, pipeline.name, spec, key, chunk_ids)
        if isinstance(found, str):
            history["notes"].append(f"{spec.type} sink #{index + 1} {found}")
            found = []
        for hit in found:
            history["landed"].append({"sink": f"[[pipeline.sink]] #{index + 1}",
                                      "type": spec.type, "where": hit.where, "row": hit.row})
            finals.append(hit.row)
    # Dead letters are few, and a retried key's old ones sit in other groups: search all.
    dead_found = _search_sink(config, pipeline.name, pipeline.dead_letter, key, None)
    if isinstance(dead_found, str):
        history["notes"].append(f"the {pipeline.dead_letter.type} dead-letter sink {dead_found}")
        dead_found = []
    for hit in dead_found:
        row = hit.row
        history["landed"].append({"sink": "[pipeline.dead_letter]",
                                  "type": pipeline.dead_letter.type,
                                  "where": hit.where, "row": row})
        if row.get("error_type") == "duplicate_key":
            history["duplicates"].append({"position": row.get("source"),
                                          "error_type": "duplicate_key",
                                          "error_message": row.get("error_message")})
            continue
        for past in row.get("history") or []:
            attempt(int(past.get("attempt") or 1), past.get("batch_id"), "retried",
                    past.get("error_type"), past.get("error_message"))
        sent = row.get("batch_id") is not None or row.get("request") is not None
        attempt(int(row.get("attempts") or 1), row.get("batch_id"),
                "dead_letter" if sent else "dead_letter (never sent)",
                row.get("error_type"), row.get("error_message"))
        history["custom_id"] = history["custom_id"] or row.get("custom_id") or None
        if history["read"] is None and isinstance(row.get("source"), dict):
            # A row the source could not use is never claimed in the ledger; its dead
            # letter still says where it was read.
            history["read"] = {"chunk": hit.group, "position": row["source"]}
    for row in finals:
        number = int(row.get("attempt") or 1)
        attempt(number, row.get("batch_id"), str(row.get("status") or "succeeded"))
        history["custom_id"] = history["custom_id"] or row.get("custom_id")
        history["cost_usd"] = row.get("cost_usd")
        for chunk in family:  # earlier attempts: their batches, errors no longer kept
            if chunk["attempt"] < number and chunk.get("batch_id"):
                attempt(chunk["attempt"], chunk["batch_id"], "retried", chunk=chunk["chunk"])
    for (_, batch_id), slot in attempts.items():
        if slot["chunk"] is None:
            slot["chunk"] = next((c["chunk"] for c in family if c.get("batch_id") == batch_id),
                                 None)
    history["attempts"] = sorted(attempts.values(), key=lambda a: (a["attempt"],
                                                                   a["batch_id"] or ""))
    if finals:
        history["outcome"] = str(finals[-1].get("status") or "succeeded")
    elif any(a["outcome"].startswith(("in flight", "waiting")) for a in history["attempts"]):
        history["outcome"] = "in flight"
    elif dead_rows := [hit.row for hit in dead_found
                       if hit.row.get("error_type") != "duplicate_key"]:
        latest = dead_rows[-1]
        history["outcome"] = "dead_letter"
        history["reason"] = f"{latest.get('error_type')}: {latest.get('error_message')}"
    return history
