"""
The running daemon's view of its own progress, for the dashboard and the terminal.

It is the same dict ``batchd status --json`` prints (:func:`batchd.daemon.ops.status.status_of`),
built from the manifest's in-memory state on the event loop instead of a replay of
the file, plus each source's size, measured in the background: every couple of
seconds where that is cheap (a file's stat), every half minute where it costs a
round trip (a table estimate, a topic's offsets).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import anyio

from batchd.daemon.ops.progress import SIZE_TIMEOUT, MeasuredSize, MonotonicFraction
from batchd.daemon.ops.status import status_of

if TYPE_CHECKING:
    from batchd.daemon.config import Config
    from batchd.daemon.pipeline import PipelineRunner
    from batchd.daemon.store.mirror import MirroredStore
    from batchd.daemon.wal.manifest import Manifest

__all__ = ("LiveStatus",)

_CHEAP = 0.05  # seconds: a measurement faster than this is repeated every _OFTEN
_OFTEN = 2.0
_SELDOM = 30.0


class LiveStatus:
    """Sizes measured in the background and status snapshots; used on the event loop only."""

    def __init__(self) -> None:
        self.sizes: dict[str, MeasuredSize | None] = {}
        self._due: dict[str, float] = {}
        self._shown: dict[str, MonotonicFraction] = {}

    async def measure_forever(self, runners: Callable[[], Sequence[PipelineRunner]]) -> None:
        """Keep every pipeline's source size fresh (a task of the daemon's lifetime)."""
        while True:
            for runner in list(runners()):
                name = runner.pipeline.name
                if time.monotonic() < self._due.get(name, 0.0):
                    continue
                state = runner.manifest.state.pipelines.get(name)
                rows = (state.last_sealed_seq or 0) if state else 0
                position = state.last_sealed_position if state else None
                began = time.monotonic()
                size = None
                try:
                    with anyio.move_on_after(SIZE_TIMEOUT):
                        size = await runner.source.size(position)
                except Exception:
                    size = None
                took = time.monotonic() - began
                self.sizes[name] = None if size is None else MeasuredSize(size, rows)
                self._due[name] = time.monotonic() + (_OFTEN if took < _CHEAP else _SELDOM)
            await anyio.sleep(1.0)

    def snapshot(self, config: Config, manifest: Manifest | MirroredStore,
                 cluster: dict[str, Any] | None = None) -> dict[str, Any]:
        """
        ``status --json`` as of now, from memory (call on the event loop).

        In cluster mode *manifest* is the worker's view of the shared store (every
        worker's chunks, not the empty local manifest) and *cluster* the overview of
        its workers last read (:class:`~batchd.daemon.ops.cluster_watch.ClusterWatch`).
        """
        return status_of(config, manifest.state, self.sizes, cluster=cluster)

    def shown_fraction(self, pipeline: str, fraction: float) -> float:
        """The fraction a live display shows: never lower than the last one shown."""
        return self._shown.setdefault(pipeline, MonotonicFraction()).update(fraction)
