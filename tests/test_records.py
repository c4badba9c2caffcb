"""
The typed manifest records write exactly what the log has always held.

Byte compatibility is checked against manifests an earlier release wrote: every
stored record read into its type and written back gives the same fields in the
same order, so the same JSON bytes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from batchd.daemon.batches.error_codes import _BY_STATUS, ACCOUNT_ROW_ERRORS, CODES
from batchd.daemon.wal.records import (
    RECORD_FIELDS,
    RECORD_TYPES,
    ChunkSealed,
    Figures,
    FigureTotals,
    PauseKind,
    PipelinePaused,
    ResultsCommitted,
    record_from,
)

DATA = Path(__file__).parent / "data" / "manifests"
_OPTIONAL = {"results_committed": {"unpriced"}, "pipeline_paused": {"pause_kind"}}


def _stored(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line[9:]) for line in path.read_bytes().splitlines()]


@pytest.mark.parametrize("name", ["release-0.1-demo", "release-0.1-paused"])
def test_release_records_round_trip_to_the_same_bytes(name: str) -> None:
    """Each record of a release manifest, typed and written back, is byte for byte the same."""
    records = _stored(DATA / f"{name}.jsonl")
    assert records
    for stored in records:
        envelope = {key: stored[key] for key in ("seq", "ts", "kind")}
        fields = {k: v for k, v in stored.items() if k not in envelope}
        typed = record_from(stored["kind"], fields)
        assert orjson.dumps({**envelope, **typed.to_fields()}) == orjson.dumps(stored)


def test_every_kind_has_a_type_writing_the_validated_fields() -> None:
    """The types and the replay schema name the same kinds and the same required fields."""
    assert set(RECORD_TYPES) == set(RECORD_FIELDS) - {"snapshot"}
    figures = Figures(1, 2, 3, 4, 0.5, 6, 7)
    retry = ChunkSealed.retry(pipeline="p", parent="p-000001", parent_attempt=1,
                              chunk="p-000001-r1", requests=3, bytes=90)
    samples = [
        ResultsCommitted(chunk="p-000001", batch_id="b", figures=figures, retry_chunk=retry,
                         unpriced=2),
        PipelinePaused(pipeline="p", reason="billing_error: x", pause_kind=PauseKind.BILLING),
    ]
    for sample in samples:
        fields = sample.to_fields()
        assert set(fields) - _OPTIONAL.get(sample.KIND, set()) == set(RECORD_FIELDS[sample.KIND])
        assert record_from(sample.KIND, fields) == sample


def test_running_totals_give_the_record_figures() -> None:
    """A chunk's or a collect's totals become the frozen figures a record carries."""
    totals = FigureTotals(succeeded=3, dead=1, cost_usd=0.5, output_tokens=9)
    assert totals.figures() == Figures(3, 0, 1, 0, 0.5, 0, 9)


def test_a_retry_chunk_is_a_seal_one_attempt_on() -> None:
    """The retry a collect cuts is sealed like any chunk, with no source range of its own."""
    retry = ChunkSealed.retry(pipeline="p", parent="p-000001-r1", parent_attempt=2,
                              chunk="p-000001-r2", requests=3, bytes=90)
    assert retry.to_fields() == {
        "pipeline": "p", "chunk": "p-000001-r2", "attempt": 3, "requests": 3, "bytes": 90,
        "rejects": 0, "first_seq": None, "last_seq": None, "position": None,
        "parent": "p-000001-r1",
    }


def test_figures_are_the_fields_replay_checks() -> None:
    """One list of figures: the type's fields are the record's and the replayed chunk's."""
    from dataclasses import fields

    from batchd.daemon.wal.manifest_state import ChunkState, PipelineState

    names = tuple(f.name for f in fields(Figures))
    assert names == Figures.NAMES == tuple(f.name for f in fields(FigureTotals))
    assert all(name in RECORD_FIELDS["results_committed"] for name in names)
    for state in (ChunkState, PipelineState):
        assert set(names) <= {f.name for f in fields(state)}


def test_every_pause_an_error_can_cause_has_a_kind() -> None:
    """The pause kinds the error table and row errors name are all PauseKind values."""
    kinds = {d.kind or d.alarm for d in [*CODES.values(), *_BY_STATUS.values()]}
    kinds |= set(ACCOUNT_ROW_ERRORS.values())
    kinds |= {"rate_limited", "spend_limit", "create_rejected", "transient"}
    assert kinds <= {k.value for k in PauseKind}


def test_an_unknown_pause_kind_reads_as_none() -> None:
    """A kind a later release wrote is not guessed at; replay keeps its text."""
    paused = record_from("pipeline_paused", {"pipeline": "p", "reason": "r", "pause_kind": "new"})
    assert isinstance(paused, PipelinePaused) and paused.pause_kind is None
