"""
A sample batchd plugin: an ``example-lines`` source, an ``example-csv`` sink, a parse hook
and a ``batchd example-hello`` command. The entry point ``example = "batchd_plugin_example"``
registers this module; everything comes from ``import batchd``, whose ``FileSource`` and
``PartFiles`` do the file work (resumable offsets; part files published whole).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
from collections.abc import Sequence
from importlib import metadata
from typing import Any

import anyio
import batchd

__all__ = ("CsvSink", "LinesSource", "batchd_parse_result", "normalise_label",
           "register_commands", "register_sinks", "register_sources")

DEFAULT_COLUMNS = ("key", "status", "output", "model", "input_tokens", "output_tokens",
                   "cost_usd", "batch_id")
COLUMNS = (*DEFAULT_COLUMNS, "custom_id", "pipeline", "attempt", "error_type", "error_message",
           "cache_creation_input_tokens", "cache_read_input_tokens")


class LinesSource(batchd.FileSource):
    """Each non-empty line of ``path`` is a record ``{field: text}``, keyed by a hash of the
    text (``key = "hash"``: a repeated line is a duplicate) or its prefix (``KEY: text``)."""

    what = "example-lines source"

    def __init__(self, options: dict[str, Any], context: batchd.PluginContext) -> None:
        opts = batchd.Options(options, context, what=self.what)
        super().__init__(opts.path("path"), context, label=opts.text("path"))
        self.key_mode = opts.choice("key", ("hash", "prefix"), "hash")
        self.field = opts.text("field", "text")
        self.max_line_bytes = opts.integer("max_line_bytes", 1024 * 1024, min=1)
        self.max_records = opts.integer("batch", 1000, min=1)
        opts.finish()  # an unknown key is a mistake: "did you mean ..."

    def parse_line(self, raw: bytes, line: int) -> batchd.Record | None:
        """A line as a record, None for a blank one, an error record for a bad one."""
        try:
            text = raw.decode("utf-8").strip()
        except UnicodeDecodeError as exc:
            return self.error_record(line, f"not valid UTF-8 (byte {exc.start + 1} of the line)")
        if not text:
            return None
        if self.key_mode == "hash":
            key = hashlib.sha256(text.encode()).hexdigest()[:16]
            return batchd.Record(key, {self.field: text}, self.position(line))
        key, colon, body = (part.strip() for part in text.partition(":"))
        if not colon or not key:
            return self.error_record(line, "expected 'KEY: TEXT' (no ':' or an empty key)")
        if not body:
            return self.error_record(line, f"no text after the key {key!r}", key=key)
        return batchd.Record(key, {self.field: body}, self.position(line))


class CsvSink(batchd.Sink):
    """Each row's ``columns`` as a CSV line in ``<path>/<group>.csv``: a group's name is stable
    across replays, so a replay rewrites its file. It may be a dead-letter sink too."""

    what = "example-csv sink"

    def __init__(self, options: dict[str, Any], context: batchd.PluginContext) -> None:
        opts = batchd.Options(options, context, what=self.what)
        self.parts = batchd.PartFiles(opts.path("path"), ".csv", what=self.what)
        self.columns = opts.strings("columns", list(DEFAULT_COLUMNS), choices=COLUMNS,
                                    unique=True)
        opts.finish()
        self.pipeline, self.owner = context.pipeline, str(context.state_dir.resolve())
        self.keys: dict[str, set[str]] = {}  # written per open group: a replayed put adds none
        self.limiter = anyio.CapacityLimiter(1)  # PartFiles blocks: one worker thread

    async def open(self) -> None:
        """Create the directory and take it for this pipeline (no other batchd writes it)."""
        await anyio.to_thread.run_sync(self.parts.prepare, limiter=self.limiter)
        await anyio.to_thread.run_sync(self.parts.claim, self.pipeline, self.owner)

    async def put(self, group: str, rows: Sequence[batchd.ResultRow]) -> None:
        """Append the rows not yet written for ``group`` to its temp file."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        if not self.parts.is_open(group):  # the group's first put, or its replay: start over
            self.keys[group] = set()
            writer.writerow(self.columns)
        for row in rows:
            if row.key not in self.keys[group]:
                self.keys[group].add(row.key)
                writer.writerow(["" if (v := getattr(row, c)) is None else v
                                 for c in self.columns])
        data = buffer.getvalue().encode()
        await anyio.to_thread.run_sync(self.parts.write, group, data, limiter=self.limiter)

    async def flush(self, group: str) -> None:
        """Publish ``<group>.csv``: fsync, rename, fsync the directory."""
        await anyio.to_thread.run_sync(self.parts.publish, group, limiter=self.limiter)
        self.keys.pop(group, None)

    async def aclose(self) -> None:
        """Drop unpublished temp files (their groups are replayed); release the directory."""
        await anyio.to_thread.run_sync(self.parts.discard_all, limiter=self.limiter)


@batchd.hookimpl
def register_sources(register: Any) -> None:
    """Offer ``type = "example-lines"`` in ``[pipeline.source]``."""
    register("example-lines", LinesSource)


@batchd.hookimpl
def register_sinks(register: Any) -> None:
    """Offer ``type = "example-csv"`` in ``[[pipeline.sink]]`` and ``[pipeline.dead_letter]``."""
    register("example-csv", CsvSink)


def normalise_label(output: str) -> str | None:
    """``"Billing."``, ``"`bug`"`` or ``"**other**"`` as the bare word; else None, so that a
    sentence (the hook runs for every pipeline) is kept as it is."""
    word = output.strip().strip("`'\"*_ ").rstrip(".!").strip("`'\"*_ ")
    return None if not word or any(c.isspace() for c in word) or word == output else word


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
    version = metadata.version("batchd-plugin-example")
    print(f"hello, {args.name}, from batchd-plugin-example {version} "
          "(source example-lines, sink example-csv)")
    return 0
