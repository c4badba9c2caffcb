"""
``batchd cluster import CONFIG [--state-dir DIR]``: move a single daemon's live state
into the cluster's store, so that cluster workers carry on where it stopped.

The config is the daemon's own, with a ``[cluster]`` table added (its ``state_dir``,
or ``--state-dir``, is the one moved). The state dir's flock is taken first, so a
daemon still running on it is refused ("in use by another batchd (pid N)"). Its
manifest is replayed, its key ledger read, and every pipeline written in ONE
transaction (``daemon/cluster/pipeline_import.py``): live chunks at their stage
with their batch ids and checked spools, retired ones and the ledger's keys, the
source's sealed and committed positions, a pending create, each pipeline's config
as the one every worker must share, and a snapshot event. A pipeline the cluster
already runs is refused; a second run after a successful one recognises its own
import (the state dir, its ledger id and birth) and writes nothing again.

Afterwards the state dir holds :data:`MARKER`, and ``batchd run`` refuses it,
naming the cluster: the daemon's batches are the cluster's now, and a daemon
started on the old state would create and collect them a second time.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import socket
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson

from batchd.daemon.config import Config
from batchd.plugins.errors import ConfigError

__all__ = ("MARKER", "import_state_dir", "imported_refusal")

MARKER = "cluster-imported.json"
# Sources cluster workers read apart, one shard per partition: the daemon's chunks (one
# read sequence for the whole source) have no partition shard to go to.
_SPLIT_SOURCES = frozenset({"kafka"})


def imported_refusal(state_dir: Path) -> str | None:
    """Why ``batchd run`` must not use *state_dir* (it was imported), or None."""
    path = Path(state_dir) / MARKER
    try:
        data = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, orjson.JSONDecodeError):
        data = {}
    return (f"state dir {state_dir} was moved into the cluster (schema "
            f"{data.get('schema', '?')!r} in {data.get('cluster', '?')}) by batchd cluster "
            f"import at {data.get('at', '?')}: its pipelines "
            f"({', '.join(data.get('pipelines', [])) or '?'}) run on cluster workers now; "
            f"give this daemon a new, empty state_dir (delete {path.name} only to run the "
            "old state alone again, which would send and collect its batches twice)")


def _sums(path: Path) -> tuple[str, int] | None:
    """The (sha256, bytes) LocalStore kept beside a spool, if it did."""
    with contextlib.suppress(OSError, ValueError):
        sha256, _, size = path.read_text().strip().partition(" ")
        return sha256, int(size)
    return None


def _ledger_reader(path: Path, ledger_id: str | None) -> sqlite3.Connection | None:
    """The key ledger, read-only; refused when it does not belong with the manifest."""
    if not path.exists() or path.stat().st_size == 0:
        return None
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
    found = db.execute("SELECT value FROM meta WHERE name = 'id'").fetchone()
    if ledger_id is not None and (found is None or found[0] != ledger_id):
        db.close()
        raise ConfigError(f"key ledger {path} does not belong with the manifest beside it "
                          f"(ledger id {found and found[0]}, the manifest's {ledger_id}): "
                          "run batchd repair on the state dir first")
    return db


def _keys(db: sqlite3.Connection, pipeline: str, below: int,
          ) -> Callable[[], AsyncIterator[list[tuple[str, str, bytes]]]]:
    """The ledger's sealed claims of *pipeline*, a page at a time (never all in memory)."""
    from batchd.daemon.cluster.pipeline_import import pages

    def rows() -> Any:
        cursor = db.execute("SELECT key, chunk, position FROM keys WHERE pipeline = ?"
                            " AND chunk_no < ? ORDER BY key", (pipeline, below))
        for key, chunk, position in cursor:
            yield key, chunk, b"null" if position is None else bytes(position)

    return lambda: pages(rows())


async def import_state_dir(config: Config) -> list[str]:
    """
    Import ``config.state_dir`` into the cluster; the lines to print.

    Raises:
        ConfigError: a refusal (exit 2) naming what is at fault: no state, a pipeline
            the config lacks, a cluster that already runs a pipeline, a live worker
            reading it, a differing recorded config, a ledger of another state.
        FatalError: the state dir is in use by a running daemon.
    """
    from batchd.connectors._pg import close_quietly
    from batchd.daemon.batches.queue_limit import queue_limit_of
    from batchd.daemon.cluster.db import transaction
    from batchd.daemon.cluster.pipeline_config import check_or_record
    from batchd.daemon.cluster.pipeline_import import ImportedPipeline, Written, write
    from batchd.daemon.commands.cluster_connect import (
        check_schema,
        connect_cluster,
        describe_target,
    )
    from batchd.daemon.intake.ledger import LEDGER_NAME
    from batchd.daemon.store.cluster_worker import pipeline_fields, queue_scope
    from batchd.daemon.wal.chunk_ids import number_of
    from batchd.daemon.wal.manifest import MANIFEST_NAME, Manifest
    from batchd.daemon.wal.manifest_state import Stage

    state_dir = config.state_dir
    if not (state_dir / MANIFEST_NAME).exists():
        raise ConfigError(f"state dir {state_dir} has no {MANIFEST_NAME}: nothing to import")
    manifest = await Manifest.open(state_dir)  # the flock: a running daemon is refused
    ledger = None
    try:
        state = manifest.state
        names = sorted(state.pipelines)
        configured = {p.name for p in config.pipelines}
        missing = [n for n in names if n not in configured]
        if missing:
            raise ConfigError(f"{config.path}: the state dir {state_dir} holds pipelines "
                              f"{', '.join(map(repr, missing))} this config has no "
                              "[[pipeline]] for: import with the config that ran them")
        split = [n for n in names if config.pipeline(n).source.type in _SPLIT_SOURCES]
        if split:
            raise ConfigError(
                f"{config.path}: pipelines {', '.join(map(repr, split))} read a source the "
                "cluster reads apart by partition (kafka), which an import cannot map the "
                "daemon's chunks onto yet: let the daemon collect its batches, stop it once "
                "nothing is in flight (batchd status), and start cluster workers on a new "
                "state_dir instead")
        ledger = _ledger_reader(state_dir / LEDGER_NAME, state.ledger_id)
        intents = [c for c in state.chunks.values() if c.last_intent_at is not None]
        latest = max(intents, key=lambda c: c.last_intent_at or 0.0, default=None)
        pending = latest.chunk if latest is not None and latest.stage is Stage.INTENT else None
        origin = {"state_dir": str(state_dir.resolve()), "ledger_id": state.ledger_id,
                  "born_at": state.born_at, "seq": state.seq, "host": socket.gethostname()}
        spool_dir = state_dir / "spool"
        imported = []
        for name in names:
            chunks = [c for c in state.chunks.values() if c.pipeline == name]
            retired: dict[str, str | None] = {
                c: None for c, p in state.retired_chunks.items() if p == name}
            for batch, owner in state.retired_batches.items():
                if owner in retired or number_of(name, owner) >= 0:
                    retired[owner] = batch
            spools, sums = {}, {}
            for chunk in chunks:
                path = spool_dir / f"{chunk.chunk}.jsonl"
                if path.exists():
                    spools[chunk.chunk] = path
                    kept = _sums(path.with_name(path.name + ".sha256"))
                    if kept is not None:
                        sums[chunk.chunk] = kept
            below = state.pipelines[name].next_chunk_no
            ledger_chunks: set[str] = set()
            if ledger is not None:
                ledger_chunks = {r[0] for r in ledger.execute(
                    "SELECT DISTINCT chunk FROM keys WHERE pipeline = ? AND chunk_no < ?",
                    (name, below))}
            imported.append(ImportedPipeline(
                state=state.pipelines[name], chunks=chunks, retired=retired, spools=spools,
                sums=sums, origin=origin,
                pending=pending if pending is not None and pending in
                {c.chunk for c in chunks} else None,
                keys=None if ledger is None else _keys(ledger, name, below),
                ledger_chunks=ledger_chunks))

        conn, sql = await connect_cluster(config, "cluster-import")
        try:
            await check_schema(conn, sql, config)
            fields = pipeline_fields(config)
            scope = queue_scope(config)
            cap, _ = queue_limit_of(config.api)

            async def body() -> list[Written]:
                await check_or_record(
                    conn, sql, {n: fields[n] for n in names},
                    recorded_by=f"{socket.gethostname()}:{os.getpid()} (cluster import)",
                    where=str(config.path))
                return [await write(conn, sql, p, grace=config.cluster.takeover_grace,
                                    workspace=config.cluster.workspace, queue_scope=scope,
                                    queue_cap=None if cap is None else float(cap))
                        for p in imported]

            written = await transaction(conn, body)
        finally:
            await close_quietly(conn)
        target = describe_target(config)
        _mark(state_dir, target, sql.schema, names)
    finally:
        if ledger is not None:
            ledger.close()
        await manifest.aclose()
    lines = []
    for done in written:
        if done.already:
            lines.append(f"pipeline {done.pipeline!r} was already imported from {state_dir}; "
                         "nothing to do")
            continue
        stages = ", ".join(f"{n} {stage}" for stage, n in sorted(done.chunks.items()))
        lines.append(
            f"imported pipeline {done.pipeline!r}: {sum(done.chunks.values())} live chunks"
            f"{' (' + stages + ')' if stages else ''}, {done.retired} retired, {done.keys} "
            f"keys, {done.spools} spools ({done.spool_bytes:,} bytes)")
    if not names:
        lines.append(f"state dir {state_dir} holds no pipeline; nothing to import")
    lines.append(f"into cluster schema {sql.schema!r} in {target}; {state_dir} is marked "
                 f"imported ({MARKER}): batchd run refuses it from now on")
    return lines


def _mark(state_dir: Path, target: str, schema: str, pipelines: list[str]) -> None:
    """Write the marker (durably) that makes ``batchd run`` refuse the state dir."""
    from batchd.plugins.fsync import fsync_dir

    data = {"cluster": target, "schema": schema, "pipelines": pipelines,
            "at": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "by": "batchd cluster import"}
    tmp = state_dir / (MARKER + ".tmp")
    with tmp.open("wb") as f:
        f.write(orjson.dumps(data, option=orjson.OPT_INDENT_2) + b"\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, state_dir / MARKER)
    fsync_dir(state_dir)
