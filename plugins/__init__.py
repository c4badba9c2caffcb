"""The plugin contract (hookspecs, loader, source/sink contracts) and the built-in sinks."""

from plugins.contract import (
    PluginContext,
    Sink,
    SinkFactory,
    Source,
    SourceFactory,
    SourceSize,
)
from plugins.errors import BatchdError, ConfigError, FatalError, InvalidOutput, RetriableError
from plugins.hookspecs import hookimpl
from plugins.records import Record, ResultRow

__all__ = (
    "BatchdError",
    "ConfigError",
    "FatalError",
    "InvalidOutput",
    "PluginContext",
    "Record",
    "ResultRow",
    "RetriableError",
    "Sink",
    "SinkFactory",
    "Source",
    "SourceFactory",
    "SourceSize",
    "hookimpl",
)
