"""
Reading a ``batchd dead-letters retry`` request file defensively.

The command writes ``retry-requests/<pipeline>-<ns>.json`` atomically, but the directory
is an operator's too: a file garbled, emptied or written by hand must not stop the
daemon — under systemd an exit 1 on every start, since the file is read again each
time. A request that cannot be read is set aside as ``*.bad`` with one error line naming
it, and the daemon goes on; the operator asks again.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import orjson

__all__ = ("read_retry_keys",)


def read_retry_keys(path: Path) -> tuple[set[str] | None, str]:
    """The keys a request asks for, or None and why it is unreadable (then set aside)."""
    try:
        data = orjson.loads(path.read_bytes())
        keys = data.get("keys") if isinstance(data, dict) else None
        if isinstance(keys, list) and all(isinstance(k, str) for k in keys):
            return set(keys), ""
        problem = "not {\"keys\": [\"…\", …]}"
    except orjson.JSONDecodeError as exc:
        problem = f"invalid JSON ({exc})"
    except OSError as exc:
        problem = exc.strerror or str(exc)
    with contextlib.suppress(OSError):
        path.rename(path.with_suffix(".bad"))
    return None, problem
