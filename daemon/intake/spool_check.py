"""
A spool file that is not what was sealed is treated as lost, not sent as it is.

A chunk's spool is streamed as the create body with the ``Content-Length`` recorded when
it was sealed. A file damaged since (a disk fault, an edit, a bad copy from a backup)
does not fit that length: the upload fails with a protocol error that looks like an
unknown outcome, and the create is retried forever. So before a chunk is driven for the
first time in a process, its spool is checked against its sealed figures: requests,
body bytes, and a readable meta on every line (the keys the results are joined back
to). A damaged file is kept aside (``<chunk>.jsonl.damaged``) and the chunk goes the
way of a missing spool (``spool_lost``: its rows are read again from the source).

Only the shape is checked, not each request's JSON: that would cost a parse of every
byte, and a request garbled at the same length is refused by the API as a whole batch
(an alarm and a pause, not a loop).
"""

from __future__ import annotations

import os
from pathlib import Path

import orjson

from batchd.daemon.intake.spool import SPOOL_BLOCK, body_size

__all__ = ("mark_whole", "set_aside_damaged", "spool_damage")

# Files known whole in this process, by (path, inode, size, mtime): a chunk sealed here,
# downloaded here against its sealed SHA-256, or checked once, is not read again before
# it is sent (reading it cost ~3 % of a run's CPU: every line's meta parsed). Oldest first;
# a file forgotten past the cap is only checked again.
_whole: dict[tuple[str, int, int, int], None] = {}
_KEEP = 10_000


def _identity(path: Path) -> tuple[str, int, int, int]:
    st = path.stat()
    return (str(path), st.st_ino, st.st_size, st.st_mtime_ns)


def _remember(ident: tuple[str, int, int, int]) -> None:
    _whole[ident] = None
    if len(_whole) > _KEEP:
        del _whole[next(iter(_whole))]


def mark_whole(path: Path) -> None:
    """
    Trust the spool at ``path`` as sealed, while it stays this very file: one this process
    just wrote and sealed (its figures are the ones it counted), or one it downloaded and
    verified against the seal's SHA-256. A file replaced, grown or touched since is read.
    """
    _remember(_identity(path))


def spool_damage(path: Path, requests: int, body_bytes: int) -> str | None:
    """What is wrong with the spool at ``path`` for a chunk sealed with these figures."""
    ident = _identity(path)
    if ident in _whole:
        return None
    count = size = 0
    with open(path, "rb", buffering=SPOOL_BLOCK) as spool:
        for lineno, line in enumerate(spool, 1):
            if not line.endswith(b"\n"):
                return f"line {lineno} has no newline (the file was cut short)"
            request, tab, meta = line[:-1].partition(b"\t")
            try:
                ok = bool(tab) and isinstance(orjson.loads(meta), dict)
            except orjson.JSONDecodeError:
                ok = False
            if not ok:
                return f"line {lineno} is not '<request>\\t<meta>'"
            if request:
                count += 1
                size += len(request)
    if count != requests or body_size(count, size) != body_bytes:
        return (f"it holds {count} requests in {body_size(count, size)} body bytes, "
                f"sealed as {requests} in {body_bytes}")
    _remember(ident)
    return None


def set_aside_damaged(path: Path) -> Path:
    """Move a damaged spool out of the way (kept for the operator); returns where to."""
    kept = path.with_name(path.name + ".damaged")
    os.replace(path, kept)
    return kept
