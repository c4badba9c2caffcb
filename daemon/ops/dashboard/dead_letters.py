"""The newest dead letters of a pipeline, read from its dead-letter sink for the dashboard."""

from __future__ import annotations

import sqlite3
import threading
from collections import deque
from contextlib import closing
from pathlib import Path
from typing import Any

import orjson

from batchd.daemon.config import Config, PipelineConfig
from batchd.plugins.contract import PluginContext

__all__ = ("newest_dead_letters",)

_FIELDS = ("key", "error_type", "error_message", "attempts", "batch_id")
_cache: dict[tuple[str, int, int], list[dict[str, Any]]] = {}
_lock = threading.Lock()


def _tail(part: Path, limit: int) -> list[dict[str, Any]]:
    """The last ``limit`` rows of a part file (remembered while the file is unchanged)."""
    stat = part.stat()
    ident = (str(part), stat.st_mtime_ns, stat.st_size)
    with _lock:
        if ident in _cache:
            return _cache[ident]
    rows: deque[dict[str, Any]] = deque(maxlen=limit)
    with part.open("rb") as lines:
        for line in lines:
            if line.strip():
                try:
                    row = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue
                rows.append({k: row.get(k) for k in _FIELDS})
    found = list(reversed(rows))
    with _lock:
        if len(_cache) > 256:
            _cache.clear()
        _cache[ident] = found
    return found


def newest_dead_letters(
    config: Config, pipeline: PipelineConfig, limit: int = 8
) -> list[dict[str, Any]]:
    """Up to ``limit`` dead letters, newest first; [] for sink types that cannot be read."""
    spec = pipeline.dead_letter
    raw = spec.options.get("path")
    if not isinstance(raw, str):
        return []
    context = PluginContext(pipeline.name, config.state_dir, config.path.resolve().parent)
    path = context.resolve_path(raw)
    try:
        if spec.type in ("jsonl", "dead_letter"):
            if not path.is_dir():
                return []
            parts = sorted(path.glob("*.jsonl"), key=lambda p: p.stat().st_mtime_ns,
                           reverse=True)
            out: list[dict[str, Any]] = []
            for part in parts:
                out.extend(_tail(part, limit - len(out)))
                if len(out) >= limit:
                    break
            return out
        if spec.type == "sqlite" and path.exists():
            table = str(spec.options.get("table", "dead_letter"))
            if not table.isidentifier():
                return []
            with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
                db.row_factory = sqlite3.Row
                rows = db.execute(f'SELECT * FROM "{table}" ORDER BY updated_at DESC LIMIT ?',
                                  (limit,)).fetchall()
            return [{k: dict(r).get(k) for k in _FIELDS} for r in rows]
    except (OSError, sqlite3.Error):
        return []
    return []
