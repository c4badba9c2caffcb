"""
What a record does to the rows it touches, decided by the manifest's own replay
code: pure, no SQL.

The SQL side (``daemon/cluster/fencing.py``) locks the rows a record touches,
hands them here as a :class:`Loaded`, and writes back the :class:`Plan`. The plan
comes from running the record through :meth:`ManifestState.apply` on a state that
holds just those rows, so a transition the single-daemon manifest refuses is
refused here with the same words, a duplicate it ignores is a no-op here too, and
the event log replays (through that same class) to exactly the rows.

What a one-chunk state cannot know, PostgreSQL checks instead: that a batch id
belongs to no other chunk (the UNIQUE index on ``chunk.batch_id``) and that a
new chunk id is unused (the primary key).

The fence is decided here as well (:func:`check_fence`), after the no-op test: a
record whose effect is already present changes nothing whoever sends it, as
replay treats duplicates; anything else needs the current lease.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from batchd.daemon.cluster.errors import FencedOut, IllegalTransition
from batchd.daemon.wal.manifest import _ENVELOPE
from batchd.daemon.wal.manifest_state import (
    ChunkState,
    ManifestCorrupt,
    ManifestState,
    PipelineState,
    Stage,
    validate_fields,
)

__all__ = (
    "CHUNK_KINDS",
    "PIPELINE_KINDS",
    "SHARD_KINDS",
    "Loaded",
    "Plan",
    "check_fence",
    "normalize",
    "plan",
)

# Recorded by a chunk's owner under its chunk lease.
CHUNK_KINDS = frozenset({"submit_intent", "submitted", "ended", "results_committed"})
# Recorded by the owner of the shard a chunk was read from, under the shard lease.
SHARD_KINDS = frozenset({"chunk_sealed", "source_committed", "chunk_retired"})
# Pipeline-wide, unfenced: any live worker (or an operator) may record them.
PIPELINE_KINDS = frozenset({"pipeline_paused", "pipeline_resumed", "alarm"})

_MESSAGE_SEQ = "seq 0: "
# Spec names that collide with the envelope, accepted here and stored renamed.
_ALIASES = {("alarm", "kind"): "alarm_kind", ("source_committed", "seq"): "source_seq"}


def normalize(kind: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """
    The record's fields as the manifest stores them, validated.

    Accepts the same aliases as ``Manifest.append`` (``kind=`` for an alarm's kind,
    ``seq=`` for a source commit's read sequence).

    Raises:
        IllegalTransition: unknown kind, an envelope field, missing or mistyped fields.
    """
    values = dict(given)
    for (alias_kind, alias), name in _ALIASES.items():
        if kind == alias_kind and alias in values:
            if name in values:
                raise IllegalTransition(f"{kind} record got both {alias} and {name}")
            values[name] = values.pop(alias)
    if kind == "snapshot":
        raise IllegalTransition("snapshot records have no place in the cluster store")
    reserved = _ENVELOPE & values.keys()
    if reserved:
        raise IllegalTransition(f"{kind} record may not set {', '.join(sorted(reserved))}")
    try:
        validate_fields(kind, values)
    except ValueError as exc:
        raise IllegalTransition(str(exc)) from None
    return values


@dataclass(frozen=True)
class Loaded:
    """The rows a record may touch, as read under lock."""

    chunks: tuple[ChunkState, ...] = ()
    retired: Mapping[str, str] = field(default_factory=dict)  # chunk id -> pipeline
    pipeline: PipelineState | None = None


@dataclass(frozen=True)
class Plan:
    """What to write: nothing (a no-op), or the rows the record changed, after it."""

    kind: str
    record: dict[str, Any]
    noop: bool
    changed: tuple[ChunkState, ...] = ()
    created: tuple[ChunkState, ...] = ()
    retired: tuple[str, ...] = ()
    pipeline: PipelineState | None = None  # set when the pipeline row changed (or is new)


def plan(kind: str, fields: Mapping[str, Any], loaded: Loaded) -> Plan:
    """
    Apply one normalized record to *loaded* through ``ManifestState.apply``.

    Raises:
        IllegalTransition: replay would refuse the record; the message is replay's.
    """
    state = ManifestState.from_snapshot(
        {
            "version": 1,
            "seq": 0,
            "chunks": [asdict(c) for c in loaded.chunks],
            "pipelines": [] if loaded.pipeline is None else [asdict(loaded.pipeline)],
            "alarms": [],
            "retired_batches": [],
            "retired_chunks": [[c, p] for c, p in loaded.retired.items()],
        }
    )
    before = {c.chunk: asdict(c) for c in loaded.chunks}
    pipeline_before = None if loaded.pipeline is None else asdict(loaded.pipeline)
    record = {"seq": 0, "ts": 0.0, "kind": kind, **fields}
    try:
        state.apply(record)
    except ManifestCorrupt as exc:
        message = str(exc)
        if message.startswith(_MESSAGE_SEQ):
            message = message[len(_MESSAGE_SEQ) :]
        raise IllegalTransition(message) from None
    changed = tuple(
        c for cid, c in state.chunks.items() if cid in before and asdict(c) != before[cid]
    )
    created = tuple(c for cid, c in state.chunks.items() if cid not in before)
    retired = tuple(cid for cid in before if cid not in state.chunks)
    pipeline: PipelineState | None = None
    for name, after in state.pipelines.items():
        if loaded.pipeline is None or name != loaded.pipeline.name:
            pipeline = after  # created by this record
        elif asdict(after) != pipeline_before:
            pipeline = after
    noop = kind != "alarm" and not (changed or created or retired or pipeline)
    return Plan(kind, dict(fields), noop, changed, created, retired, pipeline)


def check_fence(
    what: str,
    *,
    owner: str | None,
    epoch: int,
    stage: Stage | str | None,
    lease_owner: str,
    lease_epoch: int,
    expected: Iterable[Stage | str] | None,
) -> None:
    """
    Refuse a change unless the row is still held by this lease at an expected stage.

    Raises:
        FencedOut: naming who holds it now, or the stage it is really at.
    """
    if owner != lease_owner or epoch != lease_epoch:
        holder = "nobody" if owner is None else owner
        raise FencedOut(
            what,
            f"held by {lease_owner} at epoch {lease_epoch}, now {holder} at epoch {epoch}",
        )
    if expected is not None:
        wanted = {str(s) for s in expected}
        if str(stage) not in wanted:
            raise FencedOut(what, f"at stage {stage}, expected {' or '.join(sorted(wanted))}")
