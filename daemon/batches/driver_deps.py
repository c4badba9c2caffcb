"""
Everything a chunk driver reads: one pipeline's resources, passed explicitly.

A frozen dataclass rather than the runner itself, so that a driver (and the
spool rebuild it may call) depends on exactly these and can be built in a test
against the in-process emulator; what it may *change* goes through
:class:`~batchd.daemon.batches.control.RunnerControl`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio

from batchd.daemon.batches.api import BatchesApi
from batchd.daemon.batches.poller import Poller
from batchd.daemon.batches.queue_limit import QueueLimit
from batchd.daemon.batches.reconcile import Reconciler
from batchd.daemon.config import ApiConfig, PipelineConfig
from batchd.daemon.intake.ledger import KeyLedger
from batchd.daemon.intake.shaper import ModelCheck
from batchd.daemon.ops.telemetry import Telemetry
from batchd.daemon.results.answers import AnswerReader
from batchd.daemon.results.collector import Collector, CostFn
from batchd.daemon.store.contract import StateStore
from batchd.daemon.wal.manifest import Manifest
from batchd.plugins.contract import Sink, Source

__all__ = ("DriverDeps",)


@dataclass(frozen=True, eq=False)
class DriverDeps:
    """One pipeline's shared resources, as its chunk drivers see them."""

    pipeline: PipelineConfig
    manifest: Manifest
    api: BatchesApi
    api_config: ApiConfig
    ledger: KeyLedger
    spool_dir: Path
    create_lock: anyio.Lock  # one create at a time per API key (ambiguous creates are settled)
    source: Source
    sinks: Sequence[Sink]
    dead_letter: Sink
    cost: CostFn
    telemetry: Telemetry
    poller: Poller
    make_source: Callable[[], Source] | None = None  # a fresh reader, to re-read a lost spool
    queue: QueueLimit | None = None
    answers: AnswerReader | None = None
    model_check: ModelCheck | None = None
    reconciler: Reconciler | None = None
    # Where records go (leases, fencing): LocalStore over ``manifest`` and ``ledger``
    # unless given. Reads stay on ``manifest.state``, which LocalStore's appends update.
    store: StateStore = None  # type: ignore[assignment]  # set in __post_init__
    # Cluster mode: the API workspace whose create slot serialises creates cluster-wide,
    # and the queue scope reserved with each intent. None: one daemon, the create lock.
    workspace: str | None = None
    queue_scope: str | None = None

    def __post_init__(self) -> None:
        if self.store is None:
            from batchd.daemon.store.local import LocalStore

            object.__setattr__(self, "store", LocalStore.over(self.manifest, self.ledger))

    def spool_path(self, chunk: str) -> Path:
        return self.spool_dir / f"{chunk}.jsonl"

    def collector(self) -> Collector:
        """A collector for one attempt (a new one each time, so a replay starts clean)."""
        return Collector(self.pipeline, self.sinks, self.dead_letter, self.cost, self.answers)
