"""
A manifest damaged before its last line: refused with a way out, not a restart loop.

A crash can only tear the log's last line (replay drops it). A bad line *followed by
good ones* — a disk fault, a hand edit, a copy that mixed two versions — means the log
was damaged after it was written, and replay must not guess what the missing record
said. Retrying cannot fix that, so it is an operator's decision (exit 2, which the unit
does not restart), and the message says which one: ``batchd repair`` keeps the damaged
file aside and cuts the log back to its last good record (:func:`cut_damaged_manifest`).
The shortened log is then an older view of the state — the same as a manifest cut short
or a backup restored — and the next start finds the batches created after the cut on the
API and adopts them instead of paying for them again.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from batchd.daemon.wal.manifest_records import ManifestCorrupt
from batchd.plugins.errors import ConfigError
from batchd.plugins.fsync import fsync_dir

__all__ = ("ManifestDamaged", "cut_damaged_manifest")


class ManifestDamaged(ManifestCorrupt, ConfigError):
    """
    The log holds a bad record before its end; ``good`` bytes before it replay.

    A :class:`ManifestCorrupt` (what replay has always raised) and a
    :class:`ConfigError` (exit 2: the operator must act, a restart cannot help).
    """

    prefix = "state needs repair"

    def __init__(self, path: Path, line: int, problem: str, good: int) -> None:
        self.path = path
        self.line = line
        self.good = good
        super().__init__(
            f"{path} line {line}: {problem}. The log was damaged after it was written; "
            f"stop batchd and run `batchd repair CONFIG`: it keeps a copy and cuts the log "
            f"to its last good record (before line {line}), and the next start adopts the "
            f"later batches from the API instead of paying for them again"
        )


def cut_damaged_manifest(path: Path, damage: ManifestDamaged) -> tuple[Path, int]:
    """
    Keep a copy of the damaged log beside it, then cut the log before the bad line.

    The copy is made and synced before the cut, so a crash in between leaves the
    damaged log whole (repair runs again). Returns the copy's path and the lines kept.
    """
    kept = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%dT%H%M%S')}")
    shutil.copyfile(path, kept)
    with kept.open("rb") as f:
        os.fsync(f.fileno())
    with path.open("r+b") as f:
        f.truncate(damage.good)
        os.fsync(f.fileno())
    fsync_dir(path.parent)
    return kept, damage.line - 1
