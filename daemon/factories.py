"""
Sources and sinks built from their config tables.

Kept apart from the supervisor so commands that only read a source
(``batchd estimate``) do not pay for importing the API client.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from batchd.daemon.config import Config, PluginSpec
from batchd.plugins.builtins import MissingDriver
from batchd.plugins.contract import PluginContext, Sink, Source
from batchd.plugins.errors import ConfigError
from batchd.plugins.manager import sink_factory, source_factory

__all__ = ("build_sink", "build_source")


def _context(
    config: Config, pipeline: str, spec: PluginSpec, until_drained: bool = False
) -> PluginContext:
    # spec.where is "<file>: <table>"; the plugin's Options names both in its messages.
    table = spec.where.removeprefix(f"{config.path}: ")
    return PluginContext(
        pipeline=pipeline, state_dir=config.state_dir, config_dir=config.path.resolve().parent,
        until_drained=until_drained, config_file=config.path, table=table,
    )


def _build(spec: PluginSpec, factory: Callable[[], Any], context: PluginContext) -> Any:
    try:
        return factory()(dict(spec.options), context)
    except MissingDriver as exc:
        raise ConfigError(f"pipeline {context.pipeline!r} uses the {exc.type_name} {exc.kind}: "
                          f"pip install 'batchd[{exc.extra}]' ({exc.driver} is not installed)"
                          ) from None
    except ConfigError as exc:
        if exc.file is not None:
            raise  # located by batchd.Options: it already names the file, table and key
        raise ConfigError(f"{spec.where}: {exc}") from None


def build_source(
    config: Config, pipeline: str, spec: PluginSpec, *, until_drained: bool = False
) -> Source:
    context = _context(config, pipeline, spec, until_drained)
    source: Source = _build(spec, lambda: source_factory(spec.type), context)
    return source


def build_sink(config: Config, pipeline: str, spec: PluginSpec) -> Sink:
    sink: Sink = _build(spec, lambda: sink_factory(spec.type), _context(config, pipeline, spec))
    return sink
