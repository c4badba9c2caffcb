"""
``batchd dead-letters list`` (and what ``retry --all`` picks) in cluster mode: the dead
letters whose key was not sent again since, as the cluster's store tells.

One daemon reads that from its own key ledger and manifest; a cluster worker's state dir
holds neither (the ledger and the chunks are in PostgreSQL). So the rows of the
dead-letter sink are read a page at a time and checked against the shared ledger (which
chunk owns each key now) and the chunk table (which chunk a table row's batch was): a
dead letter whose key a later chunk owns was answered, or failed again, since, and is
not listed (a new failure has its own dead letter). The database away: every row is
listed, with a warning, as one daemon lists a row whose chunk it cannot tell.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from itertools import islice
from typing import Any

from anyio.from_thread import start_blocking_portal

from batchd.daemon.cluster.schema import Sql
from batchd.daemon.config import Config, PipelineConfig
from batchd.daemon.wal.chunk_ids import number_of
from batchd.plugins.errors import ConfigError, RetriableError

__all__ = ("unanswered_in_cluster",)

_PAGE = 1000

Grouped = tuple[dict[str, Any], str | None]  # a dead letter and the chunk that wrote it


def unanswered_in_cluster(config: Config, pipeline: PipelineConfig,
                          rows: Iterable[Grouped]) -> Iterator[dict[str, Any]]:
    """The dead letters of *rows* whose key no later chunk of the cluster owns."""
    from batchd.connectors._pg import close_quietly
    from batchd.daemon.commands.cluster_connect import check_schema, connect_cluster

    rows = iter(rows)
    with start_blocking_portal() as portal:
        try:
            conn, sql = portal.call(connect_cluster, config, "dead-letters")
        except (ConfigError, RetriableError) as exc:
            print(f"warning: cannot read the cluster's ledger ({exc}); listing every dead "
                  "letter, answered since or not", file=sys.stderr)
            yield from (row for row, _ in rows)
            return
        try:
            portal.call(check_schema, conn, sql, config)
            while page := list(islice(rows, _PAGE)):
                yield from portal.call(_unanswered, conn, sql, pipeline.name, page)
        finally:
            portal.call(close_quietly, conn)


async def _unanswered(conn: Any, sql: Sql, pipeline: str,
                      page: list[Grouped]) -> list[dict[str, Any]]:
    batches = sorted({str(row["batch_id"]) for row, group in page
                      if group is None and row.get("batch_id")})
    by_batch = {r["batch_id"]: r["chunk"] for r in await conn.fetch(
        sql("SELECT batch_id, chunk FROM {s}.chunk WHERE batch_id = ANY($1::text[])"),
        batches)} if batches else {}
    owners = {r["key"]: r["chunk"] for r in await conn.fetch(
        sql("SELECT key, chunk FROM {s}.key_ledger WHERE pipeline = $1 AND key = ANY($2::text[])"),
        pipeline, sorted({str(row["key"]) for row, _ in page}))}
    listed = []
    for row, group in page:
        group = group or by_batch.get(str(row.get("batch_id") or ""))
        owner = owners.get(str(row["key"]))
        # Unknown origin, a key read twice (its owner is the other row), or no later
        # owner: listed, as one daemon lists them.
        if (group is None or row.get("error_type") == "duplicate_key" or owner is None
                or number_of(pipeline, owner) <= number_of(pipeline, group)):
            listed.append(row)
    return listed
