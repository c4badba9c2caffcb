"""
The whole engine end to end: ``batchd run --until-drained`` in a subprocess,
the emulator over real HTTP, every fault kind switched on at once.

The per-request faults are a pure function of (seed, custom_id, attempt), so
the fate of every key can be computed up front with the emulator's own
`FaultInjector` and compared with what the sinks hold.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from batchd.daemon.emulator import EmulatorConfig, EmulatorThread
from tests.fixtures.emulator import SEED
from tests.fixtures.engine import RULES_PATH, Workspace, csv_keys, expected_labels, predict_fates

MAX_ATTEMPTS = 3
TICKETS = 240
# The two malformed rows write_tickets(bad_rows=True) adds, and the lines they are on.
BAD_ROWS = {"T-broken": TICKETS // 3 + 2, f"line-{2 * TICKETS // 3 + 3}": 2 * TICKETS // 3 + 3}
PER_REQUEST = {
    "api_error": 0.25,
    "overloaded_error": 0.05,
    "invalid_request": 0.03,
    "expired": 0.1,
}
ALL_FAULTS: dict[str, Any] = {
    **PER_REQUEST,
    "http429": 0.04,
    "http500": 0.03,
    "http529": 0.03,
    "retry_after": "0.2s",
    "drop_after_create": 0.2,
    "cut_results_after": 15,
    "transient_404_seconds": "0.15s",
    # One request more than a chunk: a create while the previous batch still has any
    # request unfinished (they finish spread over the latency) meets the queue limit.
    "queue_limit": 41,
}


def predicted_fates(keys: list[str]) -> dict[str, list[str | None]]:
    """key → the inner error type of each attempt the emulator will give it (None: success)."""
    return predict_fates(keys, PER_REQUEST, seed=SEED, max_attempts=MAX_ATTEMPTS)


@pytest.fixture(scope="class")
def faulty_run(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Workspace, EmulatorThread]]:
    """One drained run of 240 tickets (+2 bad rows) through an emulator with every fault on."""
    root = tmp_path_factory.mktemp("faulty")
    config = EmulatorConfig(rules=RULES_PATH, latency=2.5, faults=ALL_FAULTS, seed=SEED,
                            state_dir=root / "emulator")
    with EmulatorThread(config) as emulator:
        ws = Workspace(root / "ws", emulator.base_url)
        ws.write_tickets(TICKETS, bad_rows=True)
        ws.write_config(poll_interval="0.1s", max_requests=40, max_attempts=MAX_ATTEMPTS,
                        api={"not_found_window": "30s", "max_retries": 6})
        ws.run_ok()
        yield ws, emulator


class TestEveryFault:
    def test_every_key_lands_exactly_once(
        self, faulty_run: tuple[Workspace, EmulatorThread]
    ) -> None:
        """SQLite ∪ dead letters is every key of the CSV (and the bad rows), with no overlap."""
        ws, _ = faulty_run
        keys = csv_keys(ws.root / "tickets.csv")
        out = ws.outputs()
        assert out.result_keys.isdisjoint(out.dead_keys)
        assert out.result_keys | out.dead_keys == set(keys) | set(BAD_ROWS)
        assert len(out.results) + len(out.dead) == TICKETS + len(BAD_ROWS)
        for part, part_keys in {**out.jsonl_per_part, **out.dead_per_part}.items():
            assert len(part_keys) == len(set(part_keys)), f"duplicate keys in part {part}"
        assert set(out.jsonl_keys) == out.result_keys
        assert max(out.jsonl_keys.values()) == 1
        assert max(out.dead_counts.values()) == 1

    def test_outcomes_match_the_fault_oracle(
        self, faulty_run: tuple[Workspace, EmulatorThread]
    ) -> None:
        """Each key succeeded or was dead-lettered exactly as the seeded faults dictate."""
        ws, _ = faulty_run
        fates = predicted_fates(csv_keys(ws.root / "tickets.csv"))
        out = ws.outputs()
        expected_dead = {k for k, f in fates.items() if f[-1] is not None}
        assert {k for k in out.dead if k not in BAD_ROWS} == expected_dead
        labels = expected_labels(ws.root / "tickets.csv")
        assert out.results == {k: labels[k] for k in fates if k not in expected_dead}

    def test_dead_letters_carry_inner_error_and_history(
        self, faulty_run: tuple[Workspace, EmulatorThread]
    ) -> None:
        """Dead letters name the inner error type; exhausted ones list every attempt."""
        ws, _ = faulty_run
        fates = predicted_fates(csv_keys(ws.root / "tickets.csv"))
        out = ws.outputs()
        exhausted = invalid = 0
        for key, line in out.dead.items():
            if key in BAD_ROWS:
                continue
            fate = fates[key]
            assert line["error_type"] == fate[-1] != "error"
            assert [h["error_type"] for h in line["history"]] == fate
            assert [h["attempt"] for h in line["history"]] == list(range(1, len(fate) + 1))
            assert line["attempts"] == len(fate)
            assert line["request"]["custom_id"] == f"t-{key}"
            if fate[-1] == "invalid_request_error":
                invalid += 1
            else:
                assert len(fate) == MAX_ATTEMPTS
                exhausted += 1
        assert invalid and exhausted, (invalid, exhausted)

    def test_bad_rows_are_dead_lettered_with_their_lines(
        self, faulty_run: tuple[Workspace, EmulatorThread]
    ) -> None:
        """Malformed CSV rows go to the dead letters with the line they are on."""
        ws, _ = faulty_run
        out = ws.outputs()
        for key, line_no in BAD_ROWS.items():
            dead = out.dead[key]
            assert dead["error_type"] == "bad_record"
            assert dead["source"]["line"] == line_no
            assert f"line {line_no}" in dead["error_message"]

    def test_nothing_sent_more_than_max_attempts(
        self, faulty_run: tuple[Workspace, EmulatorThread]
    ) -> None:
        """The emulator received no custom_id more often than max_attempts (or its fate needed)."""
        ws, emulator = faulty_run
        fates = predicted_fates(csv_keys(ws.root / "tickets.csv"))
        with urllib.request.urlopen(f"{emulator.base_url}/_emulator/stats", timeout=10) as resp:
            received = json.load(resp)["received"]
        assert max(received.values()) <= MAX_ATTEMPTS
        assert received == {f"t-{k}": len(f) for k, f in fates.items()}

    def test_every_fault_kind_fired(self, faulty_run: tuple[Workspace, EmulatorThread]) -> None:
        """The run really went through each fault the emulator can inject."""
        _, emulator = faulty_run
        injected = emulator.stats()["faults_injected"]
        for kind in ("api_error", "overloaded_error", "invalid_request", "expired", "http429",
                     "http500", "http529", "drop_after_create", "cut_results", "transient_404",
                     "queue_limit"):
            assert injected.get(kind, 0) > 0, f"{kind} never fired: {injected}"

    def test_status_totals_match_outputs(
        self, faulty_run: tuple[Workspace, EmulatorThread]
    ) -> None:
        """``batchd status --json`` agrees with the sinks and the emulator."""
        ws, emulator = faulty_run
        out = ws.outputs()
        (status,) = ws.status()["pipelines"]
        assert status["succeeded"] + status["truncated"] == len(out.results)
        assert status["dead_lettered"] == len(out.dead)
        assert status["rows_done"] == TICKETS + len(BAD_ROWS)
        assert status["rows_read"] == TICKETS + len(BAD_ROWS)
        assert status["rows_pending"] == 0
        assert status["batches"] == []
        stats = emulator.stats()
        assert status["batches_submitted"] == stats["batches_created"]
        assert status["requests_submitted"] == stats["requests_received"]

    def test_state_is_clean_afterwards(self, faulty_run: tuple[Workspace, EmulatorThread]) -> None:
        """No temp file, no spool file, and the manifest replays to no live chunk."""
        ws, _ = faulty_run
        assert ws.leftover_tmp() == []
        assert ws.spool_files() == []
        state = ws.manifest_state()
        assert state.chunks == {}
        assert state.pipelines["tickets"].committed_seq == TICKETS + len(BAD_ROWS)


class TestCleanRun:
    def test_every_key_labelled_per_rules(
        self, emulator_factory: Callable[..., EmulatorThread], workspace: Callable[..., Workspace]
    ) -> None:
        """Without faults every ticket gets the label the demo rules give its body."""
        emulator = emulator_factory(rules=RULES_PATH)
        ws = workspace(emulator.base_url)
        ws.write_tickets(150, seed=11)
        ws.write_config(max_requests=60)
        ws.run_ok()
        out = ws.outputs()
        assert out.results == expected_labels(ws.root / "tickets.csv")
        assert set(out.statuses.values()) == {"succeeded"}
        assert out.dead == {}
        assert sorted(out.jsonl_keys) == sorted(out.results)
        stats = emulator.stats()
        assert stats["batches_created"] == 3
        assert set(stats["received"].values()) == {1}
