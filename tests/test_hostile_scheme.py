"""
Hostile operator: a restored backup run with another ``custom_id`` template.

The batches made after the backup hold the old custom_ids, the rebuilt chunks the
new ones: they share none, so by custom_id alone those batches look like another
tool's and the rows would be paid a second time. The manifest records the id
scheme its chunks were made with, and a changed scheme with unknown batches on the
API stops the pipeline (``unknown_batches``) before anything is created. These tests
count, from the emulator's ``received`` counters, how often each *row* (key) was
sent under either template.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable

import pytest

from batchd.daemon.emulator import EmulatorThread
from batchd.daemon.wal.manifest import MANIFEST_NAME
from tests.fixtures.engine import RULES_PATH, Workspace, csv_keys, describe
from tests.fixtures.hostile import (
    CHUNKS,
    ROWS,
    assert_nothing_lost,
    assert_paid_once,
    copy_state,
    received,
    restore_state,
)

pytestmark = pytest.mark.timeout(240)

OLD, NEW = "t-{ticket_id}", "u-{ticket_id}"


def rows_sent(emulator: EmulatorThread) -> Counter[str]:
    """Key → how many times its row was received, whatever the custom_id's prefix."""
    sent: Counter[str] = Counter()
    for custom_id, count in received(emulator).items():
        sent[custom_id.split("-", 1)[1]] += count
    return sent


@pytest.fixture
def restored(
    emulator_factory: Callable[..., EmulatorThread], workspace: Callable[..., Workspace]
) -> tuple[EmulatorThread, Workspace, list[str], int]:
    """A backup taken after 2 batches, restored after the run sent them all."""
    emulator = emulator_factory(rules=RULES_PATH)
    ws = workspace(emulator.base_url)
    keys = csv_keys(ws.write_tickets(ROWS))
    ws.write_config(**CHUNKS, custom_id=OLD)
    ws.crash("after_source_commit:2")
    backup = copy_state(ws)
    ws.run_ok()
    assert_paid_once(emulator, expected=[f"t-{k}" for k in keys])
    created = emulator.stats()["batches_created"]
    restore_state(ws, backup)
    return emulator, ws, keys, created


class TestChangedScheme:
    def test_changed_template_after_restore_stops_until_decided(
        self, restored: tuple[EmulatorThread, Workspace, list[str], int]
    ) -> None:
        """Restored backup + another custom_id template: nothing is created (exit 3, the
        `unknown_batches` alarm says the scheme changed); `--ignore` of the listed batches
        is the operator's decision to send the rows again, and the run then drains."""
        emulator, ws, keys, created = restored
        ws.write_config(**CHUNKS, custom_id=NEW)
        stopped = ws.run()
        assert stopped.returncode == 3, describe(stopped)
        assert emulator.stats()["batches_created"] == created
        twice = [k for k, n in rows_sent(emulator).items() if n > 1]
        assert not twice, f"{len(twice)} rows paid twice: {twice[:5]}"
        alarm = [a for a in ws.status()["alarms"] if a["kind"] == "unknown_batches"]
        assert alarm, describe(stopped)
        message = str(alarm[-1]["message"])
        assert "custom_id" in message and "scheme changed" in message, message
        assert "unknown_batches" in stopped.stderr, describe(stopped)

        listed = ws.run("reconcile", str(ws.config_path))
        assert listed.returncode == 0, describe(listed)
        named = sorted(set(re.findall(r"msgbatch_\w+", message)))
        assert named and all(b in listed.stdout for b in named), (listed.stdout, message)
        # A restored chunk may have adopted its batch before the pause; the rest are unknown.
        state = ws.manifest_state()
        unknown = [b for b in named if not state.is_known_batch(b)]
        assert unknown
        for batch_id in unknown:
            ignored = ws.run("reconcile", str(ws.config_path), "--ignore", batch_id)
            assert ignored.returncode == 0, describe(ignored)
        ws.run_ok()
        # The operator chose to pay again for exactly the ignored batches' rows, once more.
        assert_paid_once(emulator)
        sent = rows_sent(emulator)
        assert set(sent) == set(keys)
        assert sorted(Counter(sent.values()).items()) == [(1, ROWS - 50 * len(unknown)),
                                                          (2, 50 * len(unknown))]
        assert_nothing_lost(ws, keys)

    def test_putting_the_old_template_back_adopts_the_batches(
        self, restored: tuple[EmulatorThread, Workspace, list[str], int]
    ) -> None:
        """The advice of the alarm: stopped by the changed template, the operator restores
        the old one and starts again; the later batches are adopted, nothing is sent twice
        (the stopped run sealed nothing under the new template)."""
        emulator, ws, keys, created = restored
        ws.write_config(**CHUNKS, custom_id=NEW)
        stopped = ws.run()
        assert stopped.returncode == 3, describe(stopped)
        ws.write_config(**CHUNKS, custom_id=OLD)
        proc = ws.run_ok()
        assert "adopted" in proc.stdout
        assert emulator.stats()["batches_created"] == created
        assert_paid_once(emulator, expected=[f"t-{k}" for k in keys])
        assert_nothing_lost(ws, keys)

    def test_same_template_after_restore_still_adopts(
        self, restored: tuple[EmulatorThread, Workspace, list[str], int]
    ) -> None:
        """Restored backup, settings unchanged: the later batches are adopted silently."""
        emulator, ws, keys, created = restored
        proc = ws.run_ok()
        assert emulator.stats()["batches_created"] == created
        assert "adopted" in proc.stdout
        assert all(n == 1 for n in rows_sent(emulator).values())
        assert not [a for a in ws.status()["alarms"] if a["kind"] == "unknown_batches"]
        assert_nothing_lost(ws, keys)

    def test_template_change_on_a_live_pipeline_goes_on(
        self, emulator_factory: Callable[..., EmulatorThread],
        workspace: Callable[..., Workspace],
    ) -> None:
        """No restore, no unknown batches: a new template is used from the next chunk on,
        as before (the manifest records the new scheme and nothing stops)."""
        emulator = emulator_factory(rules=RULES_PATH)
        ws = workspace(emulator.base_url)
        keys = csv_keys(ws.write_tickets(ROWS))
        ws.write_config(**CHUNKS, custom_id=OLD)
        ws.crash("after_source_commit:2")
        ws.write_config(**CHUNKS, custom_id=NEW)
        ws.run_ok()
        assert all(n == 1 for n in rows_sent(emulator).values())
        sent = set(received(emulator))
        assert any(c.startswith("t-") for c in sent) and any(c.startswith("u-") for c in sent)
        assert not [a for a in ws.status()["alarms"] if a["kind"] == "unknown_batches"]
        assert_nothing_lost(ws, keys)
        lines = (ws.state_dir / MANIFEST_NAME).read_text(encoding="utf-8").splitlines()
        records = [json.loads(line.split(" ", 1)[1]) for line in lines]
        schemes = [r for r in records if r["kind"] == "id_scheme"]
        assert [r["template"] for r in schemes] == [OLD, NEW]
