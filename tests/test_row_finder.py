"""
``batchd show`` searches sinks through their ``find_rows`` capability, so the engine
names no concrete sink: a plugin's sink with the capability is searched like the
built-in jsonl and sqlite sinks, one without it gets a note.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import anyio

from batchd.daemon.commands.show import key_history
from batchd.daemon.config import load_config
from batchd.plugins.contract import FoundRow, PluginContext, RowFinder, Sink
from batchd.plugins.hookspecs import hookimpl
from batchd.plugins.manager import load_plugins, pm
from batchd.plugins.records import ResultRow
from batchd.plugins.sinks.jsonl import JsonlSink
from batchd.plugins.sinks.sqlite import SqliteSink

_STORED = {"K1": {"key": "K1", "status": "succeeded", "output": "kept by a plugin"}}


class _MemSink(Sink):
    def __init__(self, options: dict[str, Any], context: PluginContext) -> None:
        self.asked: list[Sequence[str] | None] = []

    async def open(self) -> None:
        pass

    async def put(self, group: str, rows: Sequence[ResultRow]) -> None:
        pass

    async def flush(self, group: str) -> None:
        pass

    async def aclose(self) -> None:
        pass


class _FindingSink(_MemSink):
    def find_rows(self, key: str, *, groups: Sequence[str] | None = None) -> Iterator[FoundRow]:
        if key in _STORED:
            yield FoundRow(dict(_STORED[key]), "acme memory")


class _Plugin:
    @hookimpl
    def register_sinks(self, register: Any) -> None:
        register("t13-finding", _FindingSink)
        register("t13-blind", _MemSink)


def _config(tmp_path: Path) -> Path:
    (tmp_path / "in.csv").write_text("id,body\nK1,hello\n")
    path = tmp_path / "c.toml"
    path.write_text(
        'state_dir = "state"\n[[pipeline]]\nname = "p"\n'
        '[pipeline.source]\ntype = "csv"\npath = "in.csv"\nkey = "id"\n'
        '[pipeline.request]\nmodel = "claude-haiku-4-5"\nmax_tokens = 8\nuser = "{body}"\n'
        '[[pipeline.sink]]\ntype = "t13-finding"\n'
        '[[pipeline.sink]]\ntype = "t13-blind"\n'
        '[pipeline.dead_letter]\ntype = "t13-blind"\n')
    return path


def test_a_plugin_sink_with_find_rows_is_searched(tmp_path: Path) -> None:
    load_plugins()
    pm.register(_Plugin(), name="t13-row-finder")
    try:
        config = load_config(_config(tmp_path))
        history = key_history(config, config.pipelines[0], "K1")
    finally:
        pm.unregister(name="t13-row-finder")
    assert [(hit["type"], hit["where"], hit["row"]["output"]) for hit in history["landed"]] == [
        ("t13-finding", "acme memory", "kept by a plugin")]
    assert history["outcome"] == "succeeded"
    assert history["notes"] == [
        "t13-blind sink #2 cannot be searched by batchd; look the key up in it directly",
        "the t13-blind dead-letter sink cannot be searched by batchd; look the key up in it "
        "directly"]


def test_a_sink_that_cannot_be_built_says_why(tmp_path: Path) -> None:
    """A sink whose options validate would refuse is noted with the reason, not as a sink
    that cannot be searched at all."""
    path = _config(tmp_path)
    path.write_text(path.read_text().replace('type = "t13-finding"', 'type = "jsonl"'))
    config = load_config(path, problems=[])
    load_plugins()
    pm.register(_Plugin(), name="t13-row-finder")
    try:
        history = key_history(config, config.pipelines[0], "K1")
    finally:
        pm.unregister(name="t13-row-finder")
    assert history["notes"][0].startswith("jsonl sink #1 cannot be searched: ")
    assert "path: is required" in history["notes"][0]


def test_builtin_sinks_find_rows_by_key_and_group(tmp_path: Path) -> None:
    """jsonl looks only in the groups given (every part without them); sqlite by key,
    with the dead-letter table's JSON columns decoded; missing storage finds nothing."""
    context = PluginContext(pipeline="p", state_dir=tmp_path / "state", config_dir=tmp_path)
    jsonl = JsonlSink({"path": "out"}, context)
    sqlite = SqliteSink({"path": "dead.sqlite", "kind": "dead_letter"}, context)
    for sink in (jsonl, sqlite):
        assert isinstance(sink, RowFinder)
        assert list(sink.find_rows("k1")) == []
    assert not (tmp_path / "out").exists() and not (tmp_path / "dead.sqlite").exists()
    row = ResultRow(key="k1", custom_id="c1", status="dead_letter", pipeline="p",
                    error_type="invalid_request", error_message="bad", batch_id="b1",
                    history=[{"attempt": 1, "batch_id": "b0"}])

    async def write(sink: Sink, group: str) -> None:
        async with sink:
            await sink.open()
            await sink.put(group, [row])
            await sink.flush(group)

    for group in ("p-000001", "p-000002-a2"):
        anyio.run(write, jsonl, group)
    anyio.run(write, sqlite, "p-000001")
    assert [(h.group, h.where) for h in jsonl.find_rows("k1")] == [
        ("p-000001", str(tmp_path / "out" / "p-000001.jsonl")),
        ("p-000002-a2", str(tmp_path / "out" / "p-000002-a2.jsonl"))]
    assert [h.group for h in jsonl.find_rows("k1", groups=["p-000002-a2", "p-000009"])] == [
        "p-000002-a2"]
    assert list(jsonl.find_rows("k")) == []  # a byte match of part of a key is not the key
    found = list(sqlite.find_rows("k1", groups=["elsewhere"]))
    assert [(h.row["error_type"], h.row["history"], h.group) for h in found] == [
        ("invalid_request", [{"attempt": 1, "batch_id": "b0"}], None)]
    assert found[0].where == f"{tmp_path / 'dead.sqlite'} table dead_letter"
