"""
The lifecycle stages the manifest's records move a chunk through, and the error
replay raises for a record it cannot accept.

The record kinds themselves (their fields and JSON types, one dataclass each, and
the table replay checks every line against) are in ``daemon/wal/records.py``.
"""

from __future__ import annotations

import enum

from batchd.plugins.errors import FatalError

__all__ = ("ManifestCorrupt", "Stage")


class ManifestCorrupt(FatalError):
    """The manifest holds something replay cannot accept; the message names where."""


class Stage(enum.StrEnum):
    """A chunk's lifecycle, in order; each stage is entered by one record kind."""

    SEALED = "sealed"
    INTENT = "intent"
    SUBMITTED = "submitted"
    ENDED = "ended"
    COMMITTED = "committed"
    SOURCE_COMMITTED = "source_committed"


_RANK = {stage: rank for rank, stage in enumerate(Stage)}
