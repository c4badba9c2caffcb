"""
``batchd dead-letters``: the rows that could not be answered, for humans.

Listing asks the pipeline's dead-letter sink to read back what it wrote, through the
optional :class:`~batchd.plugins.contract.DeadLetterReader` capability (the jsonl and
sqlite sinks have it; any plugin sink may), so no sink's storage format is known here.
Retrying does not resend the stored request — the
operator has usually just fixed the template or the data — but drops a
request file in the state directory; the daemon (running, or at its next
start) re-reads those keys from the source, shapes them with the current
config and sends them through the normal path as new chunks: new attempt,
same key, still idempotent in the sinks. In cluster mode the request goes into the
cluster's store instead, for whichever worker reads the source
(``daemon/cluster/retry_requests.py``).
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from batchd.daemon.config import Config, PipelineConfig
from batchd.daemon.factories import build_sink
from batchd.daemon.wal.chunk_ids import number_of, root_of
from batchd.daemon.wal.manifest import MANIFEST_NAME, replay
from batchd.daemon.wal.state_db import check_ledger
from batchd.plugins.contract import DeadLetterReader
from batchd.plugins.errors import ConfigError

if TYPE_CHECKING:
    from batchd.daemon.cluster.retry_requests import DeadRow

__all__ = (
    "dead_letter_reader", "iter_dead_letters", "pending_retry_requests", "request_retry",
    "request_retry_in_cluster", "retry_dir",
)


def retry_dir(config: Config) -> Path:
    return config.state_dir / "retry-requests"


class _Owners:
    """Which chunk last claimed each key (the key ledger), read-only beside a running daemon."""

    def __init__(self, state_dir: Path, pipeline: str) -> None:
        self.pipeline = pipeline
        path = state_dir / "keys.sqlite"
        check_ledger(path, allow_empty=True)
        usable = path.exists() and path.stat().st_size > 0
        self._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True) if usable else None

    def _number(self, chunk: str) -> int:
        return number_of(self.pipeline, chunk)

    def superseded(self, row: dict[str, Any], group: str) -> bool:
        """Whether the key was sent again, in a later chunk, after this dead letter."""
        if self._db is None or row.get("error_type") == "duplicate_key":
            return False
        found = self._db.execute(
            "SELECT chunk FROM keys WHERE pipeline = ? AND key = ?", (self.pipeline, row["key"])
        ).fetchone()
        return found is not None and self._number(found[0]) > self._number(group)

    def close(self) -> None:
        if self._db is not None:
            self._db.close()


def _batch_chunks(state_dir: Path) -> dict[str, str]:
    """batch id → chunk id for the batches the manifest still knows (live and recent)."""
    path = state_dir / MANIFEST_NAME
    if not path.exists():
        return {}
    state, _ = replay(path, truncate=False)
    return {**state.retired_batches, **state.live_batches}


def iter_dead_letters(
    config: Config, pipeline: PipelineConfig, *, include_superseded: bool = False
) -> Iterator[dict[str, Any]]:
    """
    The dead letters whose key has no later outcome.

    A key an operator resubmitted (``retry``) is no longer listed from its
    old part file or table row; if it failed again, its new dead letter is
    listed instead. In cluster mode the shared ledger tells (``cluster_dead_letters.py``).
    """
    if config.cluster.shared and not include_superseded:
        from batchd.daemon.commands.cluster_dead_letters import unanswered_in_cluster

        yield from unanswered_in_cluster(config, pipeline, _with_groups(config, pipeline))
        return
    owners = _Owners(config.state_dir, pipeline.name)
    try:
        for row, group in _with_groups(config, pipeline):
            # A row whose chunk is unknown (a bad source row, a batch long forgotten) is
            # always listed: hiding a real dead letter is worse than showing a stale one.
            if include_superseded or group is None or not owners.superseded(row, group):
                yield row
    finally:
        owners.close()


def _with_groups(config: Config, pipeline: PipelineConfig
                 ) -> Iterator[tuple[dict[str, Any], str | None]]:
    """Every dead letter with the chunk that wrote it, where the storage or state knows it."""
    reader = dead_letter_reader(config, pipeline)
    batch_chunks: dict[str, str] | None = None
    for found in reader.read_dead_letters():
        row, group = found.row, found.group
        if group is None:  # storage without groups (a table row): its batch names its chunk
            if batch_chunks is None:
                batch_chunks = _batch_chunks(config.state_dir)
            group = batch_chunks.get(row.get("batch_id") or "")
        yield row, group


def dead_letter_reader(config: Config, pipeline: PipelineConfig) -> DeadLetterReader:
    """
    The pipeline's dead-letter sink, built (never opened) to read its dead letters back.

    Raises:
        ConfigError: the sink's type cannot read them back (it lacks ``read_dead_letters``).
    """
    spec = pipeline.dead_letter
    sink = build_sink(config, pipeline.name, spec)
    if not isinstance(sink, DeadLetterReader):
        raise ConfigError(
            f"{spec.where}: the {spec.type!r} dead-letter sink cannot read its dead letters "
            "back (it has no read_dead_letters); read its own storage instead, or use a "
            "jsonl or sqlite dead-letter sink"
        )
    return sink


def request_retry(config: Config, pipeline: PipelineConfig, keys: list[str]) -> Path:
    """Write a retry request the daemon picks up; returns its path."""
    directory = retry_dir(config)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)  # private, as the state dir
    path = directory / f"{pipeline.name}-{time.time_ns()}.json"
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(fd, "wb") as f:
        f.write(orjson.dumps({"pipeline": pipeline.name, "keys": sorted(set(keys))}))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


async def request_retry_in_cluster(config: Config, pipeline: PipelineConfig,
                                   keys: list[str]) -> int:
    """
    Queue a retry in the cluster's store; the request's id. Each key goes with the chunk
    (or batch) of its dead letters, so that the worker forgets only a key still given to
    that chunk's family: a row answered since is not sent again (``retry_requests.py``).

    Raises:
        ConfigError: a source read in shards by several workers (a Kafka topic's
            partitions: a row has no partition to be read again under), the cluster
            unreachable by its config, or its schema missing or at another version.
        RetriableError: the database did not answer.
    """
    import os
    import socket

    from batchd.connectors._pg import close_quietly
    from batchd.daemon.cluster.retry_requests import request_retry as queue
    from batchd.daemon.cluster_readers import split_source
    from batchd.daemon.commands.cluster_connect import check_schema, connect_cluster
    from batchd.daemon.factories import build_source

    if split_source(build_source(config, pipeline.name, pipeline.source)) is not None:
        raise ConfigError(
            f"{pipeline.source.where}: pipeline {pipeline.name!r} reads a source split in "
            f"shards ({pipeline.source.type}) across the cluster's workers, which takes no "
            "dead-letter retry yet (docs/cluster.md): send those rows again through the "
            "source (a new record with the same key)"
        )
    conn, sql = await connect_cluster(config, "dead-letters-retry")
    try:
        await check_schema(conn, sql, config)
        return await queue(conn, sql, pipeline.name, _origins(config, pipeline, set(keys)),
                           f"{socket.gethostname()}:{os.getpid()} (dead-letters retry)")
    finally:
        await close_quietly(conn)


def _origins(config: Config, pipeline: PipelineConfig, keys: set[str]) -> list[DeadRow]:
    """Where each wanted key's dead letters came from (a key once per distinct origin)."""
    from batchd.daemon.cluster.retry_requests import DeadRow

    found: dict[tuple[str, str | None, str | None], DeadRow] = {}
    for row, group in _with_groups(config, pipeline):
        key = str(row["key"])
        if key in keys:
            origin = DeadRow(key, None if group is None else root_of(pipeline.name, group),
                             None if group is not None else row.get("batch_id") or None)
            found.setdefault((origin.key, origin.root, origin.batch_id), origin)
    return list(found.values())


def pending_retry_requests(state_dir: Path, pipeline: str) -> list[Path]:
    directory = state_dir / "retry-requests"
    if not directory.is_dir():
        return []
    return sorted(directory.glob(f"{pipeline}-*.json"))
