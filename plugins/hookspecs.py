"""The hooks a batchd plugin may implement; one marker pair for the project."""

from __future__ import annotations

from typing import Any

import pluggy

__all__ = ("hookimpl", "hookspec")

hookspec = pluggy.HookspecMarker("batchd")
hookimpl = pluggy.HookimplMarker("batchd")


@hookspec
def register_sources(register: Any) -> None:
    """Call ``register(type_name, factory)`` for each source type this plugin provides."""


@hookspec
def register_sinks(register: Any) -> None:
    """Call ``register(type_name, factory)`` for each sink type this plugin provides."""


@hookspec
def register_commands(cli: Any) -> None:
    """Add subcommands to the ``batchd`` CLI (an ``argparse`` subparsers object)."""


@hookspec(firstresult=True)
def batchd_shape_request(pipeline: str, record: Any, params: dict[str, Any]) -> Any:
    """Return the Messages ``params`` for ``record`` (or ``None`` to keep the template's)."""


@hookspec(firstresult=True)
def batchd_parse_result(pipeline: str, key: str, output: str, message: dict[str, Any]) -> Any:
    """Return a replacement output, ``None`` to keep it, or raise ``InvalidOutput``."""
