"""
The shape check a spool passes before it is sent, and the files it trusts without
reading: one this process sealed, or downloaded against its seal's SHA-256, for as long
as it stays that very file (same inode, size and mtime).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from batchd.daemon.intake import spool_check
from batchd.daemon.intake.spool import SpoolWriter, body_size
from batchd.daemon.intake.spool_check import mark_whole, spool_damage


def _spool(path: Path, requests: int) -> tuple[int, int]:
    writer = SpoolWriter(path)
    for n in range(requests):
        writer.add_request(b'{"custom_id":"k-%d","params":{}}' % n, {"key": f"k{n}"})
    writer.seal()
    return writer.requests, writer.body_bytes


@pytest.fixture(autouse=True)
def _fresh_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spool_check, "_whole", {})


def test_a_whole_spool_passes_and_a_cut_one_is_named(tmp_path: Path) -> None:
    path = tmp_path / "c-000001.jsonl"
    requests, body = _spool(path, 20)
    assert spool_damage(path, requests, body) is None
    data = path.read_bytes()
    other = tmp_path / "c-000002.jsonl"
    other.write_bytes(data[:-7])
    assert "no newline" in str(spool_damage(other, requests, body))


def test_figures_that_differ_from_the_seal_are_named(tmp_path: Path) -> None:
    path = tmp_path / "c-000001.jsonl"
    requests, body = _spool(path, 5)
    damage = spool_damage(path, requests + 1, body)
    assert damage == (f"it holds 5 requests in {body} body bytes, sealed as 6 in {body}")


def test_a_marked_spool_is_not_read_while_it_is_the_same_file(tmp_path: Path) -> None:
    path = tmp_path / "c-000001.jsonl"
    requests, body = _spool(path, 8)
    mark_whole(path)
    # Not read: figures it does not hold pass, since the file is trusted as sealed.
    assert spool_damage(path, requests + 100, body) is None
    # Grown since (a copy over it, an edit): read again, and the damage found.
    with path.open("ab") as f:
        f.write(b"garbage without a tab\n")
    assert "is not '<request>\\t<meta>'" in str(spool_damage(path, requests, body))


def test_a_marked_spool_touched_in_place_is_read_again(tmp_path: Path) -> None:
    path = tmp_path / "c-000001.jsonl"
    requests, body = _spool(path, 3)
    mark_whole(path)
    data = bytearray(path.read_bytes())
    data[data.index(b"\t") + 1] = ord("x")  # the first meta garbled, same length
    stat = path.stat()
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert "line 1" in str(spool_damage(path, requests, body))


def test_the_trusted_files_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spool_check, "_KEEP", 3)
    paths = []
    for n in range(4):
        path = tmp_path / f"c-{n:06d}.jsonl"
        _spool(path, 1)
        mark_whole(path)
        paths.append(path)
    assert len(spool_check._whole) == 3
    # The oldest was forgotten: read again (figures it does not hold are named); the
    # newest is still trusted, not read.
    assert spool_damage(paths[0], 2, body_size(2, 1)) is not None
    assert spool_damage(paths[3], 2, body_size(2, 1)) is None
