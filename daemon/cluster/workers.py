"""
Worker rows: registration, heartbeats on the database clock, and what each owns.

A worker row is one process incarnation (``<name>/<random>``): a restarted
daemon registers anew, and its previous incarnation's leases are taken over like
any dead worker's (after TTL + grace), because nothing can prove from here that
the old process is really gone. A graceful stop calls :func:`deregister`, which
hands everything back at once.

The heartbeat's reply lists every lease the worker still holds, read after its
own heartbeat committed: whatever it held before and is not listed was taken
over, and its driver must stop.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from batchd.daemon.cluster.db import transaction
from batchd.daemon.cluster.deadline import LeaseDeadline
from batchd.daemon.cluster.errors import WorkerGone
from batchd.daemon.cluster.schema import Sql

__all__ = (
    "Heartbeat",
    "WorkerInfo",
    "deregister",
    "heartbeat",
    "purge_stopped",
    "register",
    "workers",
)


@dataclass(frozen=True)
class Heartbeat:
    """What a committed heartbeat saw: the DB clock and every lease still held."""

    db_now: float
    chunks: Mapping[str, int]  # chunk -> epoch
    shards: Mapping[tuple[str, str], int]  # (pipeline, shard) -> epoch
    slots: Mapping[str, int]  # workspace -> slot epoch

    def lost_chunks(self, held: Mapping[str, int]) -> set[str]:
        """Chunks in *held* (chunk -> epoch) this worker no longer holds at that epoch."""
        return {c for c, epoch in held.items() if self.chunks.get(c) != epoch}


@dataclass(frozen=True)
class WorkerInfo:
    """One worker as ``batchd status`` shows it."""

    worker_id: str
    name: str
    host: str
    pid: int
    heartbeat_age: float
    lease_ttl: float
    alive: bool
    stopped: bool
    fenced: int
    chunks: int
    shards: int

    def state(self, grace: float) -> str:
        """
        ``alive``, ``silent``, ``dead`` or ``stopped``, as a survivor with *grace* sees it.

        *Silent* is past its own TTL, when its drivers must already have stopped;
        *dead* is past TTL + *grace*, when a survivor may take its work over.
        """
        if self.stopped:
            return "stopped"
        if self.alive:
            return "alive"
        return "dead" if self.heartbeat_age > self.lease_ttl + grace else "silent"


async def register(
    conn: Any, sql: Sql, name: str, *, ttl: float, host: str | None = None
) -> str:
    """Add this process as a live worker (heartbeat now); returns its worker id."""
    worker_id = f"{name}/{uuid.uuid4().hex[:12]}"
    await conn.execute(
        sql("INSERT INTO {s}.worker (worker_id, name, host, pid, lease_ttl)"
            " VALUES ($1, $2, $3, $4, $5)"),
        worker_id,
        name,
        host or socket.gethostname(),
        os.getpid(),
        timedelta(seconds=ttl),
    )
    return worker_id


async def heartbeat(
    conn: Any, sql: Sql, worker_id: str, *, deadline: LeaseDeadline | None = None
) -> Heartbeat:
    """
    Renew the worker's leases on the DB clock; list what it still holds.

    With *deadline*, the time is read before the heartbeat is sent and the
    deadline renewed only once it committed.

    Raises:
        WorkerGone: the row was stopped or purged; the worker holds nothing.
    """
    sent = deadline.now() if deadline is not None else 0.0

    async def body() -> Heartbeat:
        db_now = await conn.fetchval(
            sql("UPDATE {s}.worker SET heartbeat_at = now()"
                " WHERE worker_id = $1 AND stopped_at IS NULL"
                " RETURNING extract(epoch FROM now())::float8"),
            worker_id,
        )
        if db_now is None:
            raise WorkerGone(f"worker {worker_id} is no longer registered; register again")
        chunks = await conn.fetch(
            sql("SELECT chunk, epoch FROM {s}.chunk WHERE owner = $1 AND stage <> 'retired'"),
            worker_id,
        )
        shards = await conn.fetch(
            sql("SELECT pipeline, shard, epoch FROM {s}.shard WHERE owner = $1"), worker_id
        )
        slots = await conn.fetch(
            sql("SELECT workspace, epoch FROM {s}.create_slot WHERE holder = $1"), worker_id
        )
        return Heartbeat(
            db_now,
            {r["chunk"]: r["epoch"] for r in chunks},
            {(r["pipeline"], r["shard"]): r["epoch"] for r in shards},
            {r["workspace"]: r["epoch"] for r in slots},
        )

    try:
        beat = await transaction(conn, body)
    except WorkerGone:
        if deadline is not None:
            deadline.expire()
        raise
    if deadline is not None:
        deadline.renew(sent)
    return beat


async def deregister(conn: Any, sql: Sql, worker_id: str) -> None:
    """
    Stop the worker: hand back its chunks, shards and create slots at once.

    Call it only once every external action of the worker has stopped: a slot's
    pending intent stays for the next holder to resolve, as after a crash.
    """

    async def body() -> None:
        await conn.execute(sql("UPDATE {s}.chunk SET owner = NULL WHERE owner = $1"), worker_id)
        await conn.execute(sql("UPDATE {s}.shard SET owner = NULL WHERE owner = $1"), worker_id)
        await conn.execute(
            sql("UPDATE {s}.create_slot SET holder = NULL WHERE holder = $1"), worker_id
        )
        await conn.execute(
            sql("UPDATE {s}.worker SET stopped_at = now() WHERE worker_id = $1"), worker_id
        )

    await transaction(conn, body)


async def workers(conn: Any, sql: Sql) -> list[WorkerInfo]:
    """Every registered worker with its heartbeat age and what it holds, by name."""
    rows = await conn.fetch(
        sql("""
        SELECT w.worker_id, w.name, w.host, w.pid, w.fenced, w.stopped_at IS NOT NULL AS stopped,
               extract(epoch FROM now() - w.heartbeat_at)::float8 AS age,
               extract(epoch FROM w.lease_ttl)::float8 AS ttl,
               (SELECT count(*) FROM {s}.chunk c
                 WHERE c.owner = w.worker_id AND c.stage <> 'retired') AS chunks,
               (SELECT count(*) FROM {s}.shard h WHERE h.owner = w.worker_id) AS shards
        FROM {s}.worker w ORDER BY w.name, w.started_at""")
    )
    return [
        WorkerInfo(
            worker_id=r["worker_id"], name=r["name"], host=r["host"], pid=r["pid"],
            heartbeat_age=r["age"], lease_ttl=r["ttl"],
            alive=not r["stopped"] and r["age"] < r["ttl"], stopped=r["stopped"],
            fenced=r["fenced"], chunks=r["chunks"], shards=r["shards"],
        )
        for r in rows
    ]


async def purge_stopped(conn: Any, sql: Sql, *, older_than: float) -> int:
    """Forget workers stopped, or silent, for *older_than* seconds that hold nothing."""

    async def body() -> str:
        result: str = await conn.execute(
            sql("""
            DELETE FROM {s}.worker w
            WHERE coalesce(w.stopped_at, w.heartbeat_at) < now() - $1 * interval '1 second'
              AND NOT EXISTS (SELECT 1 FROM {s}.chunk c WHERE c.owner = w.worker_id
                              AND c.stage <> 'retired')
              AND NOT EXISTS (SELECT 1 FROM {s}.shard h WHERE h.owner = w.worker_id)
              AND NOT EXISTS (SELECT 1 FROM {s}.create_slot s WHERE s.holder = w.worker_id)"""),
            older_than,
        )
        return result

    done = await transaction(conn, body)
    return int(done.split()[-1])
