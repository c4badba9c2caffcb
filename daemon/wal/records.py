"""
The manifest's records as types: one frozen dataclass per record kind.

Writers build a record and hand it to :meth:`Manifest.append`; its
:meth:`~Record.to_fields` gives the JSON fields under the names the log has
always used, so files written by earlier releases replay unchanged.
:func:`record_from` reads a stored record back into its type. The table replay
checks every line against (:data:`RECORD_FIELDS`: each kind's required fields
and their JSON types) is derived from these classes, so a kind's fields are
declared once; a field with a default may be absent (it came after release 0.1).

The outcome figures of a collect (:class:`Figures`) are one type shared by the
``results_committed`` record, the collect summary and the replayed totals; a
retry chunk is a :class:`ChunkSealed` nested in the record that cut it, so its
schema is the seal's own.
"""

from __future__ import annotations

import enum
import types
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields, is_dataclass
from typing import Any, ClassVar, Union, get_args, get_origin, get_type_hints

__all__ = (
    "RECORD_FIELDS",
    "RECORD_TYPES",
    "SEALED_FIELDS",
    "AlarmRaised",
    "BatchDisowned",
    "ChunkRetired",
    "ChunkSealed",
    "Ended",
    "FigureTotals",
    "Figures",
    "IdScheme",
    "LedgerBound",
    "PauseKind",
    "PipelinePaused",
    "PipelineResumed",
    "Record",
    "ResultsCommitted",
    "SourceCommitted",
    "SubmitIntent",
    "Submitted",
    "record_from",
    "validate_fields",
)


class PauseKind(enum.StrEnum):
    """
    Why a pipeline is paused, as the ``pipeline_paused`` record stores it.

    The runner decides by kind (a budget pause lets sealed chunks go on, a sink
    pause lifts itself when the sink writes again), never by the message text.
    The values are the create error kinds of ``batches/error_codes.py`` plus the
    engine's own.
    """

    BUDGET = "budget"
    DEAD_LETTER_RATIO = "dead_letter_ratio"
    SINK_FAILED = "sink_failed"
    UNKNOWN_BATCHES = "unknown_batches"
    BILLING_OR_AUTH = "billing_or_auth"
    SPEND_LIMIT = "spend_limit"
    ORGANIZATION_ON_HOLD = "organization_on_hold"
    ENCRYPTION_KEY = "encryption_key"
    CREDENTIALS = "credentials"
    WORKSPACE = "workspace"
    BILLING = "billing"
    AUTHENTICATION = "authentication"
    PERMISSION = "permission"
    CREATE_REJECTED = "create_rejected"
    RAMP_LIMIT = "ramp_limit"
    RATE_LIMITED = "rate_limited"
    TRANSIENT = "transient"

    @property
    def blocks_submissions(self) -> bool:
        """Whether sealed chunks wait too: all but a budget pause, whose chunks were admitted."""
        return self is not PauseKind.BUDGET


@dataclass(frozen=True, slots=True)
class Figures:
    """What a collect produced: row outcomes, cost and tokens (summed per pipeline)."""

    NAMES: ClassVar[tuple[str, ...]]  # the field names, in order (set below the class)

    succeeded: int = 0
    truncated: int = 0
    dead: int = 0
    retried: int = 0
    cost_usd: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0

    def to_fields(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.NAMES}

    @classmethod
    def from_fields(cls, values: Mapping[str, Any]) -> Figures:
        return cls(**{name: values[name] for name in cls.NAMES})


Figures.NAMES = tuple(f.name for f in fields(Figures))


@dataclass(kw_only=True, slots=True)
class FigureTotals:
    """
    The figures as running totals, from zero: a chunk's, a pipeline's, a collect's.

    The replayed states and the collect summary inherit these fields (keyword-only,
    so they add to a class without moving its own positional fields);
    :class:`Figures` is the frozen form a record carries, with the same names.
    """

    succeeded: int = 0
    truncated: int = 0
    dead: int = 0
    retried: int = 0
    cost_usd: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0

    def figures(self) -> Figures:
        """These totals as the figures a ``results_committed`` record stores."""
        return Figures(**{name: getattr(self, name) for name in Figures.NAMES})


class Record:
    """A manifest record: a kind and its fields (the envelope, seq/ts/kind, is the log's)."""

    KIND: ClassVar[str]
    __slots__ = ()

    def to_fields(self) -> dict[str, Any]:
        """
        The record's JSON fields, under the names the log stores.

        A field added after release 0.1 (it has a default of None) is left out while
        unset, so a record that does not use it is written exactly as before.
        """
        out: dict[str, Any] = {}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if value is None and f.default is None:
                continue
            out[f.name] = value
        return out

    @classmethod
    def from_fields(cls, values: Mapping[str, Any]) -> Record:
        return cls(**{f.name: values[f.name] for f in fields(cls)  # type: ignore[arg-type]
                      if f.name in values or f.default is MISSING})


@dataclass(frozen=True, slots=True)
class ChunkSealed(Record):
    """A chunk's spool is on disk: its requests, bytes and the source range it covers."""

    KIND: ClassVar[str] = "chunk_sealed"
    pipeline: str
    chunk: str
    attempt: int
    requests: int
    bytes: int
    rejects: int
    first_seq: int | None
    last_seq: int | None
    position: dict[str, Any] | None
    parent: str | None
    # The source shard it was read from (a Kafka partition, "topic:3") when several
    # cluster workers read one source apart; None: the source read as one (always, on
    # one daemon). A retry chunk's is its parent's.
    shard: str | None = None

    @classmethod
    def retry(cls, *, pipeline: str, parent: str, parent_attempt: int, chunk: str,
              requests: int, bytes: int) -> ChunkSealed:
        """The seal of a retry chunk cut from *parent*: no source range, one attempt more."""
        return cls(pipeline=pipeline, chunk=chunk, attempt=parent_attempt + 1,
                   requests=requests, bytes=bytes, rejects=0, first_seq=None, last_seq=None,
                   position=None, parent=parent)


SEALED_FIELDS = tuple(f.name for f in fields(ChunkSealed))


@dataclass(frozen=True, slots=True)
class SubmitIntent(Record):
    """A create is about to be sent: a batch created after ``at`` may be this chunk's."""

    KIND: ClassVar[str] = "submit_intent"
    chunk: str
    at: float
    requests: int


@dataclass(frozen=True, slots=True)
class Submitted(Record):
    KIND: ClassVar[str] = "submitted"
    chunk: str
    batch_id: str
    created_at: str


@dataclass(frozen=True, slots=True)
class Ended(Record):
    KIND: ClassVar[str] = "ended"
    chunk: str
    batch_id: str
    counts: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ResultsCommitted(Record):
    """A collect is durable in the sinks: its figures and the retry chunk it cut, if any."""

    KIND: ClassVar[str] = "results_committed"
    chunk: str
    batch_id: str | None
    figures: Figures
    retry_chunk: ChunkSealed | None
    unpriced: int | None = None  # absent from records written before it existed

    def to_fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {"chunk": self.chunk, "batch_id": self.batch_id}
        out.update(self.figures.to_fields())
        out["retry_chunk"] = None if self.retry_chunk is None else self.retry_chunk.to_fields()
        if self.unpriced is not None:
            out["unpriced"] = self.unpriced
        return out

    @classmethod
    def from_fields(cls, values: Mapping[str, Any]) -> ResultsCommitted:
        retry = values["retry_chunk"]
        unpriced = values.get("unpriced")
        return cls(
            chunk=values["chunk"],
            batch_id=values["batch_id"],
            figures=Figures.from_fields(values),
            retry_chunk=None if retry is None else ChunkSealed.from_fields(retry),  # type: ignore[arg-type]
            unpriced=unpriced if isinstance(unpriced, int) and not isinstance(unpriced, bool)
            else None,
        )


@dataclass(frozen=True, slots=True)
class SourceCommitted(Record):
    """The source was committed up to read sequence ``source_seq`` (``seq`` is the envelope's)."""

    KIND: ClassVar[str] = "source_committed"
    pipeline: str
    position: dict[str, Any] | None
    source_seq: int
    # The shard whose read sequence ``source_seq`` counts (each shard has its own);
    # None: the source read as one.
    shard: str | None = None


@dataclass(frozen=True, slots=True)
class ChunkRetired(Record):
    KIND: ClassVar[str] = "chunk_retired"
    chunk: str


@dataclass(frozen=True, slots=True)
class PipelinePaused(Record):
    """A pause and its kind; ``pause_kind`` is absent from records written before it existed."""

    KIND: ClassVar[str] = "pipeline_paused"
    pipeline: str
    reason: str
    pause_kind: PauseKind | None = None

    def to_fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {"pipeline": self.pipeline, "reason": self.reason}
        if self.pause_kind is not None:
            out["pause_kind"] = self.pause_kind.value
        return out

    @classmethod
    def from_fields(cls, values: Mapping[str, Any]) -> PipelinePaused:
        kind = values.get("pause_kind")
        try:
            pause_kind = PauseKind(kind) if isinstance(kind, str) else None
        except ValueError:  # a kind this release does not know: kept as text in replay
            pause_kind = None
        return cls(pipeline=values["pipeline"], reason=values["reason"], pause_kind=pause_kind)


@dataclass(frozen=True, slots=True)
class PipelineResumed(Record):
    KIND: ClassVar[str] = "pipeline_resumed"
    pipeline: str


@dataclass(frozen=True, slots=True)
class AlarmRaised(Record):
    """An operator-facing alarm (stored as kind ``alarm``; its own kind is ``alarm_kind``)."""

    KIND: ClassVar[str] = "alarm"
    pipeline: str | None
    chunk: str | None
    alarm_kind: str
    message: str


@dataclass(frozen=True, slots=True)
class LedgerBound(Record):
    """The key ledger (keys.sqlite) this log goes with."""

    KIND: ClassVar[str] = "ledger_bound"
    ledger: str


@dataclass(frozen=True, slots=True)
class BatchDisowned(Record):
    """An operator's decision that a batch on the API is not this state's."""

    KIND: ClassVar[str] = "batch_disowned"
    batch_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class IdScheme(Record):
    """
    The scheme a pipeline's custom_ids are made with from here on (appended before the
    first chunk sealed under a scheme the log has not recorded).

    A restored backup adopts the batches made after it by their custom_ids; rebuilt
    under another scheme, its chunks share none with them and would pay again. This
    record lets reconciling tell that case from another tool's batches.
    """

    KIND: ClassVar[str] = "id_scheme"
    pipeline: str
    fingerprint: str
    template: str | None


RECORD_TYPES: dict[str, type[Record]] = {
    cls.KIND: cls
    for cls in (ChunkSealed, SubmitIntent, Submitted, Ended, ResultsCommitted, SourceCommitted,
                ChunkRetired, PipelinePaused, PipelineResumed, AlarmRaised, LedgerBound,
                BatchDisowned, IdScheme)
}


_NONE = type(None)


def _json_types(hint: Any) -> tuple[type, ...]:
    """The JSON types a field of type *hint* may hold in the log."""
    if hint is float:
        return (int, float)
    if hint in (str, int, _NONE):
        return (hint,)
    if hint is dict or get_origin(hint) is dict:
        return (dict,)
    if get_origin(hint) in (Union, types.UnionType):
        return tuple(t for arg in get_args(hint) for t in _json_types(arg))
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return (str,)
    if isinstance(hint, type) and is_dataclass(hint):
        return (dict,)  # a nested record (a retry chunk's seal)
    raise TypeError(f"no JSON type for a record field of type {hint!r}")


def _schema(cls: type, *, inlined: bool = False) -> dict[str, tuple[type, ...]]:
    """A record class's required fields and their JSON types; nested Figures are inlined."""
    hints = get_type_hints(cls)
    schema: dict[str, tuple[type, ...]] = {}
    for f in fields(cls):
        if f.default is not MISSING and not inlined:
            continue  # added after release 0.1: absent from older records
        if hints[f.name] is Figures:
            schema.update(_schema(Figures, inlined=True))  # every figure is always written
        else:
            schema[f.name] = _json_types(hints[f.name])
    return schema


# Required fields per kind and the JSON types each may hold. ``alarm_kind`` and
# ``source_seq`` are stored under these names because ``kind`` and ``seq`` are the
# record envelope. A snapshot (written only by compaction) holds a whole state.
RECORD_FIELDS: dict[str, dict[str, tuple[type, ...]]] = {
    **{kind: _schema(cls) for kind, cls in RECORD_TYPES.items()},
    "snapshot": {"state": (dict,)},
}


# Kinds whose optional ``shard`` names the source shard (checked when present).
_SHARDED = frozenset({ChunkSealed.KIND, SourceCommitted.KIND})


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
    for name, types_ in schema.items():
        value = record[name]
        if isinstance(value, bool) or not isinstance(value, types_):
            wanted = " or ".join("null" if t is _NONE else t.__name__ for t in types_)
            raise ValueError(f"{kind}.{name} must be {wanted}, not {type(value).__name__}")
    shard = record.get("shard")
    if shard is not None and kind in _SHARDED and (not isinstance(shard, str) or not shard):
        raise ValueError(f"{kind}.shard must be a non-empty str or null, not {shard!r}")


def record_from(kind: str, values: Mapping[str, Any]) -> Record:
    """
    The typed record a stored one (its kind and JSON fields) stands for.

    Raises:
        ValueError: unknown kind (a snapshot is not a record of this sort), or a
            field missing or of the wrong JSON type; the message names it.
    """
    cls = RECORD_TYPES.get(kind)
    if cls is None:
        raise ValueError(f"unknown manifest record kind {kind!r}")
    validate_fields(kind, values)
    return cls.from_fields(values)
