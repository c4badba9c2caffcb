"""
A structlog logger that imports structlog when it first logs.

``batchd status`` replays the manifest, whose module logs only while a daemon writes
it; importing structlog for that (and asyncio, which ``structlog.stdlib`` imports)
cost ~80 ms of a command that should start in 0.3 s. Modules on the read-only paths
of the light commands take their logger from here; the engine's other modules import
structlog as usual (the CLI has imported it, without rich, before they load).
"""

from __future__ import annotations

from typing import Any

__all__ = ("LazyLogger",)


class LazyLogger:
    """Stands for ``structlog.get_logger(name)``; every attribute comes from it."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __getattr__(self, attr: str) -> Any:
        import importlib

        # First: structlog without its rich integration, even though rich is imported.
        from batchd.daemon.ops import _structlog_plain  # noqa: F401

        structlog = importlib.import_module("structlog")
        return getattr(structlog.get_logger(self.name), attr)
