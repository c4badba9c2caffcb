"""
``batchd dead-letters list|retry`` the way an operator uses it: a run whose API rejects
some requests, then listing, retrying one key, retrying the rest, each followed by a
real ``batchd run --until-drained`` against the emulator with the fault switched off.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
from collections import Counter
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from typing import Any

import pytest

from batchd.daemon.emulator import EmulatorConfig, EmulatorThread
from tests.fixtures.service import RULES_PATH, ServiceWorkspace, describe, workspaces

ROWS = 40


@dataclass
class RetryRun:
    workspace: ServiceWorkspace
    dead_after_first_run: Counter[str]
    listed: subprocess.CompletedProcess[str]
    chosen: str
    retry_one: subprocess.CompletedProcess[str]
    sink_after_one: Counter[str]
    sent_for_one: dict[str, int]  # custom_id -> requests the emulator received in that run
    retry_all: subprocess.CompletedProcess[str]
    sink_after_all: Counter[str]
    sent_for_all: dict[str, int]
    retry_neither: subprocess.CompletedProcess[str]
    listed_at_end: subprocess.CompletedProcess[str]
    status_at_end: subprocess.CompletedProcess[str]


def _sent(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {cid: n - before.get(cid, 0) for cid, n in after.items() if n != before.get(cid, 0)}


def _dead_keys(ws: ServiceWorkspace, kind: str) -> Counter[str]:
    if kind == "jsonl":
        return ws.dead_keys()
    with closing(sqlite3.connect(ws.root / "out" / "dead.sqlite")) as db:
        return Counter(str(key) for (key,) in db.execute("SELECT key FROM dead_letter"))


@pytest.fixture(scope="module", params=["jsonl", "sqlite"])
def retry_run(request: pytest.FixtureRequest) -> Iterator[RetryRun]:
    """
    40 tickets with 15 % of requests rejected as invalid; then, faults off: retry one
    key and run; retry --all and run; a retry with neither flag; a final list. Once with
    the dead letters in JSONL part files, once in a SQLite table.
    """
    kind = request.param
    faults = {"invalid_request": 0.15}
    emulator = EmulatorThread(EmulatorConfig(seed=1234, rules=RULES_PATH, faults=faults)).start()
    try:
        with workspaces() as make:
            ws: ServiceWorkspace = make(emulator.base_url, "dead")
            ws.write_tickets("tickets", ROWS)
            pipeline = ws.pipeline()
            if kind == "sqlite":
                pipeline["dead_letter"] = {"type": "sqlite", "kind": "dead_letter",
                                           "path": "out/dead.sqlite"}
            ws.write_config(pipeline)
            ws.run_drained()
            dead = _dead_keys(ws, kind)
            assert len(dead) >= 2, f"the fault should kill a few rows, got {dead}"
            listed = ws.run("dead-letters", "list", "@config", "tickets", "--json")
            emulator.set_faults(invalid_request=0)
            chosen = sorted(dead)[0]
            retry_one = ws.run("dead-letters", "retry", "@config", "tickets", "--key", chosen)
            before = emulator.stats()["received"]
            ws.run_drained()
            middle = emulator.stats()["received"]
            sink_after_one = ws.sink_keys()
            retry_all = ws.run("dead-letters", "retry", "@config", "tickets", "--all")
            ws.run_drained()
            after = emulator.stats()["received"]
            retry_neither = ws.run("dead-letters", "retry", "@config", "tickets")
            listed_at_end = ws.run("dead-letters", "list", "@config", "tickets", "--json")
            status_at_end = ws.run("status", "@config", "--json")
            yield RetryRun(ws, dead, listed, chosen, retry_one, sink_after_one,
                           _sent(before, middle), retry_all, ws.sink_keys(),
                           _sent(middle, after), retry_neither, listed_at_end, status_at_end)
    finally:
        emulator.stop()


def _lines(run: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    assert run.returncode == 0, describe(run)
    return [json.loads(line) for line in run.stdout.splitlines() if line.strip()]


class TestList:
    def test_lists_exactly_the_dead_keys(self, retry_run: RetryRun) -> None:
        """``list --json`` prints one line per dead letter: exactly the keys the sink holds."""
        rows = _lines(retry_run.listed)
        assert Counter(str(r["key"]) for r in rows) == retry_run.dead_after_first_run
        assert {r["error_type"] for r in rows} == {"invalid_request_error"}
        assert all(r["attempts"] == 1 and r["request"] for r in rows)

    def test_dead_keys_are_not_in_the_results(self, retry_run: RetryRun) -> None:
        """Before any retry, the dead keys are missing from the results and nothing else is."""
        results = set(retry_run.sink_after_one) - {retry_run.chosen}
        assert results.isdisjoint(retry_run.dead_after_first_run)
        assert len(results) == ROWS - len(retry_run.dead_after_first_run)


class TestRetry:
    def test_retry_one_key_resubmits_only_that_key(self, retry_run: RetryRun) -> None:
        """``retry --key K`` then a run: K reaches the sink, and K is the only request sent."""
        assert retry_run.retry_one.returncode == 0, describe(retry_run.retry_one)
        assert "requested a retry of 1 keys" in retry_run.retry_one.stdout
        assert retry_run.sink_after_one[retry_run.chosen] == 1
        assert retry_run.sent_for_one == {f"t-{retry_run.chosen}": 1}
        others = set(retry_run.dead_after_first_run) - {retry_run.chosen}
        assert others.isdisjoint(retry_run.sink_after_one)

    def test_retry_all_completes_the_rest(self, retry_run: RetryRun) -> None:
        """``retry --all`` then a run: every source key is in the results."""
        assert retry_run.retry_all.returncode == 0, describe(retry_run.retry_all)
        assert len(retry_run.sink_after_all) == ROWS
        rest = set(retry_run.dead_after_first_run) - {retry_run.chosen}
        assert all(retry_run.sink_after_all[key] == 1 for key in rest)
        assert {f"t-{key}" for key in rest} <= set(retry_run.sent_for_all)

    def test_retry_all_skips_keys_already_answered(self, retry_run: RetryRun) -> None:
        """A key answered by an earlier retry is not sent again, nor written twice."""
        assert f"t-{retry_run.chosen}" not in retry_run.sent_for_all
        assert retry_run.sink_after_all[retry_run.chosen] == 1

    def test_list_forgets_answered_keys(self, retry_run: RetryRun) -> None:
        """Once every dead letter was retried successfully, ``list`` shows none."""
        assert _lines(retry_run.listed_at_end) == []

    def test_status_counts_each_row_once(self, retry_run: RetryRun) -> None:
        """After the retries, every row is done once: answered, and no longer dead."""
        run = retry_run.status_at_end
        assert run.returncode == 0, describe(run)
        (pipeline,) = json.loads(run.stdout)["pipelines"]
        assert (pipeline["rows_read"], pipeline["rows_done"]) == (ROWS, ROWS)
        assert (pipeline["succeeded"], pipeline["dead_lettered"]) == (ROWS, 0)

    def test_retry_without_key_or_all_is_an_error(self, retry_run: RetryRun) -> None:
        """A retry naming neither --key nor --all exits 2 and says what is missing."""
        run = retry_run.retry_neither
        assert run.returncode == 2, describe(run)
        assert "--key" in run.stderr and "--all" in run.stderr
        assert "Traceback" not in run.stderr

    def test_retry_of_a_key_that_is_not_dead_is_refused(self, retry_run: RetryRun) -> None:
        """A key with no dead letter (here: answered by the first retry) exits 2, naming it."""
        run = retry_run.workspace.run("dead-letters", "retry", "@config", "tickets",
                                      "--key", retry_run.chosen)
        assert run.returncode == 2, describe(run)
        assert f"'{retry_run.chosen}' is not a dead letter" in run.stderr
        assert "Traceback" not in run.stderr


def test_bad_source_rows_are_not_retried() -> None:
    """A malformed row has nothing to re-read: --all skips it and says so, --key refuses it."""
    emulator = EmulatorThread(EmulatorConfig(seed=7, rules=RULES_PATH)).start()
    try:
        with workspaces() as make:
            ws: ServiceWorkspace = make(emulator.base_url, "bad")
            ws.write_tickets("tickets", 12, bad_rows=True)
            ws.write_config(ws.pipeline())
            ws.run_drained()
            bad = sorted(ws.dead_keys())
            assert len(bad) == 2, bad
            every = ws.run("dead-letters", "retry", "@config", "tickets", "--all")
            assert every.returncode == 0, describe(every)
            assert "skipped 2 dead letters that a retry cannot fix (bad_record)" in every.stderr
            assert "no dead letters to retry" in every.stderr
            one = ws.run("dead-letters", "retry", "@config", "tickets", "--key", bad[0])
            assert one.returncode == 2, describe(one)
            assert f"'{bad[0]}' was dead-lettered as bad_record" in one.stderr
            assert not (ws.root / "state" / "retry-requests").exists()
    finally:
        emulator.stop()


def test_a_sink_without_the_reader_capability_is_named() -> None:
    """
    Listing asks the dead-letter sink to read its rows back; a sink type without
    ``read_dead_letters`` (here postgres) gets one line naming the type, exit 2.
    """
    with workspaces() as make:
        ws: ServiceWorkspace = make("http://127.0.0.1:9", "nolist")
        ws.write_tickets("tickets", 2)
        pipeline = ws.pipeline()
        pipeline["dead_letter"] = {"type": "postgres", "kind": "dead_letter",
                                   "dsn": "postgresql://127.0.0.1:5432/test"}
        ws.write_config(pipeline)
        run = ws.run("dead-letters", "list", "@config", "tickets")
        assert run.returncode == 2, describe(run)
        assert "the 'postgres' dead-letter sink cannot read its dead letters back" in run.stderr
        assert "[pipeline.dead_letter] of 'tickets'" in run.stderr
        assert len(run.stderr.strip().splitlines()) == 1, run.stderr
        assert "Traceback" not in run.stderr


def test_sinks_read_their_own_dead_letters_back() -> None:
    """The jsonl and sqlite sinks have the capability; before they wrote anything they
    read nothing back, without creating their storage."""
    from dataclasses import replace

    import anyio

    from batchd.plugins.contract import DeadLetterReader, PluginContext
    from batchd.plugins.records import ResultRow
    from batchd.plugins.sinks.jsonl import JsonlSink
    from batchd.plugins.sinks.sqlite import SqliteSink

    row = ResultRow(key="k1", custom_id="c1", status="dead_letter", pipeline="p",
                    error_type="invalid_request", error_message="bad", batch_id="b1")
    with workspaces() as make:
        root = make("http://127.0.0.1:9", "readers").root
        context = PluginContext(pipeline="p", state_dir=root / "state", config_dir=root)
        sinks = [JsonlSink({"path": "dead"}, context),
                 SqliteSink({"path": "dead.sqlite", "kind": "dead_letter"}, context)]
        for sink in sinks:
            assert isinstance(sink, DeadLetterReader)
            assert list(sink.read_dead_letters()) == []
            assert not (root / ("dead.sqlite" if sink is sinks[1] else "dead")).exists()

            async def write(sink: Any = sink) -> None:
                async with sink:
                    await sink.open()
                    await sink.put("p-000001", [row])
                    await sink.flush("p-000001")

            anyio.run(write)
            found = list(sink.read_dead_letters())
            assert [(d.row["key"], d.row["error_type"]) for d in found] == [
                ("k1", "invalid_request")]
        assert [d.group for d in sinks[0].read_dead_letters()] == ["p-000001"]
        assert [d.group for d in sinks[1].read_dead_letters()] == [None]

        async def later(sink: Any) -> None:  # a second group, written after the first
            async with sink:
                await sink.open()
                await sink.put("p-000002", [replace(row, key="k2"), replace(row, key="k3")])
                await sink.flush("p-000002")

        for sink in sinks:
            anyio.run(later, sink)
            assert [d.row["key"] for d in sink.read_dead_letters()] == ["k1", "k2", "k3"]
        newest = [d.row["key"] for d in sinks[0].read_dead_letters(newest_first=True)]
        assert newest == ["k3", "k2", "k1"]  # a part file's lines, newest part first
        newest = [d.row["key"] for d in sinks[1].read_dead_letters(newest_first=True)]
        assert newest[2] == "k1"  # by updated_at: the first group's row is the oldest
