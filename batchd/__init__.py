"""
The one import a plugin author needs::

    import batchd

    @batchd.hookimpl
    def register_sinks(register):
        register("mysink", MySink)

Everything here is re-exported from the engine's own packages; depend on
these names, not on ``batchd.daemon``/``batchd.connectors``/``batchd.plugins``
internals. ``FileSource`` and ``PartFiles`` are imported on first use, so a
plugin that needs neither does not pay for them.
"""

from typing import TYPE_CHECKING, Any

from batchd.plugins.contract import (
    DeadLetter,
    DeadLetterReader,
    FoundRow,
    PluginContext,
    RowFinder,
    Sink,
    SinkFactory,
    SinkOutput,
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
from batchd.plugins.options import REQUIRED, Options
from batchd.plugins.records import Record, ResultRow

if TYPE_CHECKING:
    from batchd.connectors._file_source import FileSource
    from batchd.plugins.sinks._partfile import PartFiles

__all__ = (
    "REQUIRED",
    "BatchdError",
    "ConfigError",
    "DeadLetter",
    "DeadLetterReader",
    "FatalError",
    "FileSource",
    "FoundRow",
    "InvalidOutput",
    "Options",
    "PartFiles",
    "PluginContext",
    "Record",
    "ResultRow",
    "RetriableError",
    "RowFinder",
    "Sink",
    "SinkFactory",
    "SinkOutput",
    "Source",
    "SourceFactory",
    "SourceSize",
    "hookimpl",
)

_LAZY = {
    "FileSource": "batchd.connectors._file_source",
    "PartFiles": "batchd.plugins.sinks._partfile",
}


def __dir__() -> list[str]:
    # The lazy names are public before their first use too (tab completion, dir()).
    return sorted({*globals(), *_LAZY})


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'batchd' has no attribute {name!r}")
