"""
The one import a plugin author needs::

    import batchd

    @batchd.hookimpl
    def register_sinks(register):
        register("mysink", MySink)

Everything here is re-exported from the engine's own packages; depend on
these names, not on ``batchd.daemon``/``batchd.connectors``/``batchd.plugins``
internals.
"""

from batchd.plugins.contract import (
    PluginContext,
    Sink,
    SinkFactory,
    Source,
    SourceFactory,
    SourceSize,
)
from batchd.plugins.errors import (
    BatchdError,
    ConfigError,
    FatalError,
    InvalidOutput,
    RetriableError,
)
from batchd.plugins.hookspecs import hookimpl
from batchd.plugins.records import Record, ResultRow

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
