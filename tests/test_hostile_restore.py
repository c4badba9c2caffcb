"""
Hostile operator, part 1: the state directory goes back in time or loses pieces.

Issue 12, cases 1, 3, 5 and 6. Each test breaks the state the way an operator
or a host would (a restored backup, a truncated manifest, a deleted ledger, a
missing spool file, a batch the API forgot) and proves from the emulator's
``received`` counters that nothing was paid twice and from the sinks that every
row has its outcome.
"""

from __future__ import annotations

import csv
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from batchd.daemon.emulator import EmulatorThread
from batchd.daemon.wal.manifest import MANIFEST_NAME
from tests.fixtures.emulator import sdk_client
from tests.fixtures.engine import RULES_PATH, Workspace, csv_keys, describe
from tests.fixtures.hostile import (
    CHUNKS,
    assert_nothing_lost,
    assert_paid_once,
    copy_state,
    custom_ids,
    one_line,
    received,
    restore_state,
    start_daemon,
    stop_daemon,
    tickets_workspace,
    wait_for,
)

pytestmark = pytest.mark.timeout(240)

def alarms(ws: Workspace) -> list[dict[str, object]]:
    return list(ws.status()["alarms"])


@pytest.fixture
def setup(
    emulator_factory: Callable[..., EmulatorThread], workspace: Callable[..., Workspace]
) -> tuple[EmulatorThread, Workspace, list[str]]:
    return tickets_workspace(emulator_factory, workspace)


class TestRestoredState:
    def test_restored_backup_pays_nothing_twice(
        self, setup: tuple[EmulatorThread, Workspace, list[str]]
    ) -> None:
        """Case 1: a backup taken after 2 batches, restored after all: the later batches are
        adopted from the API by their custom_ids, not paid again."""
        emulator, ws, keys = setup
        ws.crash("after_source_commit:2")
        backup = copy_state(ws)
        ws.run_ok()
        assert_paid_once(emulator, expected=custom_ids(keys))
        created = emulator.stats()["batches_created"]

        restore_state(ws, backup)
        proc = ws.run_ok()
        assert_paid_once(emulator, expected=custom_ids(keys))
        assert emulator.stats()["batches_created"] == created
        assert "adopted" in proc.stdout
        assert_nothing_lost(ws, keys)
        assert ws.spool_files() == []

    def test_restored_backup_with_another_chunking_still_adopts(
        self, setup: tuple[EmulatorThread, Workspace, list[str]]
    ) -> None:
        """Case 1, careless: the backup is restored and max_requests changed too. The chunks
        rebuilt for batches the API already has follow those batches' boundaries."""
        emulator, ws, keys = setup
        ws.crash("after_source_commit:2")
        backup = copy_state(ws)
        ws.run_ok()
        created = emulator.stats()["batches_created"]

        restore_state(ws, backup)
        ws.write_config(**{**CHUNKS, "max_requests": 35})
        ws.run_ok()
        assert emulator.stats()["batches_created"] == created
        assert_paid_once(emulator, expected=custom_ids(keys))
        assert_nothing_lost(ws, keys)

    def test_truncated_manifest_pays_nothing_twice_and_drains(
        self, setup: tuple[EmulatorThread, Workspace, list[str]]
    ) -> None:
        """Case 1: a manifest cut mid-record after a finished run: chunks it still thinks live
        have lost their spool (re-read from the source), later ones are adopted; the run
        drains instead of retrying a missing file forever."""
        emulator, ws, keys = setup
        ws.run_ok()
        manifest = ws.state_dir / MANIFEST_NAME
        data = manifest.read_bytes()
        manifest.write_bytes(data[: int(len(data) * 0.45)])
        proc = ws.run(timeout=120)
        assert proc.returncode == 0, describe(proc)
        assert_paid_once(emulator, expected=custom_ids(keys))
        assert_nothing_lost(ws, keys)
        assert ws.manifest_state().chunks == {}


class TestUnknownBatches:
    def test_a_batch_sharing_some_custom_ids_stops_the_pipeline_until_decided(
        self, emulator_factory: Callable[..., EmulatorThread],
        workspace: Callable[..., Workspace],
    ) -> None:
        """Another tool in the workspace sent 10 of our custom_ids among others: batchd sends
        nothing (exit 3, `unknown_batches` naming the batch and the chunk); adopting it for
        the chunk collects those 10 rows from it, and nothing is paid twice."""
        emulator = emulator_factory(rules=RULES_PATH)
        ws = workspace(emulator.base_url)
        source = ws.root / "tickets.csv"
        source.write_text("ticket_id,body\n", encoding="utf-8")
        ws.write_config(**CHUNKS)
        ws.run_ok()  # the state dir exists from here on
        keys = csv_keys(ws.write_tickets(100))
        shared = custom_ids(keys[:10])
        requests = [*shared, "x-1", "x-2", "x-3", "x-4", "x-5"]
        foreign = sdk_client(emulator.base_url).messages.batches.create(requests=[
            {"custom_id": cid, "params": {"model": "claude-haiku-4-5", "max_tokens": 8,
                                          "messages": [{"role": "user", "content": "refund"}]}}
            for cid in requests
        ])

        stopped = ws.run()
        assert stopped.returncode == 3, describe(stopped)
        assert foreign.id in stopped.stderr
        alarm = [a for a in alarms(ws) if a["kind"] == "unknown_batches"]
        assert alarm and foreign.id in alarm[-1]["message"]
        chunk = alarm[-1]["chunk"]
        assert emulator.stats()["batches_created"] == 1  # the foreign one only
        listed = ws.run("reconcile", str(ws.config_path))
        assert listed.returncode == 0 and foreign.id in listed.stdout, describe(listed)

        adopt = ws.run("reconcile", str(ws.config_path), "--adopt", foreign.id,
                       "--chunk", chunk)
        assert adopt.returncode == 0, describe(adopt)
        ws.run_ok()
        assert_paid_once(emulator, expected=custom_ids(keys))
        assert_nothing_lost(ws, keys)


class TestLostLedger:
    def test_deleted_ledger_is_refused_until_repaired(
        self, emulator_factory: Callable[..., EmulatorThread],
        workspace: Callable[..., Workspace],
    ) -> None:
        """Case 3: a deleted keys.sqlite is refused (exit 2, one line naming it and the repair
        command); `batchd repair` rebuilds it, and a key repeated later is still a duplicate."""
        emulator = emulator_factory(rules=RULES_PATH)
        ws = workspace(emulator.base_url)
        path = ws.write_tickets(200)
        with path.open("a", newline="", encoding="utf-8") as f:
            csv.writer(f).writerow(["T0000003", "A second ticket under an old id: refund me"])
        ws.write_config(**CHUNKS)
        ws.crash("after_source_commit:2")
        for name in ("keys.sqlite", "keys.sqlite-wal", "keys.sqlite-shm"):
            (ws.state_dir / name).unlink(missing_ok=True)

        refused = ws.run()
        assert refused.returncode == 2, describe(refused)
        error = one_line(refused)
        assert "keys.sqlite" in error and "batchd repair" in error

        repaired = ws.run("repair", str(ws.config_path))
        assert repaired.returncode == 0, describe(repaired)
        ws.run_ok()
        out = ws.outputs()
        assert out.dead["T0000003"]["error_type"] == "duplicate_key"
        assert "T0000003" in out.results
        assert_paid_once(emulator, expected=custom_ids(sorted(set(csv_keys(path)))))
        assert_nothing_lost(ws, csv_keys(path))


class TestLostSpool:
    def test_spool_lost_after_end_is_reread_from_source(
        self, setup: tuple[EmulatorThread, Workspace, list[str]]
    ) -> None:
        """Case 5: every spool file deleted while a batch had ended and others were sealed or
        in flight: one `spool_lost` alarm per chunk, rows re-read from the CSV, paid once."""
        emulator, ws, keys = setup
        ws.crash("after_ended:1")
        lost = ws.spool_files()
        assert lost
        for path in lost:
            path.unlink()
        proc = ws.run(timeout=120)
        assert proc.returncode == 0, describe(proc)
        kinds = [a for a in alarms(ws) if a["kind"] == "spool_lost"]
        assert {a["chunk"] for a in kinds} == {p.stem for p in lost}
        assert len(kinds) == len(lost)
        assert_paid_once(emulator, expected=custom_ids(keys))
        assert_nothing_lost(ws, keys)

    def test_spool_lost_of_a_sealed_chunk(
        self, setup: tuple[EmulatorThread, Workspace, list[str]]
    ) -> None:
        """Case 5: a sealed chunk's spool is gone before its create: re-read, sent once."""
        emulator, ws, keys = setup
        ws.crash("after_seal:2")
        sealed = ws.state_dir / "spool" / "tickets-000001.jsonl"
        sealed.unlink()
        proc = ws.run(timeout=120)
        assert proc.returncode == 0, describe(proc)
        assert "create outcome unknown" not in proc.stdout
        assert [a["chunk"] for a in alarms(ws) if a["kind"] == "spool_lost"] == [
            "tickets-000001"
        ]
        assert_paid_once(emulator, expected=custom_ids(keys))
        assert_nothing_lost(ws, keys)


    def test_spool_lost_and_source_changed_dead_letters_the_rows(
        self, emulator_factory: Callable[..., EmulatorThread],
        workspace: Callable[..., Workspace],
    ) -> None:
        """Case 5, worse: the lost chunk's rows changed in the file too (one key edited in
        place). They cannot be rebuilt, so the chunk's keys (from the ledger) are dead-lettered
        `spool_lost`; `dead-letters retry` then sends the ones the file still has."""
        emulator = emulator_factory(rules=RULES_PATH)
        ws = workspace(emulator.base_url)
        keys = [f"T{n:07d}" for n in range(1, 201)]
        body = "I was charged twice so please refund"
        source = ws.root / "tickets.csv"
        source.write_text("ticket_id,body\n" + "".join(f"{k},{body:<190}\n" for k in keys))
        ws.write_config(**CHUNKS)
        ws.crash("after_seal:2")
        (ws.state_dir / "spool" / "tickets-000001.jsonl").unlink()
        text = source.read_text()
        source.write_text(text.replace("T0000075,", "Z0000075,"))  # same length, in place

        proc = ws.run(timeout=120)
        assert proc.returncode == 0, describe(proc)
        assert [a["chunk"] for a in alarms(ws) if a["kind"] == "spool_lost"] == [
            "tickets-000001"
        ]
        lost = keys[50:100]
        out = ws.outputs()
        assert {k: d["error_type"] for k, d in out.dead.items()} == dict.fromkeys(
            lost, "spool_lost"
        )
        assert set(out.results) == set(keys) - set(lost)
        assert_paid_once(emulator)

        retry = ws.run("dead-letters", "retry", str(ws.config_path), "tickets", "--all")
        assert retry.returncode == 0, describe(retry)
        ws.run_ok()
        out = ws.outputs()
        assert set(out.results) == set(keys) - {"T0000075"}
        assert_paid_once(emulator, expected=custom_ids([k for k in keys if k != "T0000075"]))


class TestLostBatch:
    def test_batch_the_api_forgot_is_one_alarm_and_retriable_dead_letters(
        self, emulator_factory: Callable[..., EmulatorThread],
        workspace: Callable[..., Workspace], tmp_path: Path,
    ) -> None:
        """Case 6: the emulator restarts and forgets the in-flight batches: after the
        not-found window, one alarm per batch, its rows dead-lettered `batch_lost`, and
        `dead-letters retry --all` sends them again when the operator says so."""
        first = emulator_factory(rules=RULES_PATH, latency=3600.0)
        ws = workspace(first.base_url)
        keys = csv_keys(ws.write_tickets(60))
        ws.write_config(max_requests=30, linger="60s", api={"not_found_window": "1s"})
        daemon = start_daemon(ws)
        manifest = ws.state_dir / MANIFEST_NAME
        wait_for(lambda: manifest.exists() and manifest.read_bytes().count(b'"submitted"') >= 2,
                 "two batches submitted")
        assert stop_daemon(daemon, signal.SIGKILL) == -signal.SIGKILL
        first_received = received(first)
        first.stop()

        second = emulator_factory(rules=RULES_PATH)  # knows none of them
        ws.base_url = second.base_url
        proc = ws.run(timeout=120)
        assert proc.returncode == 0, describe(proc)
        lost = [a for a in alarms(ws) if a["kind"] == "batch_not_found"]
        assert len(lost) == 2, lost
        out = ws.outputs()
        assert {k: d["error_type"] for k, d in out.dead.items()} == dict.fromkeys(
            keys, "batch_lost"
        )
        assert received(second) == {}

        retry = ws.run("dead-letters", "retry", str(ws.config_path), "tickets", "--all")
        assert retry.returncode == 0, describe(retry)
        ws.run_ok()
        assert_nothing_lost(ws, keys)
        assert set(ws.outputs().results) == set(keys)
        assert_paid_once(second, expected=custom_ids(keys))
        assert set(first_received) == set(custom_ids(keys))
