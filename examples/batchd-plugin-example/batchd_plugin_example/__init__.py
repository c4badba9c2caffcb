"""
A sample batchd plugin: the ``example-lines`` source, the ``example-csv``
sink, a ``batchd_parse_result`` hook and a ``batchd example-hello`` command.

This module *is* the plugin. The entry point ``example = "batchd_plugin_example"``
(group ``batchd``) makes batchd register it, and pluggy finds the
``@batchd.hookimpl`` functions below by their names. Everything comes from
``import batchd``; nothing reaches into the engine's own packages, so an
engine upgrade cannot break this plugin without a visible API change.
"""

from __future__ import annotations

import argparse
from importlib import metadata
from typing import Any

import batchd

from batchd_plugin_example.csv_sink import CsvSink
from batchd_plugin_example.lines_source import LinesSource

__all__ = (
    "CsvSink",
    "LinesSource",
    "batchd_parse_result",
    "normalise_label",
    "register_commands",
    "register_sinks",
    "register_sources",
)

_DECORATION = "`'\"*_ "


@batchd.hookimpl
def register_sources(register: Any) -> None:
    """Offer ``type = "example-lines"`` in ``[pipeline.source]``."""
    register("example-lines", LinesSource)


@batchd.hookimpl
def register_sinks(register: Any) -> None:
    """Offer ``type = "example-csv"`` in ``[[pipeline.sink]]`` and ``[pipeline.dead_letter]``."""
    register("example-csv", CsvSink)


def normalise_label(output: str) -> str | None:
    """
    ``"Billing."``, ``"`bug`"`` or ``"**other**"`` as the bare word, else ``None``.

    Only one-word answers are touched: the hook runs for every pipeline in
    the process, and a sentence that ends in a full stop must stay as it is.
    """
    word = output.strip().strip(_DECORATION).rstrip(".!").strip(_DECORATION)
    if not word or any(c.isspace() for c in word) or word == output:
        return None
    return word


@batchd.hookimpl
def batchd_parse_result(pipeline: str, key: str, output: str, message: dict[str, Any]) -> Any:
    """Strip the punctuation models put around one-word labels, before ``allowed`` is checked."""
    return normalise_label(output)


@batchd.hookimpl
def register_commands(cli: Any) -> None:
    """Add ``batchd example-hello``: proof that the plugin loaded, and which version."""
    parser = cli.add_parser("example-hello", help="say hello from batchd-plugin-example")
    parser.add_argument("--name", default="world", help="whom to greet")
    parser.set_defaults(func=_hello)


def _hello(args: argparse.Namespace) -> int:
    try:
        version = metadata.version("batchd-plugin-example")
    except metadata.PackageNotFoundError:  # imported from a source tree, not installed
        version = "(not installed)"
    print(
        f"hello, {args.name}, from batchd-plugin-example {version} "
        "(source example-lines, sink example-csv)"
    )
    return 0
