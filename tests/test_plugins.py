"""Every hookspec works for a plugin defined on the spot; the built-ins register like anyone."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from batchd.connectors.csv_source import CsvSource
from batchd.connectors.jsonl_source import JsonlSource
from batchd.plugins import hookspecs
from batchd.plugins.contract import PluginContext, Sink, Source
from batchd.plugins.errors import ConfigError, InvalidOutput
from batchd.plugins.hookspecs import hookimpl
from batchd.plugins.manager import get_plugins, load_plugins, pm, sink_factory, source_factory
from batchd.plugins.records import Record, ResultRow
from batchd.plugins.sinks.jsonl import JsonlSink
from batchd.plugins.sinks.sqlite import SqliteSink


class _ListSource(Source):
    def __init__(self, options: dict[str, Any], context: PluginContext) -> None:
        self.options = options

    async def start(self, resume: dict[str, Any] | None) -> None:
        pass

    async def poll(self) -> list[Record] | None:
        return None

    async def aclose(self) -> None:
        pass


class _ListSink(Sink):
    def __init__(self, options: dict[str, Any], context: PluginContext) -> None:
        self.rows: list[ResultRow] = []

    async def open(self) -> None:
        pass

    async def put(self, group: str, rows: Sequence[ResultRow]) -> None:
        self.rows.extend(rows)

    async def flush(self, group: str) -> None:
        pass

    async def aclose(self) -> None:
        pass


def _context(tmp_path: Path) -> PluginContext:
    return PluginContext(pipeline="p", state_dir=tmp_path, config_dir=tmp_path)


class TestHooks:
    def test_register_sources(self, tmp_path: Path) -> None:
        """A plugin's register_sources makes its type available to source_factory."""

        class SourcePlugin:
            @hookimpl
            def register_sources(self, register: Any) -> None:
                register("listed", _ListSource)

        pm.register(SourcePlugin(), name="test-sources")
        try:
            factory = source_factory("listed")
            assert factory is _ListSource
            source = factory({"x": 1}, _context(tmp_path))
            assert isinstance(source, _ListSource) and source.options == {"x": 1}
            entry = next(p for p in get_plugins() if p["name"] == "test-sources")
            assert entry["sources"] == ["listed"]
            assert entry["hooks"] == ["register_sources"]
        finally:
            pm.unregister(name="test-sources")
        with pytest.raises(ConfigError):
            source_factory("listed")

    def test_register_sinks(self, tmp_path: Path) -> None:
        """A plugin's register_sinks makes its type available to sink_factory."""

        class SinkPlugin:
            @hookimpl
            def register_sinks(self, register: Any) -> None:
                register("memory", _ListSink)

        pm.register(SinkPlugin(), name="test-sinks")
        try:
            assert sink_factory("memory") is _ListSink
            entry = next(p for p in get_plugins() if p["name"] == "test-sinks")
            assert entry["sinks"] == ["memory"]
        finally:
            pm.unregister(name="test-sinks")
        with pytest.raises(ConfigError, match="unknown sink type 'memory'"):
            sink_factory("memory")

    def test_register_commands(self) -> None:
        """A plugin's register_commands adds a subcommand to the CLI parser."""

        class CommandPlugin:
            @hookimpl
            def register_commands(self, cli: Any) -> None:
                hello = cli.add_parser("hello-test", help="say hello")
                hello.add_argument("--name", default="world")

        parser = argparse.ArgumentParser(prog="batchd")
        subcommands = parser.add_subparsers(dest="command")
        load_plugins()
        pm.register(CommandPlugin(), name="test-commands")
        try:
            pm.hook.register_commands(cli=subcommands)
        finally:
            pm.unregister(name="test-commands")
        args = parser.parse_args(["hello-test", "--name", "ops"])
        assert (args.command, args.name) == ("hello-test", "ops")

    def test_batchd_shape_request(self) -> None:
        """batchd_shape_request's first non-None answer replaces the request params."""

        class ShapePlugin:
            @hookimpl
            def batchd_shape_request(
                self, pipeline: str, record: Any, params: dict[str, Any]
            ) -> Any:
                if pipeline != "tickets":
                    return None
                return {**params, "system": f"ticket {record.key}"}

        record = Record(key="T-1", fields={"body": "hi"}, position={"line": 2})
        load_plugins()
        pm.register(ShapePlugin(), name="test-shape")
        try:
            shaped = pm.hook.batchd_shape_request(
                pipeline="tickets", record=record, params={"max_tokens": 5}
            )
            other = pm.hook.batchd_shape_request(
                pipeline="other", record=record, params={"max_tokens": 5}
            )
        finally:
            pm.unregister(name="test-shape")
        assert shaped == {"max_tokens": 5, "system": "ticket T-1"}
        assert other is None

    def test_batchd_parse_result(self) -> None:
        """batchd_parse_result may replace an output, keep it (None) or reject it."""

        class ParsePlugin:
            @hookimpl
            def batchd_parse_result(
                self, pipeline: str, key: str, output: str, message: dict[str, Any]
            ) -> Any:
                label = output.strip().lower()
                if label not in {"billing", "bug"}:
                    raise InvalidOutput(f"{key}: label {label!r} not allowed")
                return label if label != output else None

        load_plugins()
        pm.register(ParsePlugin(), name="test-parse")
        try:
            hook = pm.hook.batchd_parse_result
            assert hook(pipeline="p", key="k", output=" Billing ", message={}) == "billing"
            assert hook(pipeline="p", key="k", output="bug", message={}) is None
            with pytest.raises(InvalidOutput, match="label 'spam' not allowed"):
                hook(pipeline="p", key="k9", output="spam", message={})
        finally:
            pm.unregister(name="test-parse")

    def test_every_hookspec_has_a_test(self) -> None:
        """Adding a hookspec without a test here fails this test."""
        specs = {name for name, obj in vars(hookspecs).items() if hasattr(obj, "batchd_spec")}
        assert {"register_sources", "register_commands", "batchd_parse_result"} <= specs
        for name in specs:
            assert hasattr(TestHooks, f"test_{name}"), f"no test_{name} for hookspec {name}"


class TestBuiltins:
    def test_builtins_listed(self) -> None:
        """The file sources and sinks appear in get_plugins() as built-ins with their types."""
        by_name = {p["name"]: p for p in get_plugins()}
        expected = {
            "batchd.connectors.csv_source": ("sources", ["csv"]),
            "batchd.connectors.jsonl_source": ("sources", ["jsonl"]),
            "batchd.plugins.sinks.jsonl": ("sinks", ["dead_letter", "jsonl"]),
            "batchd.plugins.sinks.sqlite": ("sinks", ["sqlite"]),
        }
        for name, (kind, types) in expected.items():
            assert by_name[name][kind] == types
            assert by_name[name]["package"] == "batchd (built-in)"

    def test_builtin_factories(self) -> None:
        """The registered factories are the classes themselves."""
        assert source_factory("csv") is CsvSource
        assert source_factory("jsonl") is JsonlSource
        assert sink_factory("jsonl") is JsonlSink
        assert sink_factory("dead_letter") is JsonlSink
        assert sink_factory("sqlite") is SqliteSink

    def test_unknown_type_lists_known_types(self) -> None:
        """An unknown type is a ConfigError listing the known ones."""
        with pytest.raises(ConfigError, match=r"unknown source type 'cvs' \(known: .*csv, jsonl"):
            source_factory("cvs")
        with pytest.raises(ConfigError, match=r"unknown sink type 'sqlite3' \(known: .*sqlite"):
            sink_factory("sqlite3")
