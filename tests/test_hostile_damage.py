"""
Hostile host, part 4: state files damaged in place (issue 12, beyond a torn tail).

A disk fault, a hand edit or a bad copy garbles a manifest line *followed by good
ones*, or leaves garbage, nothing or a directory where a SQLite state file was. A
restart cannot fix any of that, so each is one line naming the file and what to do,
exit 2 (the unit does not restart it: no restart loop), and ``batchd repair`` is the
way out, after which the run pays nothing twice and loses nothing.
"""

from __future__ import annotations

import csv
import random
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from batchd.daemon.emulator import EmulatorThread
from batchd.daemon.wal.manifest import MANIFEST_NAME
from tests.fixtures.engine import RULES_PATH, Workspace, csv_keys, describe
from tests.fixtures.hostile import (
    CHUNKS,
    assert_nothing_lost,
    assert_paid_once,
    copy_state,
    custom_ids,
    one_line,
    restore_state,
    tickets_workspace,
)

pytestmark = pytest.mark.timeout(240)

@pytest.fixture
def setup(
    emulator_factory: Callable[..., EmulatorThread], workspace: Callable[..., Workspace]
) -> tuple[EmulatorThread, Workspace, list[str]]:
    return tickets_workspace(emulator_factory, workspace)


def garble_line(ws: Workspace, index: int, how: Callable[[bytes], bytes]) -> int:
    """Replace manifest line ``index`` (0-based) in place; returns its 1-based number."""
    path = ws.state_dir / MANIFEST_NAME
    lines = path.read_bytes().split(b"\n")
    assert index < len(lines) - 2, "the damaged line must have good lines after it"
    lines[index] = how(lines[index])
    path.write_bytes(b"\n".join(lines))
    return index + 1


class TestManifestDamagedInTheMiddle:
    @pytest.mark.parametrize("how", [
        pytest.param(lambda line: line[:40], id="cut-short"),
        pytest.param(lambda line: line[:30] + b"\x00\xff garbled" + line[45:], id="garbled"),
        pytest.param(lambda line: b"", id="emptied"),
    ])
    def test_refused_with_exit_2_then_repaired_and_nothing_paid_twice(
        self, setup: tuple[EmulatorThread, Workspace, list[str]],
        how: Callable[[bytes], bytes],
    ) -> None:
        """A bad line with good lines after it: `run` and `status` are one line naming the
        file and line and `batchd repair` (exit 2, not a restart loop); `repair` keeps a
        copy and cuts the log; the next run adopts the later batches from the API."""
        emulator, ws, keys = setup
        ws.crash("after_source_commit:3")
        lines = (ws.state_dir / MANIFEST_NAME).read_bytes().count(b"\n")
        lineno = garble_line(ws, lines // 2, how)

        for argv in ([], ["status", str(ws.config_path)]):
            refused = ws.run(*argv) if argv else ws.run()
            assert refused.returncode == 2, describe(refused)
            error = one_line(refused)
            assert f"{MANIFEST_NAME} line {lineno}" in error and "batchd repair" in error

        repaired = ws.run("repair", str(ws.config_path))
        assert repaired.returncode == 0, describe(repaired)
        assert f"line {lineno}" in repaired.stdout
        kept = list(ws.state_dir.glob(f"{MANIFEST_NAME}.damaged-*"))
        assert len(kept) == 1 and kept[0].read_bytes().count(b"\n") >= lines - 1
        assert ws.manifest_state().seq == lineno - 1

        ws.run_ok()
        assert_paid_once(emulator, expected=custom_ids(keys))
        assert_nothing_lost(ws, keys)
        again = ws.run("repair", str(ws.config_path))  # nothing left to cut
        assert again.returncode == 0 and "damaged" not in again.stdout, describe(again)

    def test_first_line_damaged_is_refused_by_repair_too(
        self, setup: tuple[EmulatorThread, Workspace, list[str]]
    ) -> None:
        """Nothing before line 1 can be kept: repair says to restore a backup (exit 2) and
        leaves the file as it was."""
        _, ws, _ = setup
        ws.crash("after_source_commit:1")
        garble_line(ws, 0, lambda line: line.replace(b'"seq"', b'"sEq"'))
        before = (ws.state_dir / MANIFEST_NAME).read_bytes()
        refused = ws.run("repair", str(ws.config_path))
        assert refused.returncode == 2, describe(refused)
        error = one_line(refused)
        assert "line 1" in error and "backup" in error
        assert (ws.state_dir / MANIFEST_NAME).read_bytes() == before


def damage_file(path: Path, how: str) -> None:
    """Put garbage, nothing, or a directory where a state file was."""
    for companion in ("-wal", "-shm"):
        path.with_name(path.name + companion).unlink(missing_ok=True)
    if how == "garbage":
        path.write_bytes(random.Random(12).randbytes(8192))
    elif how == "emptied":
        path.write_bytes(b"")
    else:
        path.unlink(missing_ok=True)
        path.mkdir()
        (path / "x").write_text("not a database")


class TestDamagedSqliteStateFiles:
    @pytest.mark.parametrize("how", ["garbage", "emptied", "directory"])
    def test_damaged_key_ledger_is_exit_2_and_repair_rebuilds_it(
        self, emulator_factory: Callable[..., EmulatorThread],
        workspace: Callable[..., Workspace], how: str,
    ) -> None:
        """keys.sqlite garbled, emptied or replaced by a directory mid-run: `run`, `status`,
        `show` and `dead-letters list` are one line naming it and `batchd repair` (exit 2);
        repair sets it aside and rebuilds it, and a key repeated later is still caught."""
        emulator = emulator_factory(rules=RULES_PATH)
        ws = workspace(emulator.base_url)
        path = ws.write_tickets(200)
        with path.open("a", newline="", encoding="utf-8") as f:
            csv.writer(f).writerow(["T0000003", "A second ticket under an old id: refund me"])
        ws.write_config(**CHUNKS)
        ws.crash("after_source_commit:2")
        ledger = ws.state_dir / "keys.sqlite"
        damage_file(ledger, how)

        config = str(ws.config_path)
        for argv in ([], ["status", config], ["show", config, "T0000003"],
                     ["dead-letters", "list", config, "tickets"]):
            refused = ws.run(*argv)
            if argv and how == "emptied":  # reads as no keys yet; only `run` must refuse
                assert refused.returncode == 0 and "Traceback" not in refused.stderr
                continue
            assert refused.returncode == 2, describe(refused)
            error = one_line(refused)
            assert str(ledger) in error and "batchd repair" in error, error

        repaired = ws.run("repair", config)
        assert repaired.returncode == 0, describe(repaired)
        assert "keys.sqlite.replaced-" in repaired.stdout
        assert ledger.is_file()
        ws.run_ok()
        out = ws.outputs()
        assert out.dead["T0000003"]["error_type"] == "duplicate_key"
        keys = csv_keys(path)
        assert_paid_once(emulator, expected=custom_ids(sorted(set(keys))))
        assert_nothing_lost(ws, keys)

    @pytest.mark.parametrize("how", ["garbage", "directory"])
    def test_damaged_reconcile_cache_is_exit_2_and_repair_sets_it_aside(
        self, setup: tuple[EmulatorThread, Workspace, list[str]], how: str,
    ) -> None:
        """reconcile.sqlite garbled or a directory after a restored backup: `run` and
        `batchd reconcile` are one line naming it (exit 2); after `batchd repair` the run
        reads the API's batches again and adopts them, paying nothing twice."""
        emulator, ws, keys = setup
        ws.crash("after_source_commit:2")
        backup = copy_state(ws)
        ws.run_ok()
        restore_state(ws, backup)
        cache = ws.state_dir / "reconcile.sqlite"
        damage_file(cache, how)

        config = str(ws.config_path)
        for argv in ([], ["reconcile", config]):
            refused = ws.run(*argv)
            assert refused.returncode == 2, describe(refused)
            error = one_line(refused)
            assert str(cache) in error and "batchd repair" in error, error

        repaired = ws.run("repair", config)
        assert repaired.returncode == 0, describe(repaired)
        assert "reconcile.sqlite.replaced-" in repaired.stdout
        created = emulator.stats()["batches_created"]
        proc = ws.run_ok()
        assert "adopted" in proc.stdout
        assert emulator.stats()["batches_created"] == created
        assert_paid_once(emulator, expected=custom_ids(keys))
        assert_nothing_lost(ws, keys)


class TestDamagedSpool:
    @pytest.mark.parametrize("how", ["garbled-line", "cut-short"])
    def test_damaged_spool_is_rebuilt_not_resent_forever(
        self, setup: tuple[EmulatorThread, Workspace, list[str]], how: str,
    ) -> None:
        """A sealed chunk's spool garbled in the middle or cut short: not streamed under its
        sealed Content-Length and retried forever as an unknown outcome, but kept aside,
        alarmed `spool_lost` naming it damaged, and rebuilt from the source: paid once."""
        emulator, ws, keys = setup
        ws.crash("after_seal:2")
        spool = ws.state_dir / "spool" / "tickets-000001.jsonl"
        data = spool.read_bytes()
        if how == "cut-short":
            spool.write_bytes(data[: len(data) // 2])
        else:
            lines = data.split(b"\n")
            lines[7] = lines[7][:50] + b"\x00 garbled"
            spool.write_bytes(b"\n".join(lines))

        proc = ws.run(timeout=120)
        assert proc.returncode == 0, describe(proc)
        assert "create outcome unknown" not in proc.stdout
        lost = [a for a in ws.status()["alarms"] if a["kind"] == "spool_lost"]
        assert [a["chunk"] for a in lost] == ["tickets-000001"]
        assert "damaged" in str(lost[0]["message"])
        assert (spool.parent / "tickets-000001.jsonl.damaged").exists()
        assert_paid_once(emulator, expected=custom_ids(keys))
        assert_nothing_lost(ws, keys)


class TestSomethingInTheWay:
    def test_a_file_where_the_spool_dir_belongs_is_exit_2(
        self, setup: tuple[EmulatorThread, Workspace, list[str]]
    ) -> None:
        """`spool` replaced by a file (a bad restore, a stray `>`): one line naming it and
        exit 2, not exit 1 (a restart loop); moved away, the run finishes, paid once."""
        emulator, ws, keys = setup
        ws.crash("after_source_commit:1")
        spool = ws.state_dir / "spool"
        kept = ws.root / "spool-kept"
        spool.rename(kept)
        spool.write_text("not a directory\n")
        refused = ws.run()
        assert refused.returncode == 2, describe(refused)
        error = one_line(refused)
        assert str(spool) in error and "move it away" in error
        spool.unlink()
        kept.rename(spool)
        ws.run_ok()
        assert_paid_once(emulator, expected=custom_ids(keys))
        assert_nothing_lost(ws, keys)


class TestGarbledRetryRequest:
    def test_an_unreadable_retry_request_is_set_aside_not_a_crash_loop(
        self, setup: tuple[EmulatorThread, Workspace, list[str]]
    ) -> None:
        """A `retry-requests/` file garbled or written by hand (`{"keys": 5}`): not a
        traceback and exit 1 on every start, but one error line naming it, the file set
        aside as `.bad`, and the run goes on: paid once, nothing lost."""
        emulator, ws, keys = setup
        ws.crash("after_source_commit:1")
        requests = ws.state_dir / "retry-requests"
        requests.mkdir()
        (requests / "tickets-1.json").write_bytes(b'{"keys": ["T0000')
        (requests / "tickets-2.json").write_text('{"keys": 5}')
        proc = ws.run_ok()
        assert "Traceback" not in proc.stdout + proc.stderr
        assert proc.stdout.count("retry request cannot be read") == 2
        assert sorted(p.name for p in requests.iterdir()) == ["tickets-1.bad", "tickets-2.bad"]
        assert_paid_once(emulator, expected=custom_ids(keys))
        assert_nothing_lost(ws, keys)


class TestLedgerDamagedInside:
    def test_a_garbled_page_of_the_ledger_is_exit_2_and_repair_finds_it(
        self, emulator_factory: Callable[..., EmulatorThread],
        workspace: Callable[..., Workspace],
    ) -> None:
        """keys.sqlite whole at its head but with the keys table's page garbled: the first
        claim that meets it is exit 2 naming the file and `batchd repair` (not exit 1 on
        every start); repair's full check finds it and rebuilds; the duplicate is caught."""
        emulator = emulator_factory(rules=RULES_PATH)
        ws = workspace(emulator.base_url)
        path = ws.write_tickets(200)
        with path.open("a", newline="", encoding="utf-8") as f:
            csv.writer(f).writerow(["T0000003", "A second ticket under an old id: refund me"])
        ws.write_config(**CHUNKS)
        ws.crash("after_source_commit:2")
        ledger = ws.state_dir / "keys.sqlite"
        with sqlite3.connect(ledger) as db:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            root = db.execute("SELECT rootpage FROM sqlite_master WHERE name = 'keys'")
            page, = root.fetchone()
            size, = db.execute("PRAGMA page_size").fetchone()
        with ledger.open("r+b") as f:
            f.seek((page - 1) * size)
            f.write(random.Random(3).randbytes(size))

        refused = ws.run()
        assert refused.returncode == 2, describe(refused)
        error = one_line(refused)
        assert str(ledger) in error and "batchd repair" in error, error
        repaired = ws.run("repair", str(ws.config_path))
        assert repaired.returncode == 0, describe(repaired)
        assert "keys.sqlite.replaced-" in repaired.stdout
        ws.run_ok()
        assert ws.outputs().dead["T0000003"]["error_type"] == "duplicate_key"
        keys = csv_keys(path)
        assert_paid_once(emulator, expected=custom_ids(sorted(set(keys))))
        assert_nothing_lost(ws, keys)

    def test_a_garbled_page_of_the_reconcile_cache_is_exit_2_and_repaired(
        self, setup: tuple[EmulatorThread, Workspace, list[str]]
    ) -> None:
        """reconcile.sqlite whole at its head, its ids table's page garbled, after a restored
        backup: exit 2 naming it (not exit 1 on every start); repair's full check sets it
        aside, and the run adopts the later batches: paid once."""
        emulator, ws, keys = setup
        ws.crash("after_source_commit:2")
        backup = copy_state(ws)
        ws.run_ok()
        restore_state(ws, backup)
        cache = ws.state_dir / "reconcile.sqlite"
        with sqlite3.connect(cache) as db:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            page, = db.execute("SELECT rootpage FROM sqlite_master WHERE name = 'ids'").fetchone()
            size, = db.execute("PRAGMA page_size").fetchone()
        with cache.open("r+b") as f:
            f.seek((page - 1) * size)
            f.write(random.Random(4).randbytes(size))

        refused = ws.run()
        assert refused.returncode == 2, describe(refused)
        error = one_line(refused)
        assert str(cache) in error and "batchd repair" in error, error
        repaired = ws.run("repair", str(ws.config_path))
        assert repaired.returncode == 0 and "reconcile.sqlite.replaced-" in repaired.stdout
        created = emulator.stats()["batches_created"]
        ws.run_ok()
        assert emulator.stats()["batches_created"] == created
        assert_paid_once(emulator, expected=custom_ids(keys))
        assert_nothing_lost(ws, keys)
