"""
``batchd repair CONFIG``: rebuild a lost or foreign key ledger from what remains, and cut
a damaged manifest back to its last good record (:mod:`batchd.daemon.wal.manifest_damage`).

The ledger (``keys.sqlite``) says which keys were already sent, so that a key read
again is a duplicate, not a second payment. When it is lost, ``batchd run`` refuses
to start (:mod:`batchd.daemon.intake.ledger_binding`); this command re-derives it:

* every live chunk's keys from its spool file (with the chunk that claimed them);
* the keys of chunks already retired by reading the source again from its start up
  to the last record the manifest sealed, as the packer read them (file and table
  sources can; a source that cannot is reported, and only a key repeated later is
  then missed).

The old file, if any, is kept beside it as ``keys.sqlite.replaced-<time>``; the new
one is bound to the manifest. The daemon must be stopped (the manifest lock).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import anyio

from batchd.daemon.batches.reconcile import RECONCILE_NAME
from batchd.daemon.config import Config, PipelineConfig
from batchd.daemon.factories import build_source
from batchd.daemon.intake.ledger import LEDGER_NAME, KeyLedger, ledger_files, position_identity
from batchd.daemon.intake.packer import shape_record
from batchd.daemon.intake.shaper import Shaper
from batchd.daemon.intake.spool import iter_spool
from batchd.daemon.wal.chunk_ids import number_of, root_of
from batchd.daemon.wal.manifest import Manifest, _take_lock, replay
from batchd.daemon.wal.manifest_damage import ManifestDamaged, cut_damaged_manifest
from batchd.daemon.wal.manifest_state import ManifestState
from batchd.daemon.wal.private_state import make_private
from batchd.daemon.wal.records import LedgerBound
from batchd.daemon.wal.state_db import (
    StateFileDamaged,
    check_ledger,
    check_reconcile_cache,
    set_aside,
)
from batchd.plugins.errors import BatchdError, ConfigError

__all__ = ("repair_ledger",)

RETIRED_OWNER = "retired"  # the chunk named for keys whose chunk left the manifest


def repair_ledger(config: Config) -> list[str]:
    """Rebuild ``keys.sqlite`` for ``config``'s state dir; returns what was done, line by line."""
    umask = make_private(config.state_dir)
    try:
        return anyio.run(_repair, config)
    finally:
        os.umask(umask)


def _cut_damage(config: Config) -> list[str]:
    """Cut a manifest damaged before its end back to its last good record (lock held)."""
    state_dir = config.state_dir
    if not (state_dir / "manifest.jsonl").exists():
        return []
    state_dir.mkdir(parents=True, exist_ok=True)
    lock_fd = _take_lock(state_dir)
    try:
        try:
            replay(state_dir / "manifest.jsonl")
        except ManifestDamaged as damage:
            if damage.line <= 1:
                raise ConfigError(
                    f"{damage.path} line 1: the manifest's first record is damaged, so "
                    f"nothing of it can be kept: restore the state dir from a backup (the "
                    f"next start adopts later batches from the API), or move it away to "
                    f"start over (every row is sent, and paid, again)"
                ) from None
            kept, lines = cut_damaged_manifest(damage.path, damage)
            return [f"{damage.path} was damaged at line {damage.line}: kept it as {kept} and "
                    f"cut it to its first {lines} records; the next start adopts batches "
                    f"created after them from the API instead of paying for them again"]
        return []
    finally:
        os.close(lock_fd)


def _damage(check: Callable[[], None]) -> str | None:
    """What a state-file check found wrong, or None."""
    try:
        check()
    except StateFileDamaged as exc:
        return str(exc).partition(": stop batchd")[0]
    return None


def _set_aside_damaged_cache(state_dir: Path) -> list[str]:
    """A damaged reconcile cache is derived data: keep it aside, the next start refills it."""
    path = state_dir / RECONCILE_NAME
    damage = _damage(lambda: check_reconcile_cache(path, deep=True))
    if damage is None:
        return []
    kept = set_aside(path)
    return [f"{damage}: kept it as {kept[0]}; the next start reads the API's batches into a "
            f"new one"]


async def _repair(config: Config) -> list[str]:
    state_dir = config.state_dir
    cut = await anyio.to_thread.run_sync(_cut_damage, config)
    async with await Manifest.open(state_dir) as manifest:
        report: list[str] = [*cut, *_set_aside_damaged_cache(state_dir)]
        path = state_dir / LEDGER_NAME
        damage = _damage(lambda: check_ledger(path, deep=True))
        if path.exists() and damage is None:
            current = KeyLedger(path)
            try:
                same = manifest.state.ledger_id in (None, current.id)
            finally:
                current.close()
            if same:
                return [*report, f"{path} belongs with {manifest.path}; nothing to repair"
                        + (" (kept as it is)" if cut else "")]
        if damage is not None:
            report.append(damage)
        for kept in set_aside(path):
            report.append(f"kept the old {kept.name.partition('.replaced-')[0]} as {kept}")
        building = path.with_name(LEDGER_NAME + ".rebuild")
        for file in ledger_files(building):
            file.unlink(missing_ok=True)
        ledger = KeyLedger(building)
        try:
            for pipeline in config.pipelines:
                report.extend(await _rebuild_pipeline(config, pipeline, manifest.state, ledger))
            ledger_id = ledger.id
        finally:
            ledger.close()
        os.replace(building, path)
        for file in ledger_files(building)[1:]:
            file.unlink(missing_ok=True)
        await manifest.append(LedgerBound(ledger=ledger_id))
        report.append(f"rebuilt {path} and bound it to {manifest.path}")
        return report


async def _rebuild_pipeline(
    config: Config, pipeline: PipelineConfig, state: ManifestState, ledger: KeyLedger
) -> list[str]:
    name = pipeline.name
    report: list[str] = []
    rows: list[tuple[str, str, int, str, bytes | None]] = []
    missing = []
    for chunk in state.chunks.values():
        if chunk.pipeline != name:
            continue
        spool = config.state_dir / "spool" / f"{chunk.chunk}.jsonl"
        if not spool.exists():
            missing.append(chunk.chunk)
            continue
        owner = root_of(name, chunk.chunk)
        for request, meta in iter_spool(spool):
            if request is not None:
                rows.append((name, meta["key"], number_of(name, owner), owner,
                             position_identity(meta.get("position"))))
    restored = ledger.restore(rows)
    live = sum(1 for c in state.chunks.values() if c.pipeline == name)
    report.append(f"{name}: {restored} keys from the spool of {live} live chunks")
    if missing:
        report.append(f"{name}: no spool for chunks {', '.join(sorted(missing))} (their rows "
                      "are read again when the daemon drives them)")
    pipe_state = state.pipelines.get(name)
    last = pipe_state.last_sealed_seq if pipe_state else None
    if not last:
        return report
    try:
        count = await _reread(config, pipeline, ledger, last)
    except BatchdError as exc:
        report.append(f"{name}: WARNING: could not read the source again ({exc}); a key of a "
                      "retired chunk read again later will not be caught as a duplicate")
        return report
    report.append(f"{name}: {count} keys of retired chunks from reading the source again "
                  f"up to record {last}")
    return report


async def _reread(
    config: Config, pipeline: PipelineConfig, ledger: KeyLedger, last: int
) -> int:
    """Claim, for a pseudo chunk below every real one, the keys read before ``last``."""
    name = pipeline.name
    shaper = Shaper(pipeline)
    owner = f"{name}-{RETIRED_OWNER}"
    source = build_source(config, name, pipeline.source, until_drained=True)
    if not source.rereadable:
        raise BatchdError(f"a {pipeline.source.type} source is not read a second time")
    seq = restored = 0
    try:
        await source.start(None)
        while seq < last:
            records = await source.poll()
            if records is None:
                break
            if not records:
                await anyio.sleep(0.1)
                continue
            rows = []
            for record in records[: last - seq]:
                shaped = shape_record(shaper, pipeline.batching.max_bytes, record, seq)
                if shaped.request is not None:
                    rows.append((name, record.key, -1, owner,
                                 position_identity(record.position)))
            seq += len(records)
            restored += ledger.restore(rows)
    finally:
        await source.aclose()
    return restored
