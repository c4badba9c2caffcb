"""
The key ledger tells a real duplicate key from its two look-alikes: a record
replayed at the same position, and a chunk rebuilt after it never sealed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from batchd.daemon.intake.ledger import KeyLedger, position_identity


def pos(line: int, **extra: Any) -> dict[str, Any]:
    return {"line": line, **extra}


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[KeyLedger]:
    ledger = KeyLedger(tmp_path / "keys.sqlite")
    yield ledger
    ledger.close()


class TestClaims:
    def test_fresh_keys_are_neither_duplicates_nor_replays(self, ledger: KeyLedger) -> None:
        """Keys never seen before are simply claimed."""
        claim = ledger.claim("p", 0, "p-000000", [("a", pos(1)), ("b", pos(2))])
        assert claim.duplicates == {} and claim.replays == set()

    def test_same_key_elsewhere_is_a_duplicate(self, ledger: KeyLedger) -> None:
        """A key already in a sealed chunk, read again at another position, is a duplicate."""
        ledger.claim("p", 0, "p-000000", [("a", pos(1)), ("b", pos(2))])
        claim = ledger.claim("p", 1, "p-000001", [("a", pos(9)), ("c", pos(10))])
        assert claim.duplicates == {"a": "p-000000"}
        assert claim.replays == set()

    def test_same_key_same_position_is_a_replay(self, ledger: KeyLedger) -> None:
        """A source replaying a record already sealed (same position) is skipped, not flagged."""
        ledger.claim("p", 0, "p-000000", [("a", pos(1, offset=10))])
        claim = ledger.claim("p", 1, "p-000001", [("a", {"offset": 10, "line": 1})])
        assert claim.replays == {"a"} and claim.duplicates == {}

    def test_kafka_next_snapshot_is_not_identity(self, ledger: KeyLedger) -> None:
        """A position's ``next`` snapshot differs between reads of the same record."""
        first = {"topic": "t", "partition": 0, "offset": 5, "next": {"0": 6}}
        again = {"topic": "t", "partition": 0, "offset": 5, "next": {"0": 9, "1": 3}}
        assert position_identity(first) == position_identity(again)
        ledger.claim("p", 0, "p-000000", [("a", first)])
        assert ledger.claim("p", 1, "p-000001", [("a", again)]).replays == {"a"}

    def test_rebuilt_chunk_reclaims_its_keys(self, ledger: KeyLedger) -> None:
        """A chunk that never sealed is rebuilt under the same number without duplicates."""
        ledger.claim("p", 0, "p-000000", [("a", pos(1))])
        ledger.claim("p", 1, "p-000001", [("b", pos(2)), ("c", pos(3))])  # crash before seal
        claim = ledger.claim("p", 1, "p-000001", [("b", pos(2)), ("c", pos(3)), ("d", pos(4))])
        assert claim.duplicates == {} and claim.replays == set()

    def test_rebuilt_chunk_with_other_boundaries(self, ledger: KeyLedger) -> None:
        """Keys claimed by an unsealed later chunk number are taken over, not duplicates."""
        ledger.claim("p", 2, "p-000002", [("x", pos(7))])  # never sealed
        claim = ledger.claim("p", 1, "p-000001", [("x", pos(7))])
        assert claim.duplicates == {} and claim.replays == set()
        later = ledger.claim("p", 2, "p-000002", [("x", pos(20))])
        assert later.duplicates == {"x": "p-000001"}

    def test_pipelines_are_separate(self, ledger: KeyLedger) -> None:
        """The same key in two pipelines is no duplicate."""
        ledger.claim("p", 0, "p-000000", [("a", pos(1))])
        claim = ledger.claim("q", 1, "q-000001", [("a", pos(5))])
        assert claim.duplicates == {}

    def test_release_forgets_keys(self, ledger: KeyLedger) -> None:
        """Released keys (dead letters resubmitted on purpose) may be read again."""
        ledger.claim("p", 0, "p-000000", [("a", pos(1))])
        ledger.release("p", ["a"])
        assert ledger.claim("p", 1, "p-000001", [("a", pos(9))]).duplicates == {}

    def test_empty_claim(self, ledger: KeyLedger) -> None:
        """Claiming nothing is a no-op."""
        claim = ledger.claim("p", 0, "p-000000", [])
        assert claim.duplicates == {} and claim.replays == set()

    def test_survives_reopening(self, tmp_path: Path) -> None:
        """Claims are on disk: a restarted daemon still sees earlier keys."""
        first = KeyLedger(tmp_path / "keys.sqlite")
        first.claim("p", 0, "p-000000", [("a", pos(1)), ("b", pos(2))])
        first.close()
        second = KeyLedger(tmp_path / "keys.sqlite")
        try:
            claim = second.claim("p", 1, "p-000001", [("a", pos(1)), ("b", pos(8))])
            assert claim.replays == {"a"} and claim.duplicates == {"b": "p-000000"}
        finally:
            second.close()
