"""
The one import a plugin author needs::

    import batchd

    @batchd.hookimpl
    def register_sinks(register):
        register("mysink", MySink)

Everything here is re-exported from the engine's own packages; depend on
these names, not on ``daemon``/``connectors``/``plugins`` internals.
"""

from plugins import (
    BatchdError,
    ConfigError,
    FatalError,
    InvalidOutput,
    PluginContext,
    Record,
    ResultRow,
    RetriableError,
    Sink,
    SinkFactory,
    Source,
    SourceFactory,
    SourceSize,
    hookimpl,
)

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
