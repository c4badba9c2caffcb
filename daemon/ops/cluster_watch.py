"""
A cluster worker's view of the whole cluster, for its dashboard and its metrics.

The dashboard and ``/metrics`` are answered from HTTP threads and must never wait
on the database: a worker whose link to PostgreSQL is cut must still serve its
metrics (that is when they matter). So the overview (every worker, its heartbeat
and what it owns; the limit counters) is read here, on the event loop, every few
seconds, on a connection of its own (never the store's pool, which the heartbeat
needs), with the same reader as ``batchd cluster status``. The threads only read
the last :class:`Seen`, replaced whole at each read. A failed read keeps the last
overview and says since when, and why, it could not be refreshed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
import structlog

from batchd.plugins.errors import BatchdError

if TYPE_CHECKING:
    from batchd.daemon.config import Config

__all__ = ("ClusterWatch", "Seen", "watch_interval")

log = structlog.get_logger("batchd.cluster")

READ_TIMEOUT = 10.0  # seconds one read (with its connect) may take before it counts as failed


def watch_interval(lease_ttl: float) -> float:
    """As often as heartbeats go out, and at least every 5 s."""
    return min(5.0, lease_ttl / 3)


@dataclass(frozen=True)
class Seen:
    """The last overview read, when (monotonic), and the current failure, if any."""

    overview: dict[str, Any] | None = None
    read_at: float | None = None
    error: str | None = None
    failing_since: float | None = None  # wall clock, for people
    reads: int = 0
    failures: int = 0

    def age(self) -> float | None:
        """Seconds since the overview was read; None before the first read."""
        return None if self.read_at is None else time.monotonic() - self.read_at


class ClusterWatch:
    """Reads the cluster's overview every *interval* seconds (:meth:`run_forever`)."""

    def __init__(self, config: Config, worker_id: str, *, interval: float) -> None:
        self.config = config
        self.worker_id = worker_id
        self.interval = interval
        self.seen = Seen()

    def shown(self) -> dict[str, Any] | None:
        """
        What the dashboard and ``status`` show: the overview, plus ``this_worker``,
        ``read_age_seconds`` and ``error`` (why it is stale), or None before any read.
        """
        seen = self.seen
        if seen.overview is None and seen.error is None:
            return None
        age = seen.age()
        return {**(seen.overview or {"workers": [], "limits": [], "unowned_chunks": {},
                                     "create_slots": []}),
                "this_worker": self.worker_id,
                "read_age_seconds": None if age is None else round(age, 1),
                "error": seen.error, "failing_since": seen.failing_since}

    async def read_once(self, conn: Any, sql: Any) -> dict[str, Any]:
        from batchd.daemon.commands.cluster_status import read_cluster

        return (await read_cluster(conn, sql, self.config)).overview

    async def run_forever(self) -> None:
        """Read, wait, read again; a failure is kept for the page and the metrics, and logged."""
        from batchd.connectors._pg import redact
        from batchd.daemon.commands.cluster_connect import cluster_dsn, connect_cluster

        conn: Any = None
        sql: Any = None
        while True:
            try:
                with anyio.fail_after(READ_TIMEOUT):
                    if conn is None:
                        conn, sql = await connect_cluster(self.config, "view")
                        # A read paused mid-transaction must not hold its snapshot for long.
                        await conn.execute("SET idle_in_transaction_session_timeout = '60s'")
                    overview = await self.read_once(conn, sql)
            except anyio.get_cancelled_exc_class():
                if conn is not None:
                    conn.terminate()
                raise
            except Exception as exc:
                if isinstance(exc, TimeoutError):
                    why = (f"the cluster's database did not answer within "
                           f"{READ_TIMEOUT:.0f}s")
                elif isinstance(exc, BatchdError):
                    why = str(exc)
                else:
                    why = redact(f"{type(exc).__name__}: {exc}", cluster_dsn(self.config))
                if conn is not None:
                    conn.terminate()  # a cut or stalled link: never wait to close it
                    conn = None
                seen = self.seen
                if seen.error != why:
                    log.warning("cannot read the cluster's overview; the dashboard and "
                                "metrics show the last one read", error=why)
                self.seen = Seen(seen.overview, seen.read_at, why,
                                 seen.failing_since or time.time(), seen.reads,
                                 seen.failures + 1)
            else:
                if self.seen.error is not None:
                    log.info("cluster overview read again")
                self.seen = Seen(overview, time.monotonic(), None, None,
                                 self.seen.reads + 1, self.seen.failures)
            await anyio.sleep(self.interval)
