"""
``batchd reconcile CONFIG``: the operator's answer to the ``unknown_batches`` alarm.

When batches the state does not know share some custom_ids with a chunk without being
its batch (:mod:`batchd.daemon.batches.reconcile`), the daemon sends nothing and waits
for a decision:

* ``--adopt BATCH --chunk CHUNK``: the batch is this chunk's; it is recorded as the
  chunk's batch and collected (rows of the chunk it lacks are sent in a retry chunk,
  rows it holds beyond the chunk are ignored);
* ``--ignore BATCH``: the batch is not this state's (another tool shares the
  workspace); it is never matched again, and the chunk is sent — its shared rows
  paid a second time, which is why batchd does not decide this on its own.

Without an option it lists what the daemon found. Writing a decision takes the
manifest's lock: stop the daemon first, start it again after.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable

import anyio

from batchd.daemon.batches.api import BatchesApi, resolve_api_key
from batchd.daemon.batches.reconcile import unknown_batches
from batchd.daemon.config import Config
from batchd.daemon.wal.manifest import MANIFEST_NAME, Manifest, replay
from batchd.daemon.wal.manifest_state import Stage
from batchd.daemon.wal.private_state import make_private
from batchd.daemon.wal.records import BatchDisowned, SubmitIntent, Submitted
from batchd.plugins.errors import ConfigError

__all__ = ("adopt_batch", "ignore_batch", "list_unknown")


def list_unknown(config: Config) -> list[str]:
    """Lines describing the unknown batches and the latest alarms about them."""
    lines = [f"{b.batch_id}\t{b.requests} requests\tcreated {b.created_at}"
             for b in unknown_batches(config.state_dir)]
    path = config.state_dir / MANIFEST_NAME
    if path.exists():
        state, _ = replay(path)
        for alarm in state.alarms:
            if alarm.kind == "unknown_batches":
                lines.append(f"alarm ({alarm.pipeline}, {alarm.chunk}): {alarm.message}")
    return lines


def ignore_batch(config: Config, batch_id: str) -> str:

    async def run() -> str:
        async with await Manifest.open(config.state_dir) as manifest:
            owner = manifest.state.batch_owner(batch_id)
            if owner is not None:
                raise ConfigError(f"batch {batch_id} is chunk {owner}'s; it cannot be ignored")
            await manifest.append(BatchDisowned(
                batch_id=batch_id, reason="ignored by the operator (batchd reconcile)"))
        return (f"batch {batch_id} is recorded as not this state's; chunks sharing its "
                "custom_ids are sent (and paid) when batchd starts")

    return _privately(config, run)


def adopt_batch(config: Config, batch_id: str, chunk_id: str) -> str:

    async def run() -> str:
        async with await Manifest.open(config.state_dir) as manifest:
            state = manifest.state
            chunk = state.chunks.get(chunk_id)
            if chunk is None:
                raise ConfigError(f"no live chunk {chunk_id!r} in {manifest.path}")
            if chunk.stage not in (Stage.SEALED, Stage.INTENT):
                raise ConfigError(f"chunk {chunk_id} is at {chunk.stage} (batch "
                                  f"{chunk.batch_id}); only a chunk not yet sent can adopt")
            owner = state.batch_owner(batch_id)
            if owner is not None:
                raise ConfigError(f"batch {batch_id} is already chunk {owner}'s")
            created = next((b.created_at for b in unknown_batches(config.state_dir)
                            if b.batch_id == batch_id), None)
            if created is None:
                api = BatchesApi(config.api, resolve_api_key())
                try:
                    created = str((await api.retrieve(batch_id)).created_at)
                finally:
                    await api.aclose()
            if chunk.stage is Stage.SEALED:
                await manifest.append(SubmitIntent(chunk=chunk_id, at=time.time(),
                                                   requests=chunk.requests))
            await manifest.append(Submitted(chunk=chunk_id, batch_id=batch_id,
                                            created_at=created))
        return (f"batch {batch_id} is recorded as chunk {chunk_id}'s; it is collected when "
                "batchd starts")

    return _privately(config, run)


def _privately(config: Config, run: Callable[[], Awaitable[str]]) -> str:
    """Run a decision with the state dir's privacy (umask 077), as the daemon would."""
    umask = make_private(config.state_dir)
    try:
        return anyio.run(run)
    finally:
        os.umask(umask)
