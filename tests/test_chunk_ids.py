"""Chunk ids are spelled in one module; these pin the spelling replay and the ledger rely on."""

from __future__ import annotations

from batchd.daemon.wal.chunk_ids import attempt_of, fresh_id, number_of, retry_id, root_of


def test_fresh_ids_are_zero_padded_to_six_digits() -> None:
    """The manifests of earlier releases hold ids in exactly this form."""
    assert fresh_id("tickets", 3) == "tickets-000003"
    assert fresh_id("a-r", 0) == "a-r-000000"


def test_retry_ids_count_up_from_the_root() -> None:
    """Each retry of a family is numbered after the root, however deep it goes."""
    root = fresh_id("p", 7)
    first = retry_id(root, root)
    second = retry_id(first, root)
    assert (first, second) == ("p-000007-r1", "p-000007-r2")
    assert retry_id("p-000007-r9", root) == "p-000007-r10"


def test_root_and_number_of_any_family_member() -> None:
    """A retry chunk shares its root's number, even in a pipeline whose name holds ``-r``."""
    for chunk in ("my-run-000012", "my-run-000012-r1", "my-run-000012-r11"):
        assert root_of("my-run", chunk) == "my-run-000012"
        assert number_of("my-run", chunk) == 12
    assert number_of("p", "p-retired") == -1


def test_attempt_of_reads_the_retry_suffix() -> None:
    """The root is attempt 1; ``-rk`` is attempt k+1."""
    assert attempt_of("p-000001") == 1
    assert attempt_of("p-000001-r1") == 2
    assert attempt_of("p-000001-r12") == 13
