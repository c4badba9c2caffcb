"""
What one pipeline reports to Prometheus.

The engine calls these few methods at its state changes; gauges that
describe the whole state (batches by stage, in-flight requests, the oldest
batch's age) are refreshed from the manifest, the one source of truth,
rather than counted up and down where they could drift.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING

from batchd.daemon.batches.api import timestamp
from batchd.daemon.results.collector import CollectSummary
from batchd.daemon.wal.manifest_state import ChunkState, Stage

if TYPE_CHECKING:
    from batchd.daemon.ops.metrics import Metrics

__all__ = ("Telemetry",)


class Telemetry:
    """A pipeline's view of the shared :class:`~batchd.daemon.ops.metrics.Metrics` (or nothing)."""

    def __init__(self, metrics: Metrics | None, pipeline: str) -> None:
        self.metrics = metrics
        self.pipeline = pipeline

    def api_error(self, kind: object) -> None:
        if self.metrics is not None:
            self.metrics.api_errors_total.labels(pipeline=self.pipeline, type=str(kind)).inc()

    def alarm(self, kind: str) -> None:
        if self.metrics is not None:
            self.metrics.alarms_total.labels(pipeline=self.pipeline, kind=kind).inc()

    def poll_call(self) -> None:
        if self.metrics is not None:
            self.metrics.poll_calls_total.labels(pipeline=self.pipeline).inc()

    def budget(self, exhausted: bool) -> None:
        if self.metrics is not None:
            self.metrics.budget_exhausted.labels(pipeline=self.pipeline).set(int(exhausted))

    def committed(self, summary: CollectSummary) -> None:
        m = self.metrics
        if m is None:
            return
        name = self.pipeline
        for outcome, count in (
            ("succeeded", summary.succeeded),
            ("truncated", summary.truncated),
            ("dead_letter", summary.dead),
            ("retried", summary.retried),
        ):
            if count:
                m.requests_total.labels(pipeline=name, outcome=outcome).inc(count)
        if summary.retried:
            m.retries_total.labels(pipeline=name).inc(summary.retried)
        if summary.dead:
            m.dead_letters_total.labels(pipeline=name).inc(summary.dead)
        rows = summary.succeeded + summary.truncated
        if rows:
            m.results_rows_total.labels(pipeline=name).inc(rows)
        m.observe_usage(
            name,
            {"input_tokens": summary.input_tokens, "output_tokens": summary.output_tokens},
            summary.cost_usd,
        )

    def refresh(
        self,
        chunks: Iterable[ChunkState],
        manifest_bytes: int,
        pause: tuple[str | None, str | None] = (None, None),
        ledger_bytes: int | None = None,
    ) -> None:
        """Gauges from the manifest; ``pause`` is the pipeline's (reason, kind)."""
        m = self.metrics
        if m is None:
            return
        reason, kind = pause
        m.set_paused(self.pipeline, (kind or "unknown") if reason else None)
        chunks = list(chunks)
        m.set_batch_states(self.pipeline, Counter(c.stage.value for c in chunks))
        waiting = [c for c in chunks if c.stage in (Stage.SUBMITTED, Stage.ENDED)]
        m.in_flight_requests.labels(pipeline=self.pipeline).set(sum(c.requests for c in waiting))
        ages = []
        for chunk in waiting:
            try:
                ages.append(time.time() - timestamp(chunk.created_at))
            except (TypeError, ValueError):
                continue
        m.oldest_in_flight_seconds.labels(pipeline=self.pipeline).set(max(ages, default=0.0))
        m.manifest_bytes.set(manifest_bytes)
        if ledger_bytes is not None:
            m.ledger_bytes.set(ledger_bytes)
