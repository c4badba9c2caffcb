"""
A property test of concurrent transitions (hypothesis): workers on their own
connections claim, fall silent, wake up and keep pushing their stale leases,
all at once. Whatever the interleaving:

* per chunk, one valid epoch at a time: every claim got a new, higher epoch,
  and every event a chunk lease wrote carries the epoch of the worker that
  claimed it (or sealed it);
* nothing but FencedOut ever refuses a worker (a fenced-in transition is always
  legal), and each FencedOut was counted on the worker's row;
* the event log replays, through the manifest's own code, to exactly the rows.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchd.daemon.cluster import event_log, fencing, leases, shards, spool_blocks, workers
from batchd.daemon.cluster.errors import FencedOut
from batchd.daemon.cluster.leases import ChunkLease
from batchd.daemon.cluster.migrations import migrate
from batchd.daemon.cluster.schema import Sql
from batchd.daemon.cluster.shards import ShardLease
from batchd.daemon.wal.manifest_state import Stage
from tests.fixtures.cluster import sealed_fields

# Weighted by repetition: enough claims and silences that takeovers and fenced
# zombies happen in most examples, enough advances that chunks reach retirement.
OPS = ("advance",) * 4 + ("claim",) * 3 + ("silence", "wake") * 2 + ("shard_work",) * 2 + (
    "take_shard", "yield")
NEXT = {Stage.SEALED: "submit_intent", Stage.INTENT: "submitted", Stage.SUBMITTED: "ended",
        Stage.ENDED: "results_committed"}
AFTER = {Stage.SEALED: Stage.INTENT, Stage.INTENT: Stage.SUBMITTED,
         Stage.SUBMITTED: Stage.ENDED, Stage.ENDED: Stage.COMMITTED}


@dataclass
class Actor:
    """A worker as the test drives it: it believes its leases until told otherwise."""

    worker_id: str
    conn: Any
    chunks: dict[str, tuple[int, Stage]] = field(default_factory=dict)
    shard: ShardLease | None = None
    fenced: int = 0
    ops: int = 0


def fields_for(kind: str, chunk: str, n: int) -> dict[str, Any]:
    batch = f"b-{chunk}"  # the same batch id whoever records it: a duplicate is a no-op
    if kind == "submit_intent":
        return {"chunk": chunk, "at": 1000.0 + n, "requests": 3}
    if kind == "submitted":
        return {"chunk": chunk, "batch_id": batch, "created_at": "t"}
    if kind == "ended":
        return {"chunk": chunk, "batch_id": batch, "counts": {"succeeded": 3}}
    return {"chunk": chunk, "batch_id": batch, "succeeded": 3, "truncated": 0, "dead": 0,
            "retried": 0, "cost_usd": 0.5, "input_tokens": 3, "output_tokens": 9,
            "retry_chunk": None}


async def run_op(actor: Actor, actors: list[Actor], op: str, target: int, sql: Sql,
                 chunks: list[str], claims: dict[str, list[tuple[int, str]]]) -> None:
    c = actor.conn
    actor.ops += 1
    try:
        if op == "claim":
            for got in await leases.claim_chunks(c, sql, actor.worker_id, "p", 2, grace=0.0):
                claims[got.lease.chunk].append((got.lease.epoch, actor.worker_id))
                actor.chunks[got.lease.chunk] = (got.lease.epoch, Stage(got.stage))
        elif op == "advance":
            held = sorted(ch for ch, (_, st_) in actor.chunks.items() if st_ in NEXT)
            if not held:
                return
            chunk = chunks[target % len(chunks)]
            chunk = chunk if chunk in held else held[0]
            epoch, stage = actor.chunks[chunk]
            lease = ChunkLease(chunk, actor.worker_id, epoch)
            try:
                await fencing.apply_transition(c, sql, lease, stage, NEXT[stage],
                                               fields_for(NEXT[stage], chunk, actor.ops))
            except FencedOut:
                del actor.chunks[chunk]
                raise
            actor.chunks[chunk] = (epoch, AFTER[stage])
        elif op == "silence":  # another process's view: *target* stopped heartbeating
            victim = actors[target % len(actors)]
            await c.execute(sql("UPDATE {s}.worker SET heartbeat_at = now() - interval '1 hour'"
                                " WHERE worker_id = $1"), victim.worker_id)
        elif op == "wake":
            await workers.heartbeat(c, sql, actor.worker_id)  # and ignores what it lost
        elif op == "take_shard":
            lease = await shards.acquire(c, sql, actor.worker_id, "p", "0", grace=0.0)
            if lease is not None:
                actor.shard = lease
        elif op == "shard_work" and actor.shard is not None:
            frontier = await shards.commit_frontier(c, sql, "p", "0")
            if frontier is not None:
                await fencing.commit_source(c, sql, actor.shard,
                                            {"pipeline": "p", "position": frontier.position,
                                             "seq": frontier.seq})
            for row in await c.fetch(sql("SELECT chunk FROM {s}.chunk"
                                         " WHERE stage = 'source_committed' ORDER BY chunk")):
                await fencing.retire_chunk(c, sql, actor.shard, row["chunk"])
        else:
            await asyncio.sleep(0)
    except FencedOut:
        actor.fenced += 1
        if op != "advance":
            actor.shard = None


async def scenario(dsn: str, sql: Sql, tmp: Path, n_chunks: int,
                   programs: list[list[tuple[str, int]]]) -> None:
    admin = await asyncpg.connect(dsn)
    conns = [await asyncpg.connect(dsn) for _ in programs]
    try:
        await admin.execute(sql(
            "TRUNCATE {s}.worker, {s}.pipeline, {s}.shard, {s}.chunk, {s}.chunk_range,"
            " {s}.event, {s}.spool_block, {s}.limit_hold, {s}.limit_counter,"
            " {s}.create_slot, {s}.key_ledger, {s}.shard_reader, {s}.chunk_number"))
        actors = [Actor(await workers.register(admin, sql, f"w{i}", ttl=30.0), conn)
                  for i, conn in enumerate(conns)]
        sealer = actors[0]
        shard = await shards.acquire(admin, sql, sealer.worker_id, "p", "0", grace=0.0)
        assert shard is not None
        sealer.shard = shard
        chunks = [f"p-{i:06d}" for i in range(n_chunks)]
        claims: dict[str, list[tuple[int, str]]] = defaultdict(list)
        spool = tmp / "spool.jsonl"
        spool.write_bytes(b'{"custom_id":"c","params":{}}\t{"key":"k"}\n')
        for i, chunk in enumerate(chunks):
            digest = await spool_blocks.upload(admin, sql, chunk, shard.epoch, spool)
            await fencing.seal_chunk(admin, sql, shard,
                                     sealed_fields(chunk, first_seq=3 * i + 1, last_seq=3 * i + 3),
                                     spool=digest)
            claims[chunk].append((1, sealer.worker_id))
            if i % 2:  # half stay with the sealer, half are up for grabs at once
                await leases.release(admin, sql, ChunkLease(chunk, sealer.worker_id, 1))
            else:
                sealer.chunks[chunk] = (1, Stage.SEALED)

        async def play(actor: Actor, program: list[tuple[str, int]]) -> None:
            for op, target in program:
                await run_op(actor, actors, op, target, sql, chunks, claims)

        await asyncio.gather(*(play(a, p) for a, p in zip(actors, programs, strict=True)))

        # One valid epoch per chunk: each claim a new, higher epoch; rows at the last one.
        rows = {r["chunk"]: r["epoch"] for r in await admin.fetch(
            sql("SELECT chunk, epoch FROM {s}.chunk"))}
        for chunk, taken in claims.items():
            epochs = sorted(e for e, _ in taken)
            assert epochs == list(range(1, len(epochs) + 1)), (chunk, taken)
            assert rows[chunk] == epochs[-1]
        holder = {(chunk, e): w for chunk, taken in claims.items() for e, w in taken}
        last: dict[str, int] = {}
        for ev in await admin.fetch(sql("SELECT chunk, worker, epoch FROM {s}.event"
                                        " WHERE fence = 'chunk' ORDER BY seq")):
            assert holder[(ev["chunk"], ev["epoch"])] == ev["worker"], dict(ev)
            assert ev["epoch"] >= last.get(ev["chunk"], 0), dict(ev)
            last[ev["chunk"]] = ev["epoch"]
        # Every FencedOut was counted where operators can see it.
        for actor in actors:
            count = await admin.fetchval(sql("SELECT fenced FROM {s}.worker WHERE worker_id = $1"),
                                         actor.worker_id)
            assert count == actor.fenced
        # The log replays to the rows.
        assert await event_log.drift(admin, sql) == []
    finally:
        for conn in conns:
            await conn.close()
        await admin.close()


program = st.lists(st.tuples(st.sampled_from(OPS), st.integers(0, 7)), min_size=8, max_size=24)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(n_chunks=st.integers(1, 5), programs=st.lists(program, min_size=2, max_size=4))
def test_concurrent_transitions_keep_one_epoch_and_replay_to_the_rows(
    pg_dsn: str, pg_schema: str, tmp_path: Path, n_chunks: int,
    programs: list[list[tuple[str, int]]],
) -> None:
    """Any interleaving of claims, silences, wake-ups and stale transitions stays consistent."""
    sql = Sql(pg_schema)

    async def go() -> None:
        conn = await asyncpg.connect(pg_dsn)
        try:
            await migrate(conn, sql)
        finally:
            await conn.close()
        await scenario(pg_dsn, sql, tmp_path, n_chunks, programs)

    asyncio.run(go())


@pytest.mark.anyio
async def test_the_property_holds_on_a_busy_fixed_program(
    pg_dsn: str, pg_schema: str, tmp_path: Path
) -> None:
    """A long fixed program where every worker in turn is silenced, robbed and fenced."""
    sql = Sql(pg_schema)
    conn = await asyncpg.connect(pg_dsn)
    try:
        await migrate(conn, sql)
    finally:
        await conn.close()
    advance = [("advance", i) for i in range(6)]
    zombie = [("silence", 0), ("silence", 1), ("yield", 0), *advance, ("wake", 0)]
    robber = [("claim", 0), ("take_shard", 0), *advance, ("shard_work", 0)]
    programs = [(advance + zombie + robber) * 3, (robber + advance + zombie) * 3,
                (zombie + robber + advance) * 3, (robber + zombie + advance) * 3]
    await scenario(pg_dsn, sql, tmp_path, 6, programs)
