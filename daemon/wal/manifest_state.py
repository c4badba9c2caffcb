"""
The manifest's replayed state: where every chunk is in its lifecycle.

It is pure (no I/O) so that the durable log (``daemon/wal/manifest.py``), recovery
and the property tests all drive the very same transitions with plain dicts,
and so that "what replay yields" is a function of the records alone.

Every transition is validated before anything is mutated: an illegal record
raises :class:`ManifestCorrupt` and leaves the state untouched. The log relies
on that to refuse a bad append *before* writing it, so a log this code wrote
always replays.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from typing import Any

from batchd.daemon.wal.manifest_records import _RANK, ManifestCorrupt, Stage
from batchd.daemon.wal.records import (
    RECORD_FIELDS,
    SEALED_FIELDS,
    Figures,
    FigureTotals,
    validate_fields,
)

__all__ = (
    "ALARMS_KEPT",
    "RECORD_FIELDS",
    "RETIRED_KEPT",
    "Alarm",
    "ChunkState",
    "ManifestCorrupt",
    "ManifestState",
    "PipelineState",
    "Stage",
    "validate_fields",
)

ALARMS_KEPT = 100
# Retired chunk ids and their batch ids are remembered for this many chunks, so
# an ambiguous create never adopts a recent batch owned by another chunk, while
# a month of batches does not grow the state (and every snapshot) without bound.
RETIRED_KEPT = 50_000


@dataclass
class ChunkState(FigureTotals):
    """One chunk: the fields it was sealed with, its stage and what each stage recorded
    (the figures of its collect are the inherited :class:`FigureTotals`)."""

    chunk: str
    pipeline: str
    attempt: int
    requests: int
    bytes: int
    rejects: int
    first_seq: int | None
    last_seq: int | None
    position: dict[str, Any] | None
    parent: str | None
    stage: Stage = Stage.SEALED
    # The read sequence the chunk's records go up to; a retry chunk inherits its
    # parent's, so a source commit past it marks the retry source-committed too.
    covers_seq: int | None = None
    # The first intent: a batch created any time after it may be this chunk's.
    intent_at: float | None = None
    last_intent_at: float | None = None
    intent_count: int = 0
    batch_id: str | None = None
    created_at: str | None = None
    counts: dict[str, Any] | None = None
    retry_chunk: str | None = None
    # The source shard it was read from (a Kafka partition) when cluster workers read
    # the source apart; None: the source read as one. A retry chunk has its parent's.
    shard: str | None = None

    @property
    def source_committed(self) -> bool:
        """Whether a source commit covers this chunk's records."""
        return self.stage is Stage.SOURCE_COMMITTED


@dataclass
class PipelineState(FigureTotals):
    """A pipeline's read/commit frontier, pause flag and totals that outlive its chunks
    (the figures summed over its chunks are the inherited :class:`FigureTotals`)."""

    name: str
    last_sealed_seq: int | None = None
    last_sealed_position: dict[str, Any] | None = None
    next_chunk_no: int = 0
    committed_seq: int | None = None
    committed_position: dict[str, Any] | None = None
    paused: str | None = None
    # What kind of pause (spend_limit, billing, budget, …): the optional field of
    # pipeline_paused; None for a pause written before it existed.
    pause_kind: str | None = None
    requests_submitted: int = 0
    batches_submitted: int = 0
    # Billed answers of models without a price: their cost is unknown, not in cost_usd.
    unpriced: int = 0
    # Rows an operator sent again from the dead letters: each already counted once in
    # ``dead``, so they are taken off it (their new outcome counts instead).
    resubmitted: int = 0
    # Per source shard (cluster workers reading a Kafka topic's partitions apart), the
    # same frontiers as above, each shard with its own read sequence: shard ->
    # {last_sealed_seq, last_sealed_position, committed_seq, committed_position}.
    # Empty when the source is read as one (always, on one daemon).
    shards: dict[str, dict[str, Any]] = field(default_factory=dict)

    def committed_seq_of(self, shard: str | None) -> int | None:
        """The read sequence the source is committed up to, in *shard*'s numbering."""
        if shard is None:
            return self.committed_seq
        seq: int | None = self.shards.get(shard, {}).get("committed_seq")
        return seq

    @property
    def rows_done(self) -> int:
        """Rows with a terminal outcome, each counted once however often it was retried."""
        return self.succeeded + self.truncated + self.dead_letters

    @property
    def dead_letters(self) -> int:
        """Rows whose latest outcome is a dead letter."""
        return self.dead - self.resubmitted


@dataclass
class Alarm:
    """An operator-facing alarm as the manifest recorded it."""

    seq: int
    ts: float
    pipeline: str | None
    chunk: str | None
    kind: str
    message: str


def _remember(bounded: dict[str, str], key: str, value: str) -> None:
    """Insert into an insertion-ordered dict, forgetting the oldest entry past RETIRED_KEPT."""
    bounded[key] = value
    if len(bounded) > RETIRED_KEPT:
        del bounded[next(iter(bounded))]


@dataclass
class ManifestState:
    """
    Everything replay knows: live chunks, pipelines, recent alarms, batch ownership.

    Build it by :meth:`apply`-ing records in log order, or from a snapshot.
    """

    seq: int = 0
    chunks: dict[str, ChunkState] = field(default_factory=dict)
    pipelines: dict[str, PipelineState] = field(default_factory=dict)
    alarms: deque[Alarm] = field(default_factory=lambda: deque(maxlen=ALARMS_KEPT))
    # batch id -> chunk id, for live chunks and for the last RETIRED_KEPT retired ones.
    live_batches: dict[str, str] = field(default_factory=dict)
    retired_batches: dict[str, str] = field(default_factory=dict)
    # chunk id -> pipeline, for the last RETIRED_KEPT retired chunks.
    retired_chunks: dict[str, str] = field(default_factory=dict)
    # The id of the key ledger this log goes with (``ledger_bound``), if recorded.
    ledger_id: str | None = None
    # When the log began (our clock), and the API's creation time of the newest batch it
    # ever recorded: batches on the API created after that are not known to this state,
    # which is what reconciling after a restored backup looks for.
    born_at: float | None = None
    newest_batch_at: float | None = None
    # batch id -> reason, for batches an operator declared not ours (bounded as retired).
    disowned_batches: dict[str, str] = field(default_factory=dict)
    # pipeline -> the id scheme its chunks are sealed under now (the latest ``id_scheme``),
    # and -> the scheme of the chunk of its newest recorded batch; live chunk -> the
    # scheme its custom_ids were made with (a retry chunk's are its parent's; none for a
    # chunk sealed before schemes were recorded); fingerprint -> template.
    id_schemes: dict[str, str] = field(default_factory=dict)
    batch_schemes: dict[str, str] = field(default_factory=dict)
    chunk_schemes: dict[str, str] = field(default_factory=dict)
    scheme_templates: dict[str, str | None] = field(default_factory=dict)
    # pipeline (or pipeline and shard, :func:`_source_key`) -> heap of (covers_seq,
    # chunk) for committed chunks a later source commit will cover, so a source commit
    # pops just those instead of scanning every chunk. Derived (rebuilt from a snapshot)
    # and lazily pruned, hence not compared.
    awaiting_source: dict[str, list[tuple[int, str]]] = field(
        default_factory=dict, repr=False, compare=False
    )

    # -- queries ---------------------------------------------------------------

    def batch_ids(self) -> set[str]:
        """Every batch id recorded as submitted (live chunks and recently retired ones)."""
        return set(self.live_batches) | set(self.retired_batches)

    def is_known_batch(self, batch_id: str) -> bool:
        """Whether the batch is this state's (recorded) or was declared someone else's."""
        return (
            batch_id in self.live_batches
            or batch_id in self.retired_batches
            or batch_id in self.disowned_batches
        )

    def batch_owner(self, batch_id: str) -> str | None:
        """The chunk a batch id was recorded for, or None if it belongs to no known chunk."""
        return self.live_batches.get(batch_id) or self.retired_batches.get(batch_id)

    # -- snapshots -------------------------------------------------------------

    def to_snapshot(self) -> dict[str, Any]:
        """A JSON-ready dict from which :meth:`from_snapshot` rebuilds an equal state."""
        return {
            "version": 1,
            "seq": self.seq,
            "chunks": [_unset_dropped(asdict(c), "shard") for c in self.chunks.values()],
            "pipelines": [_unset_dropped(asdict(p), "shards") for p in self.pipelines.values()],
            "alarms": [asdict(a) for a in self.alarms],
            "retired_batches": [[b, c] for b, c in self.retired_batches.items()],
            "retired_chunks": [[c, p] for c, p in self.retired_chunks.items()],
            "ledger_id": self.ledger_id,
            "born_at": self.born_at,
            "newest_batch_at": self.newest_batch_at,
            "disowned_batches": [[b, r] for b, r in self.disowned_batches.items()],
            "id_schemes": dict(self.id_schemes),
            "batch_schemes": dict(self.batch_schemes),
            "chunk_schemes": dict(self.chunk_schemes),
            "scheme_templates": [[f, t] for f, t in self.scheme_templates.items()],
        }

    @classmethod
    def from_snapshot(cls, snapshot: Mapping[str, Any]) -> ManifestState:
        """Rebuild the state :meth:`to_snapshot` described."""
        try:
            if snapshot["version"] != 1:
                raise ValueError(f"unsupported snapshot version {snapshot['version']!r}")
            state = cls(seq=snapshot["seq"])
            for raw in snapshot["chunks"]:
                chunk = ChunkState(**{**raw, "stage": Stage(raw["stage"])})
                state.chunks[chunk.chunk] = chunk
                if chunk.batch_id is not None:
                    state.live_batches[chunk.batch_id] = chunk.chunk
                state._await_source(chunk)
            for raw in snapshot["pipelines"]:
                state.pipelines[raw["name"]] = PipelineState(**raw)
            state.alarms.extend(Alarm(**raw) for raw in snapshot["alarms"])
            state.retired_batches = {b: c for b, c in snapshot["retired_batches"]}
            state.retired_chunks = {c: p for c, p in snapshot["retired_chunks"]}
            # Added after version 1 shipped: absent from older snapshots.
            state.ledger_id = snapshot.get("ledger_id")
            state.born_at = snapshot.get("born_at")
            state.newest_batch_at = snapshot.get("newest_batch_at")
            state.disowned_batches = {b: r for b, r in snapshot.get("disowned_batches", [])}
            state.id_schemes = dict(snapshot.get("id_schemes", {}))
            state.batch_schemes = dict(snapshot.get("batch_schemes", {}))
            state.chunk_schemes = dict(snapshot.get("chunk_schemes", {}))
            state.scheme_templates = {f: t for f, t in snapshot.get("scheme_templates", [])}
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestCorrupt(f"snapshot is malformed: {exc!r}") from None
        return state

    # -- transitions -----------------------------------------------------------

    def apply(self, record: Mapping[str, Any]) -> None:
        """
        Apply one record; identical duplicates of earlier transitions are no-ops.

        Raises:
            ManifestCorrupt: the record is malformed or an illegal transition; the
                state is left unchanged.
        """
        seq = record.get("seq")
        kind = record.get("kind")
        if isinstance(seq, bool) or not isinstance(seq, int) or not isinstance(kind, str):
            raise ManifestCorrupt(f"record has no integer seq and string kind: {record!r:.200}")
        try:
            validate_fields(kind, record)
        except ValueError as exc:
            raise ManifestCorrupt(f"seq {seq}: {exc}") from None
        getattr(self, f"_on_{kind}")(seq, record)
        self.seq = max(self.seq, seq)
        if self.born_at is None and isinstance(record.get("ts"), int | float):
            self.born_at = float(record["ts"])

    def _corrupt(self, seq: int, message: str) -> ManifestCorrupt:
        return ManifestCorrupt(f"seq {seq}: {message}")

    def _chunk(self, seq: int, record: Mapping[str, Any]) -> ChunkState:
        chunk_id = record["chunk"]
        chunk = self.chunks.get(chunk_id)
        if chunk is None:
            if chunk_id in self.retired_chunks:
                raise self._corrupt(seq, f"{record['kind']} for retired chunk {chunk_id}")
            raise self._corrupt(seq, f"{record['kind']} for unknown chunk {chunk_id}")
        return chunk

    def _pipeline(self, name: str) -> PipelineState:
        pipeline = self.pipelines.get(name)
        if pipeline is None:
            pipeline = self.pipelines[name] = PipelineState(name)
        return pipeline

    def _on_snapshot(self, seq: int, record: Mapping[str, Any]) -> None:
        if self.seq or self.chunks or self.pipelines or self.alarms:
            raise self._corrupt(seq, "a snapshot may only be the first record")
        loaded = self.from_snapshot(record["state"])
        for f in fields(self):
            setattr(self, f.name, getattr(loaded, f.name))

    def _new_chunk(self, seq: int, sealed: Mapping[str, Any]) -> ChunkState | None:
        """Validate a seal; None means an identical chunk already exists."""
        chunk_id = sealed["chunk"]
        parent = self.chunks.get(sealed["parent"] or "")
        values: dict[str, Any] = {name: sealed.get(name) for name in SEALED_FIELDS}
        if values["shard"] is None and parent is not None:
            values["shard"] = parent.shard  # a retry is read from its parent's shard
        existing = self.chunks.get(chunk_id)
        if existing is not None:
            if all(getattr(existing, name) == values[name] for name in SEALED_FIELDS):
                return None
            raise self._corrupt(seq, f"chunk {chunk_id} sealed again with different fields")
        if chunk_id in self.retired_chunks:
            raise self._corrupt(seq, f"chunk {chunk_id} sealed again after it was retired")
        covers = sealed["last_seq"]
        if covers is None and parent is not None:
            covers = parent.covers_seq
        scheme = (self.chunk_schemes.get(parent.chunk) if parent is not None
                  else self.id_schemes.get(sealed["pipeline"]))
        if scheme is not None:
            self.chunk_schemes[chunk_id] = scheme
        return ChunkState(**values, covers_seq=covers)

    def _seal(self, chunk: ChunkState) -> None:
        self.chunks[chunk.chunk] = chunk
        pipeline = self._pipeline(chunk.pipeline)
        if chunk.parent is not None:
            return
        pipeline.next_chunk_no += 1
        if chunk.first_seq is None:  # an operator's retry: its rows were dead letters
            pipeline.resubmitted += chunk.requests + chunk.rejects
        if chunk.shard is not None:
            frontier = pipeline.shards.setdefault(chunk.shard, {})
            sealed = frontier.get("last_sealed_seq")
            if chunk.last_seq is not None and (sealed is None or chunk.last_seq > sealed):
                frontier["last_sealed_seq"] = chunk.last_seq
                frontier["last_sealed_position"] = chunk.position
        elif chunk.last_seq is not None and (
            pipeline.last_sealed_seq is None or chunk.last_seq > pipeline.last_sealed_seq
        ):
            pipeline.last_sealed_seq = chunk.last_seq
            pipeline.last_sealed_position = chunk.position

    def _on_chunk_sealed(self, seq: int, record: Mapping[str, Any]) -> None:
        chunk = self._new_chunk(seq, record)
        if chunk is not None:
            self._seal(chunk)

    def _on_submit_intent(self, seq: int, record: Mapping[str, Any]) -> None:
        chunk = self._chunk(seq, record)
        at = record["at"]
        if record["requests"] != chunk.requests:
            raise self._corrupt(
                seq,
                f"intent for {record['requests']} requests, chunk {chunk.chunk} has "
                f"{chunk.requests}",
            )
        if at in (chunk.intent_at, chunk.last_intent_at):
            return
        if chunk.stage not in (Stage.SEALED, Stage.INTENT):
            raise self._corrupt(seq, f"submit_intent for chunk {chunk.chunk} at {chunk.stage}")
        chunk.stage = Stage.INTENT
        if chunk.intent_at is None:
            chunk.intent_at = at
        chunk.last_intent_at = at
        chunk.intent_count += 1

    def _on_submitted(self, seq: int, record: Mapping[str, Any]) -> None:
        chunk = self._chunk(seq, record)
        batch_id, created_at = record["batch_id"], record["created_at"]
        if _RANK[chunk.stage] > _RANK[Stage.INTENT]:
            if (chunk.batch_id, chunk.created_at) == (batch_id, created_at):
                return
            raise self._corrupt(
                seq, f"chunk {chunk.chunk} submitted as {batch_id}, already {chunk.batch_id}"
            )
        if chunk.stage is not Stage.INTENT:
            raise self._corrupt(seq, f"chunk {chunk.chunk} submitted without submit_intent")
        owner = self.batch_owner(batch_id)
        if owner is not None:
            raise self._corrupt(seq, f"batch {batch_id} already belongs to chunk {owner}")
        chunk.stage = Stage.SUBMITTED
        chunk.batch_id, chunk.created_at = batch_id, created_at
        self.live_batches[batch_id] = chunk.chunk
        self.disowned_batches.pop(batch_id, None)
        created = _created_ts(created_at)
        if created is not None and (self.newest_batch_at is None or created > self.newest_batch_at):
            self.newest_batch_at = created
        scheme = self.chunk_schemes.get(chunk.chunk)
        if scheme is not None:
            self.batch_schemes[chunk.pipeline] = scheme
        pipeline = self._pipeline(chunk.pipeline)
        pipeline.requests_submitted += chunk.requests
        pipeline.batches_submitted += 1

    def _on_ended(self, seq: int, record: Mapping[str, Any]) -> None:
        chunk = self._chunk(seq, record)
        batch_id, counts = record["batch_id"], record["counts"]
        if _RANK[chunk.stage] < _RANK[Stage.SUBMITTED]:
            raise self._corrupt(seq, f"chunk {chunk.chunk} ended before it was submitted")
        if batch_id != chunk.batch_id:
            raise self._corrupt(
                seq, f"chunk {chunk.chunk} ended as {batch_id}, submitted as {chunk.batch_id}"
            )
        if chunk.stage is not Stage.SUBMITTED:
            if counts == chunk.counts:
                return
            raise self._corrupt(seq, f"chunk {chunk.chunk} ended again with other counts")
        chunk.stage = Stage.ENDED
        chunk.counts = counts

    def _on_results_committed(self, seq: int, record: Mapping[str, Any]) -> None:
        chunk = self._chunk(seq, record)
        batch_id, retry = record["batch_id"], record["retry_chunk"]
        retry_id = None if retry is None else retry.get("chunk")
        if _RANK[chunk.stage] >= _RANK[Stage.COMMITTED]:
            same = all(getattr(chunk, name) == record[name] for name in Figures.NAMES)
            if same and (chunk.batch_id, chunk.retry_chunk) == (batch_id, retry_id):
                return
            raise self._corrupt(seq, f"chunk {chunk.chunk} committed again with other figures")
        if chunk.stage in (Stage.SEALED, Stage.INTENT):
            # A chunk with nothing to send, or one given up before it was sent (its spool
            # lost and its rows dead-lettered): committed without a batch.
            if batch_id is not None:
                raise self._corrupt(seq, f"chunk {chunk.chunk} has no batch, got {batch_id}")
        elif chunk.stage is not Stage.ENDED:
            raise self._corrupt(seq, f"results_committed for chunk {chunk.chunk} at {chunk.stage}")
        elif batch_id != chunk.batch_id:
            raise self._corrupt(seq, f"results of {batch_id} for chunk {chunk.chunk}")
        new_retry = None
        if retry is not None:
            try:
                validate_fields("chunk_sealed", retry)
            except ValueError as exc:
                raise self._corrupt(seq, f"retry_chunk: {exc}") from None
            if retry["parent"] != chunk.chunk or retry["pipeline"] != chunk.pipeline:
                raise self._corrupt(seq, f"retry_chunk {retry_id} is not a child of {chunk.chunk}")
            new_retry = self._new_chunk(seq, retry)
        pipeline = self._pipeline(chunk.pipeline)
        for name in Figures.NAMES:
            setattr(chunk, name, record[name])
            setattr(pipeline, name, getattr(pipeline, name) + record[name])
        unpriced = record.get("unpriced")  # optional: absent in records before it existed
        if isinstance(unpriced, int) and not isinstance(unpriced, bool):
            pipeline.unpriced += unpriced
        chunk.retry_chunk = retry_id
        chunk.stage = Stage.COMMITTED
        if _covered(chunk, pipeline.committed_seq_of(chunk.shard)):
            chunk.stage = Stage.SOURCE_COMMITTED
        else:
            self._await_source(chunk)
        if new_retry is not None:
            self._seal(new_retry)

    def _await_source(self, chunk: ChunkState) -> None:
        if chunk.stage is Stage.COMMITTED and chunk.covers_seq is not None:
            heap = self.awaiting_source.setdefault(_source_key(chunk.pipeline, chunk.shard), [])
            heapq.heappush(heap, (chunk.covers_seq, chunk.chunk))

    def _on_source_committed(self, seq: int, record: Mapping[str, Any]) -> None:
        source_seq, position = record["source_seq"], record["position"]
        shard = record.get("shard")
        known = self.pipelines.get(record["pipeline"])
        if shard is None:
            before = (None, None) if known is None else (known.committed_seq,
                                                         known.committed_position)
        else:
            frontier = {} if known is None else known.shards.get(shard, {})
            before = (frontier.get("committed_seq"), frontier.get("committed_position"))
        if before[0] is not None:
            if (source_seq, position) == before:
                return
            if source_seq <= before[0]:
                of = record["pipeline"] if shard is None else f"{record['pipeline']} shard {shard}"
                raise self._corrupt(
                    seq, f"source commit of {of} went from {before[0]} back to {source_seq}"
                )
        pipeline = self._pipeline(record["pipeline"])
        if shard is None:
            pipeline.committed_seq, pipeline.committed_position = source_seq, position
        else:
            frontier = pipeline.shards.setdefault(shard, {})
            frontier["committed_seq"], frontier["committed_position"] = source_seq, position
        awaiting = self.awaiting_source.get(_source_key(pipeline.name, shard), [])
        while awaiting and awaiting[0][0] <= source_seq:
            chunk = self.chunks.get(heapq.heappop(awaiting)[1])
            if chunk is not None and chunk.stage is Stage.COMMITTED:
                chunk.stage = Stage.SOURCE_COMMITTED

    def _on_chunk_retired(self, seq: int, record: Mapping[str, Any]) -> None:
        chunk_id = record["chunk"]
        if chunk_id in self.retired_chunks:
            return
        chunk = self._chunk(seq, record)
        if _RANK[chunk.stage] < _RANK[Stage.COMMITTED]:
            raise self._corrupt(seq, f"chunk {chunk_id} retired at {chunk.stage}")
        del self.chunks[chunk_id]
        self.chunk_schemes.pop(chunk_id, None)
        _remember(self.retired_chunks, chunk_id, chunk.pipeline)
        if chunk.batch_id is not None:
            self.live_batches.pop(chunk.batch_id, None)
            _remember(self.retired_batches, chunk.batch_id, chunk_id)

    def _on_pipeline_paused(self, seq: int, record: Mapping[str, Any]) -> None:
        pipeline = self._pipeline(record["pipeline"])
        pipeline.paused = record["reason"]
        kind = record.get("pause_kind")
        pipeline.pause_kind = kind if isinstance(kind, str) else None

    def _on_pipeline_resumed(self, seq: int, record: Mapping[str, Any]) -> None:
        pipeline = self._pipeline(record["pipeline"])
        pipeline.paused = pipeline.pause_kind = None

    def _on_id_scheme(self, seq: int, record: Mapping[str, Any]) -> None:
        self.id_schemes[record["pipeline"]] = record["fingerprint"]
        self.scheme_templates[record["fingerprint"]] = record["template"]

    def _on_ledger_bound(self, seq: int, record: Mapping[str, Any]) -> None:
        self.ledger_id = record["ledger"]

    def _on_batch_disowned(self, seq: int, record: Mapping[str, Any]) -> None:
        batch_id = record["batch_id"]
        owner = self.batch_owner(batch_id)
        if owner is not None:
            raise self._corrupt(seq, f"batch {batch_id} belongs to chunk {owner}; cannot disown it")
        _remember(self.disowned_batches, batch_id, record["reason"])

    def _on_alarm(self, seq: int, record: Mapping[str, Any]) -> None:
        if any(alarm.seq == seq for alarm in self.alarms):
            return
        self.alarms.append(
            Alarm(
                seq=seq,
                ts=record.get("ts", 0.0),
                pipeline=record["pipeline"],
                chunk=record["chunk"],
                kind=record["alarm_kind"],
                message=record["message"],
            )
        )


def _created_ts(created_at: str) -> float | None:
    """Unix time of a batch's ``created_at`` as the manifest stores it (RFC 3339-ish)."""
    try:
        return datetime.fromisoformat(created_at.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _source_key(pipeline: str, shard: str | None) -> str:
    """Whose read sequence a chunk's ``covers_seq`` counts in: the pipeline's, or a shard's."""
    return pipeline if shard is None else f"{pipeline}\n{shard}"


def _unset_dropped(values: dict[str, Any], name: str) -> dict[str, Any]:
    """A snapshot entry without *name* while it is unset (None or empty), as release 0.1 wrote."""
    if not values.get(name):
        del values[name]
    return values


def _covered(chunk: ChunkState, committed_seq: int | None) -> bool:
    return (
        chunk.covers_seq is not None
        and committed_seq is not None
        and chunk.covers_seq <= committed_seq
    )
