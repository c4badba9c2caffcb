"""
The manifest's pure replay state: transitions, idempotent duplicates, snapshots,
and (with hypothesis) replay of any prefix of a log with a torn tail.
"""

from __future__ import annotations

import itertools
import tempfile
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchd.daemon.wal.manifest import encode_line, replay
from batchd.daemon.wal.manifest_state import (
    ALARMS_KEPT,
    ManifestCorrupt,
    ManifestState,
    Stage,
    validate_fields,
)


def sealed_fields(chunk: str, pipeline: str = "p", **over: Any) -> dict[str, Any]:
    """Fields of a fresh chunk_sealed record."""
    fields: dict[str, Any] = {
        "pipeline": pipeline,
        "chunk": chunk,
        "attempt": 1,
        "requests": 3,
        "bytes": 300,
        "rejects": 0,
        "first_seq": 1,
        "last_seq": 3,
        "position": {"line": 3},
        "parent": None,
    }
    fields.update(over)
    return fields


def committed_fields(chunk: str, batch_id: str | None, **over: Any) -> dict[str, Any]:
    """Fields of a results_committed record."""
    fields: dict[str, Any] = {
        "chunk": chunk,
        "batch_id": batch_id,
        "succeeded": 3,
        "truncated": 1,
        "dead": 0,
        "retried": 0,
        "cost_usd": 0.25,
        "input_tokens": 30,
        "output_tokens": 60,
        "retry_chunk": None,
    }
    fields.update(over)
    return fields


class Log:
    """Applies records with increasing seqs to one state, like the manifest does."""

    def __init__(self) -> None:
        self.state = ManifestState()
        self.records: list[dict[str, Any]] = []
        self._seq = itertools.count(1)

    def add(self, kind: str, **fields: Any) -> dict[str, Any]:
        record = {"seq": next(self._seq), "ts": 1000.0, "kind": kind, **fields}
        self.state.apply(record)
        self.records.append(record)
        return record

    def lifecycle(self, chunk: str, upto: Stage, batch: str | None = None) -> None:
        """Drive a fresh chunk through its lifecycle up to *upto*."""
        batch = batch or f"msgbatch_{chunk}"
        steps: list[tuple[Stage, str, dict[str, Any]]] = [
            (Stage.SEALED, "chunk_sealed", sealed_fields(chunk)),
            (Stage.INTENT, "submit_intent", {"chunk": chunk, "at": 5.0, "requests": 3}),
            (
                Stage.SUBMITTED,
                "submitted",
                {"chunk": chunk, "batch_id": batch, "created_at": "2026-01-01T00:00:00Z"},
            ),
            (Stage.ENDED, "ended", {"chunk": chunk, "batch_id": batch, "counts": {"succeeded": 3}}),
            (Stage.COMMITTED, "results_committed", committed_fields(chunk, batch)),
        ]
        for stage, kind, fields in steps:
            self.add(kind, **fields)
            if stage is upto:
                return


class TestTransitions:
    def test_lifecycle_moves_chunk_through_stages(self) -> None:
        """Each lifecycle record moves the chunk to the next stage and keeps its figures."""
        log = Log()
        for stage in (Stage.SEALED, Stage.INTENT, Stage.SUBMITTED, Stage.ENDED):
            log = Log()
            log.lifecycle("c1", stage)
            assert log.state.chunks["c1"].stage is stage
        log.lifecycle("c2", Stage.COMMITTED)
        chunk = log.state.chunks["c2"]
        assert chunk.stage is Stage.COMMITTED
        assert (chunk.batch_id, chunk.intent_at, chunk.counts) == (
            "msgbatch_c2",
            5.0,
            {"succeeded": 3},
        )
        assert (chunk.succeeded, chunk.truncated, chunk.cost_usd) == (3, 1, 0.25)

    def test_pipeline_frontier_and_totals(self) -> None:
        """Sealing advances the read frontier and chunk numbering; commits add to totals."""
        log = Log()
        log.lifecycle("c1", Stage.COMMITTED)
        log.add("chunk_sealed", **sealed_fields("c2", first_seq=4, last_seq=9, position={"l": 9}))
        pipeline = log.state.pipelines["p"]
        assert (pipeline.last_sealed_seq, pipeline.last_sealed_position) == (9, {"l": 9})
        assert pipeline.next_chunk_no == 2
        assert (pipeline.requests_submitted, pipeline.batches_submitted) == (3, 1)
        assert (pipeline.succeeded, pipeline.output_tokens, pipeline.cost_usd) == (3, 60, 0.25)

    def test_submitted_for_unknown_chunk_is_corrupt(self) -> None:
        """A submitted record for a chunk never sealed names the seq and the chunk."""
        log = Log()
        with pytest.raises(ManifestCorrupt, match=r"seq 1: .*unknown chunk nope"):
            log.add("submitted", chunk="nope", batch_id="b", created_at="t")

    def test_ended_before_submitted_is_corrupt(self) -> None:
        """ended for a chunk that has only an intent is an illegal transition."""
        log = Log()
        log.lifecycle("c1", Stage.INTENT)
        with pytest.raises(ManifestCorrupt, match="ended before it was submitted"):
            log.add("ended", chunk="c1", batch_id="b", counts={})

    def test_second_submitted_with_other_batch_is_corrupt(self) -> None:
        """A chunk cannot be submitted as two different batches."""
        log = Log()
        log.lifecycle("c1", Stage.SUBMITTED)
        with pytest.raises(ManifestCorrupt, match="already msgbatch_c1"):
            log.add("submitted", chunk="c1", batch_id="other", created_at="t")

    def test_batch_of_another_chunk_is_corrupt(self) -> None:
        """A batch id already owned by one chunk cannot be recorded for another."""
        log = Log()
        log.lifecycle("c1", Stage.SUBMITTED, batch="shared")
        log.lifecycle("c2", Stage.INTENT)
        with pytest.raises(ManifestCorrupt, match="already belongs to chunk c1"):
            log.add("submitted", chunk="c2", batch_id="shared", created_at="t")

    def test_identical_duplicates_are_noops(self) -> None:
        """Re-applying every lifecycle record of a committed chunk changes nothing."""
        log = Log()
        log.lifecycle("c1", Stage.COMMITTED)
        before = ManifestState.from_snapshot(log.state.to_snapshot())
        for record in list(log.records):
            log.state.apply({**record, "seq": record["seq"] + 100})
        before.seq = log.state.seq
        assert log.state == before

    def test_seal_with_other_fields_is_corrupt(self) -> None:
        """Sealing an existing chunk id with different fields is refused."""
        log = Log()
        log.add("chunk_sealed", **sealed_fields("c1"))
        with pytest.raises(ManifestCorrupt, match="sealed again with different fields"):
            log.add("chunk_sealed", **sealed_fields("c1", requests=4))

    def test_illegal_record_leaves_state_unchanged(self) -> None:
        """A refused record mutates nothing, so the log can refuse it before writing."""
        log = Log()
        log.lifecycle("c1", Stage.ENDED)
        before = log.state.to_snapshot()
        retry = sealed_fields("r1", parent="other", first_seq=None, last_seq=None)
        with pytest.raises(ManifestCorrupt, match="not a child of c1"):
            log.add("results_committed", **committed_fields("c1", "msgbatch_c1", retry_chunk=retry))
        assert log.state.to_snapshot() == before

    def test_repeated_intent_keeps_first_time(self) -> None:
        """A second intent (resubmission after a crash) keeps the earliest intent time."""
        log = Log()
        log.lifecycle("c1", Stage.INTENT)
        log.add("submit_intent", chunk="c1", at=9.0, requests=3)
        chunk = log.state.chunks["c1"]
        assert (chunk.intent_at, chunk.last_intent_at, chunk.intent_count) == (5.0, 9.0, 2)

    def test_intent_with_wrong_request_count_is_corrupt(self) -> None:
        """An intent must announce the chunk's own request count."""
        log = Log()
        log.lifecycle("c1", Stage.SEALED)
        with pytest.raises(ManifestCorrupt, match="intent for 4 requests"):
            log.add("submit_intent", chunk="c1", at=1.0, requests=4)

    def test_empty_chunk_commits_without_batch(self) -> None:
        """A chunk of only rejects commits straight from sealed with a null batch id."""
        log = Log()
        log.add("chunk_sealed", **sealed_fields("c1", requests=0, rejects=3))
        log.add("results_committed", **committed_fields("c1", None, succeeded=0, dead=3))
        assert log.state.chunks["c1"].stage is Stage.COMMITTED
        assert log.state.pipelines["p"].dead == 3


class TestRetryAndSourceCommit:
    def test_results_committed_seals_retry_chunk(self) -> None:
        """A retry_chunk inside results_committed is sealed, inheriting the parent's coverage."""
        log = Log()
        log.lifecycle("c1", Stage.ENDED)
        retry = sealed_fields(
            "c1-r2",
            attempt=2,
            requests=1,
            first_seq=None,
            last_seq=None,
            position=None,
            parent="c1",
        )
        log.add(
            "results_committed",
            **committed_fields("c1", "msgbatch_c1", retried=1, retry_chunk=retry),
        )
        child = log.state.chunks["c1-r2"]
        assert (child.stage, child.attempt, child.covers_seq) == (Stage.SEALED, 2, 3)
        assert log.state.chunks["c1"].retry_chunk == "c1-r2"
        assert log.state.pipelines["p"].next_chunk_no == 1

    def test_source_commit_moves_covered_chunks(self) -> None:
        """source_committed marks committed chunks at or below its seq, and no others."""
        log = Log()
        log.lifecycle("c1", Stage.COMMITTED)
        log.add("chunk_sealed", **sealed_fields("c2", first_seq=4, last_seq=6))
        log.add("source_committed", pipeline="p", position={"line": 3}, source_seq=3)
        assert log.state.chunks["c1"].source_committed
        assert log.state.chunks["c2"].stage is Stage.SEALED
        assert log.state.pipelines["p"].committed_position == {"line": 3}

    def test_source_commit_going_back_is_corrupt(self) -> None:
        """A source commit never moves backwards."""
        log = Log()
        log.add("source_committed", pipeline="p", position={"line": 9}, source_seq=9)
        with pytest.raises(ManifestCorrupt, match="from 9 back to 4"):
            log.add("source_committed", pipeline="p", position={"line": 4}, source_seq=4)

    def test_retire_drops_chunk_but_keeps_totals_and_batch_ids(self) -> None:
        """A retired chunk leaves `chunks`; its batch id and the totals stay."""
        log = Log()
        log.lifecycle("c1", Stage.COMMITTED)
        log.add("chunk_retired", chunk="c1")
        log.add("chunk_retired", chunk="c1")
        assert "c1" not in log.state.chunks
        assert log.state.batch_ids() == {"msgbatch_c1"}
        assert log.state.batch_owner("msgbatch_c1") == "c1"
        assert log.state.pipelines["p"].succeeded == 3
        with pytest.raises(ManifestCorrupt, match="retired chunk c1"):
            log.add("ended", chunk="c1", batch_id="msgbatch_c1", counts={})

    def test_retire_before_commit_is_corrupt(self) -> None:
        """Retiring a chunk whose results are not committed would lose them."""
        log = Log()
        log.lifecycle("c1", Stage.SUBMITTED)
        with pytest.raises(ManifestCorrupt, match="retired at submitted"):
            log.add("chunk_retired", chunk="c1")


class TestPipelinesAndAlarms:
    def test_pause_and_resume(self) -> None:
        """pipeline_paused records the reason; pipeline_resumed clears it."""
        log = Log()
        log.add("pipeline_paused", pipeline="p", reason="billing_error")
        assert log.state.pipelines["p"].paused == "billing_error"
        log.add("pipeline_resumed", pipeline="p")
        assert log.state.pipelines["p"].paused is None

    def test_alarms_keep_the_last_hundred(self) -> None:
        """Only the most recent alarms are kept, newest last."""
        log = Log()
        for n in range(ALARMS_KEPT + 5):
            log.add("alarm", pipeline="p", chunk=None, alarm_kind="missing", message=f"m{n}")
        assert len(log.state.alarms) == ALARMS_KEPT
        assert log.state.alarms[-1].message == f"m{ALARMS_KEPT + 4}"
        assert log.state.alarms[0].kind == "missing"


class TestValidation:
    def test_unknown_kind(self) -> None:
        """An unknown kind is named in the error."""
        with pytest.raises(ValueError, match="unknown manifest record kind 'bogus'"):
            validate_fields("bogus", {})

    def test_missing_and_mistyped_fields(self) -> None:
        """Missing fields are listed; a wrongly typed one names kind, field and types."""
        with pytest.raises(ValueError, match="submitted record is missing batch_id, created_at"):
            validate_fields("submitted", {"chunk": "c"})
        with pytest.raises(ValueError, match=r"submit_intent.requests must be int, not bool"):
            validate_fields("submit_intent", {"chunk": "c", "at": 1.0, "requests": True})

    def test_snapshot_only_first(self) -> None:
        """A snapshot after other records is corrupt."""
        log = Log()
        log.add("pipeline_resumed", pipeline="p")
        with pytest.raises(ManifestCorrupt, match="only be the first record"):
            log.add("snapshot", state=ManifestState().to_snapshot())


class TestSnapshot:
    def test_round_trip(self) -> None:
        """from_snapshot(to_snapshot()) equals the state, including retired memory."""
        log = Log()
        log.lifecycle("c1", Stage.COMMITTED)
        log.add("chunk_retired", chunk="c1")
        log.lifecycle("c2", Stage.ENDED)
        log.add("alarm", pipeline=None, chunk="c2", alarm_kind="k", message="m")
        assert ManifestState.from_snapshot(log.state.to_snapshot()) == log.state

    def test_malformed_snapshot(self) -> None:
        """A snapshot missing a key is reported as corrupt, not a KeyError."""
        with pytest.raises(ManifestCorrupt, match="snapshot is malformed"):
            ManifestState.from_snapshot({"version": 1, "seq": 1})


# -- property tests: any valid log, any prefix, any torn tail ------------------

PIPELINES = ("p", "q")


class LogModel:
    """Generates only legal records, tracking just enough to stay legal and to check totals."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.stage: dict[str, str] = {}
        self.sealed: dict[str, dict[str, Any]] = {}
        self.last: dict[tuple[str, str], dict[str, Any]] = {}
        self.next_no = dict.fromkeys(PIPELINES, 0)
        self.read = dict.fromkeys(PIPELINES, 0)
        self.committed: dict[str, int | None] = dict.fromkeys(PIPELINES)
        self.totals = {p: {"succeeded": 0, "dead": 0, "batches": 0} for p in PIPELINES}
        self.retired: set[str] = set()
        self.batches: set[str] = set()

    def emit(self, kind: str, **fields: Any) -> None:
        record = {"seq": len(self.records) + 1, "ts": 1.5, "kind": kind, **fields}
        self.records.append(record)
        if "chunk" in fields and kind != "alarm":
            self.last[(fields["chunk"], kind)] = fields

    def seal(self, fields: dict[str, Any], emit: bool = True) -> None:
        self.sealed[fields["chunk"]] = fields
        self.stage[fields["chunk"]] = "sealed"
        if emit:
            self.emit("chunk_sealed", **fields)

    def step(self, data: st.DataObject) -> None:
        live = sorted(c for c in self.stage if c not in self.retired)
        action = data.draw(
            st.sampled_from(["seal", "advance", "advance", "advance", "source", "dup", "misc"])
        )
        if action == "seal" or (action in ("advance", "dup") and not live):
            pipeline = data.draw(st.sampled_from(PIPELINES))
            requests = data.draw(st.integers(0, 4))
            first = self.read[pipeline] + 1
            self.read[pipeline] += max(requests, 1)
            chunk = f"{pipeline}-{self.next_no[pipeline]}"
            self.next_no[pipeline] += 1
            self.seal(
                sealed_fields(
                    chunk,
                    pipeline,
                    requests=requests,
                    rejects=int(not requests),
                    first_seq=first,
                    last_seq=self.read[pipeline],
                    position={"n": self.read[pipeline]},
                )
            )
        elif action == "advance":
            self.advance(data, data.draw(st.sampled_from(live)))
        elif action == "source":
            pipeline = data.draw(st.sampled_from(PIPELINES))
            seq = (self.committed[pipeline] or 0) + data.draw(st.integers(1, 6))
            self.committed[pipeline] = seq
            self.emit("source_committed", pipeline=pipeline, position={"n": seq}, source_seq=seq)
        elif action == "dup":
            chunk = data.draw(st.sampled_from(live))
            done = [k for (c, k) in self.last if c == chunk]
            if done:
                kind = data.draw(st.sampled_from(sorted(done)))
                self.emit(kind, **self.last[(chunk, kind)])
        else:
            pipeline = data.draw(st.sampled_from(PIPELINES))
            kind = data.draw(st.sampled_from(["pipeline_paused", "pipeline_resumed", "alarm"]))
            extras: dict[str, dict[str, Any]] = {
                "pipeline_paused": {"reason": "billing_error"},
                "pipeline_resumed": {},
                "alarm": {"chunk": None, "alarm_kind": "k", "message": "m"},
            }
            self.emit(kind, pipeline=pipeline, **extras[kind])

    def advance(self, data: st.DataObject, chunk: str) -> None:
        stage, sealed = self.stage[chunk], self.sealed[chunk]
        pipeline, requests, batch = sealed["pipeline"], sealed["requests"], f"b-{chunk}"
        if stage == "sealed" and requests == 0:
            self.commit(data, chunk, None)
        elif stage in ("sealed", "intent") and (stage == "sealed" or data.draw(st.booleans())):
            at = float(len(self.records))
            self.emit("submit_intent", chunk=chunk, at=at, requests=requests)
            self.stage[chunk] = "intent"
        elif stage == "intent":
            self.emit("submitted", chunk=chunk, batch_id=batch, created_at="t")
            self.totals[pipeline]["batches"] += 1
            self.batches.add(batch)
            self.stage[chunk] = "submitted"
        elif stage == "submitted":
            self.emit("ended", chunk=chunk, batch_id=batch, counts={"succeeded": requests})
            self.stage[chunk] = "ended"
        elif stage == "ended":
            self.commit(data, chunk, batch)
        else:
            self.emit("chunk_retired", chunk=chunk)
            self.retired.add(chunk)

    def commit(self, data: st.DataObject, chunk: str, batch: str | None) -> None:
        sealed = self.sealed[chunk]
        retried = data.draw(st.integers(0, sealed["requests"]))
        retry = None
        if retried:
            retry = sealed_fields(
                f"{chunk}-r",
                sealed["pipeline"],
                attempt=sealed["attempt"] + 1,
                requests=retried,
                first_seq=None,
                last_seq=None,
                position=None,
                parent=chunk,
            )
        succeeded = sealed["requests"] - retried
        dead = sealed["rejects"]
        self.emit(
            "results_committed",
            **committed_fields(
                chunk, batch, succeeded=succeeded, dead=dead, retried=retried, retry_chunk=retry
            ),
        )
        self.totals[sealed["pipeline"]]["succeeded"] += succeeded
        self.totals[sealed["pipeline"]]["dead"] += dead
        self.stage[chunk] = "committed"
        if retry is not None:
            self.seal(retry, emit=False)


@st.composite
def valid_logs(draw: st.DrawFn) -> LogModel:
    model = LogModel()
    data = draw(st.data())
    for _ in range(draw(st.integers(0, 60))):
        model.step(data)
    return model


def applied(records: list[dict[str, Any]], state: ManifestState | None = None) -> ManifestState:
    state = state or ManifestState()
    for record in records:
        state.apply(record)
    return state


def json_round_trip(state: ManifestState) -> ManifestState:
    return ManifestState.from_snapshot(orjson.loads(orjson.dumps(state.to_snapshot())))


def torn_tails(next_line: bytes) -> st.SearchStrategy[bytes]:
    """Whatever a crash can leave after the last durable line."""

    def flip(at: int) -> bytes:
        value = next_line[at] ^ 0x20
        return next_line[:at] + bytes([value if value != 0x0A else 0x2A]) + next_line[at + 1 :]

    return st.one_of(
        st.just(b""),
        st.binary(min_size=1, max_size=80).map(lambda b: b.replace(b"\n", b"")),
        st.integers(1, len(next_line) - 1).map(lambda cut: next_line[:cut]),
        st.integers(0, len(next_line) - 2).map(flip),
        st.just(b"\0" * 4096),
    )


MODEST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class TestReplayProperties:
    @MODEST
    @given(model=valid_logs(), data=st.data())
    def test_any_prefix_with_torn_tail_replays_to_prefix_state(
        self, model: LogModel, data: st.DataObject
    ) -> None:
        """Replaying a prefix plus any torn tail yields exactly the prefix's state."""
        records = model.records
        k = data.draw(st.integers(0, len(records)), label="prefix")
        expected = applied(records[:k])
        body = b"".join(encode_line(r) for r in records[:k])
        following = (
            records[k]
            if k < len(records)
            else {"seq": k + 1, "ts": 2.0, "kind": "pipeline_resumed", "pipeline": "p"}
        )
        tail = data.draw(torn_tails(encode_line(following)), label="tail")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "manifest.jsonl"
            path.write_bytes(body + tail)
            state, size = replay(path)
            assert (state, size) == (expected, len(body))
            assert path.stat().st_size == len(body) + len(tail)
            state, size = replay(path, truncate=True)
            assert state == expected
            assert size == len(body) == path.stat().st_size
        assert ManifestState.from_snapshot(expected.to_snapshot()) == expected
        assert json_round_trip(expected) == expected

    @MODEST
    @given(model=valid_logs(), data=st.data())
    def test_snapshot_then_rest_equals_whole_log(
        self, model: LogModel, data: st.DataObject
    ) -> None:
        """Compacting at any point and applying the rest gives the state of the whole log."""
        records = model.records
        j = data.draw(st.integers(0, len(records)), label="compact at")
        resumed = applied(records[j:], json_round_trip(applied(records[:j])))
        assert resumed == applied(records)

    @MODEST
    @given(model=valid_logs())
    def test_state_agrees_with_model(self, model: LogModel) -> None:
        """Live chunks, their stages and the pipeline totals match an independent model."""
        state = applied(model.records)
        live = {c: s for c, s in model.stage.items() if c not in model.retired}
        assert set(state.chunks) == set(live)
        for chunk_id, stage in live.items():
            chunk = state.chunks[chunk_id]
            if stage == "committed":
                committed = model.committed[chunk.pipeline]
                covered = (
                    chunk.covers_seq is not None
                    and committed is not None
                    and (chunk.covers_seq <= committed)
                )
                assert chunk.source_committed == covered
            else:
                assert chunk.stage == stage
        for name, totals in model.totals.items():
            pipeline = state.pipelines.get(name)
            got = (
                (0, 0, 0)
                if pipeline is None
                else (pipeline.succeeded, pipeline.dead, pipeline.batches_submitted)
            )
            assert got == (totals["succeeded"], totals["dead"], totals["batches"])
            if pipeline is not None:
                assert pipeline.next_chunk_no == model.next_no[name]
        assert state.batch_ids() == model.batches


class TestIdScheme:
    def test_chunks_and_batches_carry_the_scheme_they_were_made_with(self) -> None:
        """A chunk takes the latest recorded scheme, its retry chunk the parent's; a batch
        records its chunk's scheme as the pipeline's, kept across a snapshot and a retire."""
        log = Log()
        log.add("chunk_sealed", **sealed_fields("c0"))  # before any scheme was recorded
        assert log.state.chunk_schemes == {}
        log.add("id_scheme", pipeline="p", fingerprint="old", template="t-{id}")
        log.lifecycle("c1", Stage.ENDED)
        log.add("id_scheme", pipeline="p", fingerprint="new", template="u-{id}")
        retry = sealed_fields("c1-r", attempt=2, first_seq=None, last_seq=None, position=None,
                              parent="c1")
        log.add("results_committed", **committed_fields("c1", "msgbatch_c1", retry_chunk=retry))
        log.add("chunk_sealed", **sealed_fields("c2", first_seq=4, last_seq=6))
        state = log.state
        assert state.chunk_schemes == {"c1": "old", "c1-r": "old", "c2": "new"}
        assert (state.id_schemes, state.batch_schemes) == ({"p": "new"}, {"p": "old"})
        assert state.scheme_templates == {"old": "t-{id}", "new": "u-{id}"}
        assert ManifestState.from_snapshot(orjson.loads(orjson.dumps(state.to_snapshot()))) \
            == state
        log.add("source_committed", pipeline="p", position=None, source_seq=3)
        log.add("chunk_retired", chunk="c1")
        assert "c1" not in log.state.chunk_schemes

    def test_a_snapshot_written_before_schemes_existed_reads_without_them(self) -> None:
        """Old snapshots have no scheme keys: nothing recorded, as before."""
        log = Log()
        log.lifecycle("c1", Stage.SUBMITTED)
        old = {k: v for k, v in log.state.to_snapshot().items()
               if k not in ("id_schemes", "batch_schemes", "chunk_schemes", "scheme_templates")}
        state = ManifestState.from_snapshot(old)
        assert (state.id_schemes, state.batch_schemes, state.chunk_schemes) == ({}, {}, {})
        assert state == log.state
