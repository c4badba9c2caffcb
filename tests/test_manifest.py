"""
The durable manifest on real files with real fsyncs: round trips, torn tails,
corruption, group commit, compaction (including a SIGKILL mid-way) and the lock.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest

from batchd.daemon.wal.manifest import Manifest, ManifestCorrupt, crash_point, encode_line, replay
from batchd.daemon.wal.manifest_state import Stage
from batchd.daemon.wal.records import AlarmRaised, SourceCommitted, Submitted, record_from
from batchd.plugins.errors import FatalError

REPO = Path(__file__).resolve().parent.parent


def sealed(chunk: str, first: int, last: int, pipeline: str = "p") -> dict[str, Any]:
    """Fields of a fresh chunk covering read sequences first..last."""
    return {
        "pipeline": pipeline,
        "chunk": chunk,
        "attempt": 1,
        "requests": last - first + 1,
        "bytes": 100 * (last - first + 1),
        "rejects": 0,
        "first_seq": first,
        "last_seq": last,
        "position": {"line": last},
        "parent": None,
    }


async def lifecycle(m: Manifest, n: int, *, retire: bool = True) -> None:
    """Run chunk *n* of pipeline p from sealed to (optionally) retired."""
    chunk, batch = f"p-{n:06d}", f"msgbatch_{n:06d}"
    first, last = 10 * n + 1, 10 * n + 10
    await put(m, "chunk_sealed", **sealed(chunk, first, last))
    await put(m, "submit_intent", chunk=chunk, at=1000.0 + n, requests=10)
    await put(m, "submitted", chunk=chunk, batch_id=batch, created_at="2026-01-01T00:00:00Z")
    await put(m, "ended", chunk=chunk, batch_id=batch, counts={"succeeded": 10, "errored": 0})
    await put(m,
        "results_committed",
        chunk=chunk,
        batch_id=batch,
        succeeded=9,
        truncated=1,
        dead=0,
        retried=0,
        cost_usd=0.125,
        input_tokens=100,
        output_tokens=200,
        retry_chunk=None,
    )
    await put(m, "source_committed", pipeline="p", position={"line": last}, source_seq=last)
    if retire:
        await put(m, "chunk_retired", chunk=chunk)


async def put(m: Manifest, kind: str, **fields: Any) -> dict[str, Any]:
    """Append the typed record that a stored *kind* with *fields* stands for."""
    return await m.append(record_from(kind, fields))


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


class TestAppendReplay:
    @pytest.mark.anyio
    async def test_round_trip(self, tmp_path: Path) -> None:
        """A reopened manifest replays to the same state and continues the seq."""
        async with await Manifest.open(tmp_path) as m:
            for n in range(3):
                await lifecycle(m, n, retire=n != 2)
            await put(m, "pipeline_paused", pipeline="p", reason="billing_error")
            before = m.state.to_snapshot()
            size = m.size_bytes()
        assert size == (tmp_path / "manifest.jsonl").stat().st_size
        async with await Manifest.open(tmp_path) as m:
            assert m.state.to_snapshot() == before
            assert m.state.chunks["p-000002"].stage is Stage.SOURCE_COMMITTED
            assert m.state.pipelines["p"].succeeded == 27
            record = await put(m, "pipeline_resumed", pipeline="p")
            assert record["seq"] == before["seq"] + 1

    @pytest.mark.anyio
    async def test_lines_are_checksummed_json(self, tmp_path: Path) -> None:
        """Every line is '<crc32 hex> <compact JSON>' with seq increasing from 1."""
        async with await Manifest.open(tmp_path) as m:
            await lifecycle(m, 0)
        for n, line in enumerate(lines_of(tmp_path / "manifest.jsonl"), start=1):
            match = re.fullmatch(rb"([0-9a-f]{8}) (\{.*\})\n", line)
            assert match is not None
            assert int(match[1], 16) == zlib.crc32(match[2])
            assert orjson.loads(match[2])["seq"] == n

    @pytest.mark.anyio
    async def test_returned_record_is_applied(self, tmp_path: Path) -> None:
        """append returns the full record, already reflected in state."""
        async with await Manifest.open(tmp_path) as m:
            record = await put(m, "chunk_sealed", **sealed("c1", 1, 5))
            assert record["kind"] == "chunk_sealed" and record["seq"] == 1
            assert isinstance(record["ts"], float)
            assert m.state.chunks["c1"].requests == 5

    @pytest.mark.anyio
    async def test_envelope_names_are_stored_apart(self, tmp_path: Path) -> None:
        """An alarm's kind and a source commit's seq are stored as alarm_kind/source_seq."""
        async with await Manifest.open(tmp_path) as m:
            alarm = await m.append(AlarmRaised(pipeline="p", chunk=None, alarm_kind="auth",
                                               message="401"))
            commit = await m.append(SourceCommitted(pipeline="p", position={}, source_seq=7))
            assert (alarm["kind"], alarm["alarm_kind"]) == ("alarm", "auth")
            assert (commit["seq"], commit["source_seq"]) == (2, 7)
            assert m.state.alarms[0].kind == "auth"
            assert m.state.pipelines["p"].committed_seq == 7

    @pytest.mark.anyio
    async def test_bad_records_refused_before_writing(self, tmp_path: Path) -> None:
        """Unknown kinds, missing fields and illegal transitions raise without writing."""
        async with await Manifest.open(tmp_path) as m:
            with pytest.raises(ValueError, match="unknown manifest record kind 'nope'"):
                await put(m, "nope", chunk="c")
            with pytest.raises(ValueError, match="missing batch_id, created_at"):
                await put(m, "submitted", chunk="c")
            with pytest.raises(ValueError, match=r"submitted\.batch_id must be str, not int"):
                await m.append(Submitted(chunk="c", batch_id=5, created_at="t"))  # type: ignore[arg-type]
            with pytest.raises(ValueError, match=r"illegal submitted record: .*unknown chunk c"):
                await put(m, "submitted", chunk="c", batch_id="b", created_at="t")
            with pytest.raises(ValueError, match="not JSON-serialisable"):
                await m.append(SourceCommitted(pipeline="p", position={"x": object()},
                                               source_seq=1))
            assert m.size_bytes() == 0
            record = await put(m, "pipeline_resumed", pipeline="p")
            assert record["seq"] == 1

    @pytest.mark.anyio
    async def test_cancelled_append_still_completes(self, tmp_path: Path) -> None:
        """An append whose caller is cancelled is still written and applied."""
        async with await Manifest.open(tmp_path) as m:
            with anyio.CancelScope() as scope:
                scope.cancel()
                await put(m, "pipeline_paused", pipeline="p", reason="r")
            assert m.state.pipelines["p"].paused == "r"
        assert len(lines_of(tmp_path / "manifest.jsonl")) == 1


class TestTornTail:
    @pytest.mark.anyio
    async def test_every_cut_inside_last_line(self, tmp_path: Path) -> None:
        """Cutting the last line at any byte drops it, truncates it and appends validly."""
        source = tmp_path / "source"
        async with await Manifest.open(source) as m:
            await lifecycle(m, 0, retire=False)
            expected = m.state.to_snapshot()
            await put(m, "chunk_retired", chunk="p-000000")
        data = (source / "manifest.jsonl").read_bytes()
        start = data.rindex(b"\n", 0, len(data) - 1) + 1
        state_dir = tmp_path / "cut"
        for cut in range(start + 1, len(data)):
            state_dir.mkdir(exist_ok=True)
            (state_dir / "manifest.jsonl").write_bytes(data[:cut])
            async with await Manifest.open(state_dir) as m:
                assert m.state.to_snapshot() == expected, cut
                assert m.size_bytes() == start == (state_dir / "manifest.jsonl").stat().st_size
                await put(m, "chunk_retired", chunk="p-000000")
            state, size = replay(state_dir / "manifest.jsonl")
            assert "p-000000" not in state.chunks
            assert size == (state_dir / "manifest.jsonl").stat().st_size

    @pytest.mark.anyio
    async def test_bad_checksum_on_last_line_is_torn(self, tmp_path: Path) -> None:
        """A complete last line failing its checksum is dropped like a torn one."""
        async with await Manifest.open(tmp_path) as m:
            await put(m, "pipeline_paused", pipeline="p", reason="one")
            await put(m, "pipeline_paused", pipeline="p", reason="two")
        path = tmp_path / "manifest.jsonl"
        path.write_bytes(path.read_bytes().replace(b'"two"', b'"twx"'))
        async with await Manifest.open(tmp_path) as m:
            assert m.state.pipelines["p"].paused == "one"
            assert len(lines_of(path)) == 1


class TestCorruption:
    async def _four_records(self, state_dir: Path) -> Path:
        async with await Manifest.open(state_dir) as m:
            for reason in ("a", "b", "c", "d"):
                await put(m, "pipeline_paused", pipeline="p", reason=reason)
        return state_dir / "manifest.jsonl"

    @pytest.mark.anyio
    async def test_checksum_mismatch_in_middle_names_line(self, tmp_path: Path) -> None:
        """A damaged line before the last is corruption naming the file and line."""
        path = await self._four_records(tmp_path)
        path.write_bytes(path.read_bytes().replace(b'"b"', b'"B"'))
        with pytest.raises(ManifestCorrupt, match=r"manifest\.jsonl line 2: checksum mismatch"):
            await Manifest.open(tmp_path)
        assert len(lines_of(path)) == 4

    @pytest.mark.anyio
    async def test_garbage_line_in_middle(self, tmp_path: Path) -> None:
        """A line that is not '<crc> <json>' in the middle is corruption too."""
        path = await self._four_records(tmp_path)
        lines = lines_of(path)
        path.write_bytes(b"".join([*lines[:2], b"garbage\n", *lines[2:]]))
        with pytest.raises(ManifestCorrupt, match="line 3: not '<crc32> <json>'"):
            await Manifest.open(tmp_path)

    @pytest.mark.anyio
    async def test_seq_must_increase(self, tmp_path: Path) -> None:
        """A well-formed line whose seq does not increase is corruption."""
        path = await self._four_records(tmp_path)
        lines = lines_of(path)
        path.write_bytes(b"".join([*lines, lines[1]]))
        with pytest.raises(ManifestCorrupt, match="line 5: seq 2 does not follow 4"):
            await Manifest.open(tmp_path)

    @pytest.mark.anyio
    async def test_illegal_transition_names_line(self, tmp_path: Path) -> None:
        """A checksummed but illegal record is reported with its line and seq."""
        path = await self._four_records(tmp_path)
        bad = {"seq": 5, "ts": 1.0, "kind": "ended", "chunk": "x", "batch_id": "b", "counts": {}}
        with path.open("ab") as f:
            f.write(encode_line(bad))
        with pytest.raises(ManifestCorrupt, match=r"line 5: seq 5: .*unknown chunk x"):
            await Manifest.open(tmp_path)

    @pytest.mark.anyio
    async def test_corrupt_open_releases_lock(self, tmp_path: Path) -> None:
        """A failed open does not leave the state dir locked."""
        path = await self._four_records(tmp_path)
        path.write_bytes(b"x\n" + path.read_bytes())
        with pytest.raises(ManifestCorrupt):
            await Manifest.open(tmp_path)
        path.write_bytes(b"")
        async with await Manifest.open(tmp_path) as m:
            assert m.state.seq == 0


class TestGroupCommit:
    @pytest.mark.anyio
    async def test_concurrent_appends_share_fsyncs(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """200 concurrent appends are all durable, in seq order, with far fewer fsyncs."""
        syncs = []
        real = os.fdatasync

        def counting(fd: int) -> None:
            syncs.append(fd)
            real(fd)

        monkeypatch.setattr(os, "fdatasync", counting)
        seqs: list[int] = []

        async def one(n: int) -> None:
            record = await put(m, "alarm", pipeline="p", chunk=None, alarm_kind="k", message=str(n))
            seqs.append(record["seq"])

        async with await Manifest.open(tmp_path) as m:
            async with anyio.create_task_group() as tg:
                for n in range(200):
                    tg.start_soon(one, n)
            assert m.fsync_count == len(syncs)
        assert sorted(seqs) == list(range(1, 201))
        assert 1 <= len(syncs) <= 20
        lines = lines_of(tmp_path / "manifest.jsonl")
        assert [orjson.loads(line[9:])["seq"] for line in lines] == list(range(1, 201))
        messages = {orjson.loads(line[9:])["message"] for line in lines}
        assert messages == {str(n) for n in range(200)}


class TestCompaction:
    @pytest.mark.anyio
    async def test_compaction_keeps_state_and_shrinks(self, tmp_path: Path) -> None:
        """A compacted log is one snapshot line replaying to the same state and totals."""
        async with await Manifest.open(tmp_path) as m:
            for n in range(30):
                await lifecycle(m, n, retire=n < 28)
            before, size = m.state.to_snapshot(), m.size_bytes()
            await m.compact()
            assert m.state.to_snapshot() == before
            assert m.size_bytes() < size // 2
            assert len(lines_of(tmp_path / "manifest.jsonl")) == 1
            await put(m, "chunk_retired", chunk="p-000028")
        async with await Manifest.open(tmp_path) as m:
            assert m.state.seq == before["seq"] + 1
            assert set(m.state.chunks) == {"p-000029"}
            pipeline = m.state.pipelines["p"]
            assert (pipeline.succeeded, pipeline.batches_submitted) == (270, 30)
            assert pipeline.cost_usd == 30 * 0.125
            assert "msgbatch_000003" in m.state.batch_ids()

    @pytest.mark.anyio
    async def test_compacts_automatically(self, tmp_path: Path) -> None:
        """Appends past compact_bytes compact the log without losing anything."""
        async with await Manifest.open(tmp_path, compact_bytes=8192) as m:
            for n in range(40):
                await lifecycle(m, n)
            assert m.compactions >= 2
            assert m.size_bytes() < 2 * 8192
            expected = m.state.to_snapshot()
        async with await Manifest.open(tmp_path) as m:
            assert m.state.to_snapshot() == expected
            assert m.state.pipelines["p"].next_chunk_no == 40

    @pytest.mark.anyio
    async def test_failed_compaction_keeps_old_log(self, tmp_path: Path) -> None:
        """A snapshot that cannot be written leaves the old log in use and intact."""
        async with await Manifest.open(tmp_path) as m:
            await lifecycle(m, 0)
            (tmp_path / "manifest.jsonl.tmp").mkdir()
            with pytest.raises(IsADirectoryError):
                await m.compact()
            await put(m, "pipeline_paused", pipeline="p", reason="r")
            expected = m.state.to_snapshot()
        (tmp_path / "manifest.jsonl.tmp").rmdir()
        async with await Manifest.open(tmp_path) as m:
            assert m.state.to_snapshot() == expected
            assert m.compactions == 0 and m.state.seq == 8

    @pytest.mark.anyio
    async def test_sigkill_mid_compaction(self, tmp_path: Path) -> None:
        """SIGKILL between writing the snapshot and the rename leaves a valid, equal log."""
        script = textwrap.dedent(
            f"""
            import sys, anyio, orjson
            sys.path.insert(0, {str(REPO)!r})
            from pathlib import Path
            from batchd.daemon.wal.manifest import Manifest
            from tests.test_manifest import lifecycle

            async def main():
                m = await Manifest.open(Path({str(tmp_path)!r}))
                for n in range(5):
                    await lifecycle(m, n, retire=n % 2 == 0)
                sys.stdout.buffer.write(orjson.dumps(m.state.to_snapshot()))
                sys.stdout.flush()
                await m.compact()

            anyio.run(main)
            """
        )
        env = {**os.environ, "BATCHD_CRASH_AT": "compaction"}
        done = await anyio.run_process(
            [sys.executable, "-c", script], env=env, cwd=REPO, check=False
        )
        assert done.returncode == -signal.SIGKILL, done.stderr.decode()
        assert (tmp_path / "manifest.jsonl.tmp").exists()
        expected = orjson.loads(done.stdout)
        async with await Manifest.open(tmp_path) as m:
            assert not (tmp_path / "manifest.jsonl.tmp").exists()
            assert m.state.to_snapshot() == expected
            await m.compact()
            await put(m, "chunk_retired", chunk="p-000001")
        async with await Manifest.open(tmp_path) as m:
            assert m.state.seq == expected["seq"] + 1
            assert "p-000001" not in m.state.chunks


class TestLock:
    @pytest.mark.anyio
    async def test_second_process_is_refused(self, tmp_path: Path) -> None:
        """A second batchd on the same state dir fails naming the holder's pid."""
        script = (
            "import anyio, sys; from pathlib import Path; "
            "from batchd.daemon.wal.manifest import Manifest;"
            f"anyio.run(Manifest.open, Path({str(tmp_path)!r}))"
        )
        async with await Manifest.open(tmp_path):
            done = await anyio.run_process([sys.executable, "-c", script], cwd=REPO, check=False)
            assert done.returncode == 1
            message = f"state dir {tmp_path} is in use by another batchd (pid {os.getpid()})"
            assert message in done.stderr.decode()
            with pytest.raises(FatalError, match="in use by another batchd"):
                await Manifest.open(tmp_path)
        done = await anyio.run_process([sys.executable, "-c", script], cwd=REPO, check=False)
        assert done.returncode == 0, done.stderr.decode()


class TestCrashPoint:
    def test_nth_arrival_kills(self) -> None:
        """name:N kills the N-th time the point is reached, not before."""
        script = (
            "from batchd.daemon.wal.manifest import crash_point\n"
            "for n in range(3):\n"
            "    crash_point('drill'); crash_point('other'); print(n, flush=True)\n"
        )
        env = {**os.environ, "BATCHD_CRASH_AT": "drill:2"}
        done = subprocess.run(
            [sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True, check=False
        )
        assert done.returncode == -signal.SIGKILL
        assert done.stdout == b"0\n"

    def test_unset_does_nothing(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Without BATCHD_CRASH_AT (or naming another point) crash_point returns."""
        monkeypatch.delenv("BATCHD_CRASH_AT", raising=False)
        crash_point("compaction")
        monkeypatch.setenv("BATCHD_CRASH_AT", "elsewhere")
        crash_point("compaction")
