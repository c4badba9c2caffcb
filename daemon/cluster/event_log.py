"""
The event log read back: records in order, their replay, and the rows' own state.

Every applied transition inserted its record unchanged (``daemon/cluster/fencing.py``),
so replaying the log through the single daemon's ``ManifestState`` must give
exactly the materialized rows. :func:`drift` checks that; the property tests run
it after concurrent workers, and an operator command can run it on a live
cluster (it reads, never writes).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict
from typing import Any

from batchd.daemon.cluster.db import from_json
from batchd.daemon.cluster.reads import live_state
from batchd.daemon.cluster.schema import Sql
from batchd.daemon.wal.manifest_state import RETIRED_KEPT, ManifestState

__all__ = ("drift", "present", "records", "replay", "rows_state", "since")


async def records(
    conn: Any, sql: Sql, *, after: int = 0, page: int = 1000
) -> AsyncIterator[dict[str, Any]]:
    """Every record after seq *after*, as the manifest would hold it, a page at a time."""
    statement = sql("SELECT seq, ts, kind, record FROM {s}.event WHERE seq > $1 ORDER BY seq"
                    " LIMIT $2")
    while True:
        rows = await conn.fetch(statement, after, page)
        for row in rows:
            yield {"seq": row["seq"], "ts": row["ts"], "kind": row["kind"],
                   **from_json(row["record"])}
        if len(rows) < page:
            return
        after = rows[-1]["seq"]


async def since(conn: Any, sql: Sql, after: int, missing: Sequence[int] = (), *,
                limit: int = 5000) -> list[dict[str, Any]]:
    """
    The records after seq *after*, and those of the seqs in *missing*, in seq order.

    A seq is taken inside its transaction, so a reader can see seq 12 committed while
    11 is not yet: *missing* are the seqs a reader skipped that way (or that a rolled
    back transaction burnt), asked for again. At most *limit* records: ask again after
    the last one when that many came back.
    """
    rows = await conn.fetch(
        sql("SELECT seq, ts, kind, record FROM {s}.event"
            " WHERE seq > $1 OR seq = ANY($2::bigint[]) ORDER BY seq LIMIT $3"),
        after, list(missing), limit,
    )
    return [{"seq": row["seq"], "ts": row["ts"], "kind": row["kind"], **from_json(row["record"])}
            for row in rows]


async def present(conn: Any, sql: Sql, upto: int, window: int) -> list[int]:
    """The seqs visible among the last *window* up to *upto*: the others are still missing."""
    rows = await conn.fetch(
        sql("SELECT seq FROM {s}.event WHERE seq <= $1 AND seq > $1 - $2 ORDER BY seq"),
        upto, window,
    )
    return [row["seq"] for row in rows]


async def replay(conn: Any, sql: Sql) -> ManifestState:
    """The state the event log replays to, through the manifest's own code."""
    from batchd.daemon.cluster.pipeline_import import KIND, merge

    state = ManifestState()
    async for record in records(conn, sql):
        if record["kind"] == KIND:  # a single daemon's pipeline, moved in by a snapshot
            merge(state, record["seq"], record)
        else:
            state.apply(record)
    return state


async def rows_state(conn: Any, sql: Sql) -> ManifestState:
    """The materialized rows as a ManifestState (what ``batchd status`` would show)."""
    state = await live_state(conn, sql)
    # Retired chunks as replay keeps them: the last RETIRED_KEPT retired (and, apart, the
    # last RETIRED_KEPT with a batch), oldest first. Their rows stay for ever, so reading
    # them all would make the view, and every full read of it, grow with the history.
    retired = sql("SELECT chunk, pipeline, batch_id FROM {s}.chunk WHERE stage = 'retired'"
                  " {batched} ORDER BY retired_at DESC NULLS LAST, sealed_event DESC LIMIT $1")
    for row in reversed(await conn.fetch(retired.replace("{batched}", ""), RETIRED_KEPT)):
        state.retired_chunks[row["chunk"]] = row["pipeline"]
    for row in reversed(await conn.fetch(retired.replace("{batched}",
                                                         "AND batch_id IS NOT NULL"),
                                         RETIRED_KEPT)):
        state.retired_batches[row["batch_id"]] = row["chunk"]
    return state


async def drift(conn: Any, sql: Sql) -> list[str]:
    """
    How the rows differ from the replayed log, one line per difference; [] when equal.

    Read it in one repeatable-read snapshot, so a live cluster's concurrent
    transitions cannot show up as drift.
    """
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        replayed = await replay(conn, sql)
        rows = await rows_state(conn, sql)
    problems: list[str] = []
    for chunk_id in sorted(replayed.chunks.keys() | rows.chunks.keys()):
        a, b = replayed.chunks.get(chunk_id), rows.chunks.get(chunk_id)
        if a is None or b is None:
            problems.append(f"chunk {chunk_id}: only in the {'rows' if a is None else 'log'}")
        elif asdict(a) != asdict(b):
            diff = {k: (v, asdict(b)[k]) for k, v in asdict(a).items() if asdict(b)[k] != v}
            problems.append(f"chunk {chunk_id}: log vs rows {diff}")
    for name in sorted(replayed.pipelines.keys() | rows.pipelines.keys()):
        p, q = replayed.pipelines.get(name), rows.pipelines.get(name)
        if p is None or q is None:
            problems.append(f"pipeline {name}: only in the {'rows' if p is None else 'log'}")
        elif asdict(p) != asdict(q):
            diff = {k: (v, asdict(q)[k]) for k, v in asdict(p).items() if asdict(q)[k] != v}
            problems.append(f"pipeline {name}: log vs rows {diff}")
    if replayed.retired_chunks != rows.retired_chunks:
        problems.append("retired chunks differ: "
                        f"{sorted(replayed.retired_chunks.keys() ^ rows.retired_chunks.keys())}")
    if replayed.retired_batches != rows.retired_batches:
        problems.append("retired batches differ")
    return problems
