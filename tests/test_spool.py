"""
Spool files round-trip: what SpoolWriter writes, iter_spool reads back line
for line, and stream_body sends as exactly ``{"requests":[…]}`` of the same
requests, in ``body_bytes`` bytes (the Content-Length of the create).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchd.daemon.intake.spool import SpoolWriter, body_size, iter_spool, stream_body

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**53), 2**53),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=40),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
# A spool entry: a request (custom_id, params) or a reject (None), with its meta.
entries = st.lists(
    st.tuples(
        st.one_of(st.none(), st.dictionaries(st.text(max_size=8), json_values, max_size=4)),
        st.dictionaries(st.text(max_size=8), json_values, max_size=3),
    ),
    max_size=30,
)


def write_spool(
    path: Path, items: list[tuple[dict[str, Any] | None, dict[str, Any]]]
) -> tuple[SpoolWriter, list[dict[str, Any]]]:
    writer = SpoolWriter(path)
    requests = []
    for index, (params, meta) in enumerate(items):
        if params is None:
            writer.add_reject(meta)
        else:
            request = {"custom_id": f"c{index}", "params": params}
            requests.append(request)
            writer.add_request(orjson.dumps(request), meta)
    writer.seal()
    return writer, requests


def read_body(path: Path) -> bytes:
    async def collect() -> bytes:
        return b"".join([block async for block in stream_body(path)])

    return anyio.run(collect)


class TestRoundTrip:
    @settings(max_examples=60, deadline=None)
    @given(entries)
    def test_body_and_meta_survive(
        self, items: list[tuple[dict[str, Any] | None, dict[str, Any]]]
    ) -> None:
        """Any requests and rejects come back from iter_spool and stream_body unchanged."""
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "chunk.jsonl"
            writer, requests = write_spool(path, items)
            read = list(iter_spool(path))
            assert [meta for _, meta in read] == [meta for _, meta in items]
            assert [r is None for r, _ in read] == [p is None for p, _ in items]
            assert [orjson.loads(r) for r, _ in read if r is not None] == requests
            body = read_body(path)
            assert json.loads(body) == {"requests": requests}
            assert len(body) == writer.body_bytes == body_size(writer.requests,
                                                                writer.request_bytes)
            assert writer.requests == len(requests)
            assert writer.rejects == len(items) - len(requests)

    def test_body_crosses_block_boundaries(self, tmp_path: Path) -> None:
        """Requests larger than the 1 MiB read block are joined without a lost byte."""
        items: list[tuple[dict[str, Any] | None, dict[str, Any]]] = [
            ({"text": "a\tb\n" * 200_000 + str(i)}, {"key": f"k{i}"}) for i in range(5)
        ]
        items.insert(2, (None, {"key": "bad", "error": "x"}))
        writer, requests = write_spool(tmp_path / "big.jsonl", items)
        body = read_body(tmp_path / "big.jsonl")
        assert len(body) == writer.body_bytes > 4 * (1 << 20)
        assert json.loads(body) == {"requests": requests}

    def test_only_rejects_gives_an_empty_list(self, tmp_path: Path) -> None:
        """A chunk of rejects only streams ``{"requests":[]}``."""
        writer, _ = write_spool(tmp_path / "r.jsonl", [(None, {"key": "a"}), (None, {"key": "b"})])
        assert read_body(tmp_path / "r.jsonl") == b'{"requests":[]}'
        assert writer.requests == 0 and writer.rejects == 2


class TestDurability:
    def test_unsealed_spool_is_only_a_tmp_file(self, tmp_path: Path) -> None:
        """Before seal only ``<chunk>.jsonl.tmp`` exists; seal renames it into place."""
        writer = SpoolWriter(tmp_path / "c.jsonl")
        writer.add_request(b'{"custom_id":"a","params":{}}', {"key": "a"})
        assert [p.name for p in tmp_path.iterdir()] == ["c.jsonl.tmp"]
        writer.seal()
        assert [p.name for p in tmp_path.iterdir()] == ["c.jsonl"]

    def test_discard_removes_the_tmp_file(self, tmp_path: Path) -> None:
        """A discarded chunk leaves nothing behind."""
        writer = SpoolWriter(tmp_path / "c.jsonl")
        writer.add_reject({"key": "a"})
        writer.discard()
        assert list(tmp_path.iterdir()) == []

    def test_truncated_spool_is_refused(self, tmp_path: Path) -> None:
        """A spool whose last line lacks its newline is never sent as a body."""
        path = tmp_path / "c.jsonl"
        write_spool(path, [({"a": 1}, {"key": "a"}), ({"b": 2}, {"key": "b"})])
        path.write_bytes(path.read_bytes()[:-5])
        with pytest.raises(ValueError, match="does not end with a newline"):
            read_body(path)
