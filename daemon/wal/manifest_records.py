"""
The manifest's record kinds: the fields each must carry, their JSON types, and
the lifecycle stages they move a chunk through.

Kept apart from the replay logic (``daemon/wal/manifest_state.py``) so the schema
reads as one table; the log checks every append against it before writing.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any

from batchd.plugins.errors import FatalError

__all__ = ("RECORD_FIELDS", "ManifestCorrupt", "Stage", "validate_fields")


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

_NONE = type(None)
_STR: tuple[type, ...] = (str,)
_OPT_STR: tuple[type, ...] = (str, _NONE)
_INT: tuple[type, ...] = (int,)
_OPT_INT: tuple[type, ...] = (int, _NONE)
_NUM: tuple[type, ...] = (int, float)
_DICT: tuple[type, ...] = (dict,)
_OPT_DICT: tuple[type, ...] = (dict, _NONE)

_SEALED: dict[str, tuple[type, ...]] = {
    "pipeline": _STR,
    "chunk": _STR,
    "attempt": _INT,
    "requests": _INT,
    "bytes": _INT,
    "rejects": _INT,
    "first_seq": _OPT_INT,
    "last_seq": _OPT_INT,
    "position": _OPT_DICT,
    "parent": _OPT_STR,
}
_FIGURES: dict[str, tuple[type, ...]] = {
    "succeeded": _INT,
    "truncated": _INT,
    "dead": _INT,
    "retried": _INT,
    "cost_usd": _NUM,
    "input_tokens": _INT,
    "output_tokens": _INT,
}

# Required fields per kind and the JSON types each may hold. ``alarm_kind`` and
# ``source_seq`` are stored under these names because ``kind`` and ``seq`` are
# the record envelope; Manifest.append accepts the short names as aliases.
RECORD_FIELDS: dict[str, dict[str, tuple[type, ...]]] = {
    "chunk_sealed": _SEALED,
    "submit_intent": {"chunk": _STR, "at": _NUM, "requests": _INT},
    "submitted": {"chunk": _STR, "batch_id": _STR, "created_at": _STR},
    "ended": {"chunk": _STR, "batch_id": _STR, "counts": _DICT},
    "results_committed": {
        "chunk": _STR,
        "batch_id": _OPT_STR,
        **_FIGURES,
        "retry_chunk": _OPT_DICT,
    },
    "source_committed": {"pipeline": _STR, "position": _OPT_DICT, "source_seq": _INT},
    "chunk_retired": {"chunk": _STR},
    "pipeline_paused": {"pipeline": _STR, "reason": _STR},
    "pipeline_resumed": {"pipeline": _STR},
    "alarm": {"pipeline": _OPT_STR, "chunk": _OPT_STR, "alarm_kind": _STR, "message": _STR},
    # The key ledger (keys.sqlite) this log goes with: a ledger with another id was copied
    # from elsewhere or rebuilt, and resuming with it would judge duplicates wrongly.
    "ledger_bound": {"ledger": _STR},
    # An operator's decision that a batch on the API is not this state's (batchd reconcile).
    "batch_disowned": {"batch_id": _STR, "reason": _STR},
    "snapshot": {"state": _DICT},
}


def validate_fields(kind: str, record: Mapping[str, Any]) -> None:
    """
    Check that *record* has every field *kind* needs, each of the right JSON type.

    Raises:
        ValueError: naming the kind and the field at fault.
    """
    schema = RECORD_FIELDS.get(kind)
    if schema is None:
        raise ValueError(f"unknown manifest record kind {kind!r}")
    missing = [name for name in schema if name not in record]
    if missing:
        raise ValueError(f"{kind} record is missing {', '.join(missing)}")
    for name, types in schema.items():
        value = record[name]
        if isinstance(value, bool) or not isinstance(value, types):
            wanted = " or ".join("null" if t is _NONE else t.__name__ for t in types)
            raise ValueError(f"{kind}.{name} must be {wanted}, not {type(value).__name__}")
