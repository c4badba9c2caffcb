"""
Prometheus metrics for batchd, served as text on a localhost port.

Each :class:`Metrics` owns its own ``CollectorRegistry`` instead of the process-global
one, so tests (and a future multi-daemon process) can hold several without "duplicated
timeseries" errors. Every series is labelled by ``pipeline``; PromQL sums across
pipelines, it cannot split a sum that was never labelled.

The metric objects are public attributes: the engine calls
``metrics.requests_total.labels(pipeline=p, outcome="succeeded").inc()`` directly. The
few helpers here exist where one event touches several series.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client import start_wsgi_server as _start_wsgi_server

__all__ = (
    "ALARM_KINDS",
    "BATCH_STATES",
    "NAMESPACE",
    "OUTCOMES",
    "TOKEN_DIRECTIONS",
    "Metrics",
    "MetricsServer",
    "start_http_server",
)

NAMESPACE = "batchd"

# A chunk's lifecycle stages as the manifest names them (batchd.daemon.wal.manifest_state.Stage),
# less "retired": retired chunks are history, not work.
BATCH_STATES = ("sealed", "intent", "submitted", "ended", "committed", "source_committed")
OUTCOMES = ("succeeded", "truncated", "dead_letter", "retried")
TOKEN_DIRECTIONS = ("input", "output", "cache_read", "cache_write")
# The alarm kinds docs/operations.md explains and the dashboard shows; the ``kind`` label
# is free-form, so a new kind needs only a new section in the guide.
ALARM_KINDS = (
    "billing_or_auth",
    "create_rejected",
    "reconciliation",
    "batch_not_found",
    "results_archived",
    "budget_exhausted",
    "source_lost",
    "dead_letter_ratio",
    "spend_limit",
    "organization_on_hold",
    "sink_failed",
    "spool_lost",
    "unknown_batches",
)

# usage field in an API result -> direction label
_USAGE_FIELDS = {
    "input_tokens": "input",
    "output_tokens": "output",
    "cache_read_input_tokens": "cache_read",
    "cache_creation_input_tokens": "cache_write",
}


class Metrics:
    """
    Every series batchd exports, in one private registry.

    Args:
        process_metrics: Also export ``process_*`` (resident memory, CPU, open fds) and
            ``python_info``; memory must stay flat, so the dashboard watches it.

    .. versionadded:: 0.1
    """

    def __init__(self, *, process_metrics: bool = True) -> None:
        # ``*_created`` series double every counter's output for a timestamp Prometheus
        # itself does not use; the switch is process-wide, and batchd owns its process.
        disable_created_metrics()
        self.registry = CollectorRegistry(auto_describe=True)
        if process_metrics:
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
        r, ns = self.registry, NAMESPACE
        p = ("pipeline",)

        self.batches = Gauge(
            "batches", "Batches (chunks) by lifecycle state.", (*p, "state"),
            namespace=ns, registry=r,
        )
        self.requests_total = Counter(
            "requests", "Requests finished, by outcome.", (*p, "outcome"),
            namespace=ns, registry=r,
        )
        self.retries_total = Counter(
            "retries", "Requests sent again in a retry chunk.", p, namespace=ns, registry=r
        )
        self.dead_letters_total = Counter(
            "dead_letters", "Requests written to the dead-letter sink.", p,
            namespace=ns, registry=r,
        )
        self.results_rows_total = Counter(
            "results_rows", "Result rows durably written to the sinks.", p,
            namespace=ns, registry=r,
        )
        self.poll_calls_total = Counter(
            "poll_calls", "Batch retrieve calls made while polling.", p, namespace=ns, registry=r
        )
        self.api_errors_total = Counter(
            "api_errors", "Errors from the Batches API, by error type.", (*p, "type"),
            namespace=ns, registry=r,
        )
        self.tokens_total = Counter(
            "tokens", "Tokens billed, by direction.", (*p, "direction"),
            namespace=ns, registry=r,
        )
        self.cost_usd_total = Counter(
            "cost_usd", "Spend in USD at batch prices.", p, namespace=ns, registry=r
        )
        self.budget_usd = Gauge(
            "budget_usd", "The pipeline's configured budget in USD.", p, namespace=ns, registry=r
        )
        self.budget_exhausted = Gauge(
            "budget_exhausted", "1 while new submits are stopped by the budget.", p,
            namespace=ns, registry=r,
        )
        self.paused = Gauge(
            "paused", "1 while the pipeline is paused, labelled with the pause kind "
            "(spend_limit, billing, authentication, permission, budget, create_rejected, …).",
            (*p, "kind"), namespace=ns, registry=r,
        )
        self.manifest_bytes = Gauge(
            "manifest_bytes", "Size of the write-ahead manifest on disk.",
            namespace=ns, registry=r,
        )
        self.ledger_bytes = Gauge(
            "ledger_bytes", "Size of the duplicate-key ledger (keys.sqlite) on disk.",
            namespace=ns, registry=r,
        )
        self.oldest_in_flight_seconds = Gauge(
            "oldest_in_flight_seconds", "Age of the oldest batch not yet ended.", p,
            namespace=ns, registry=r,
        )
        self.in_flight_requests = Gauge(
            "in_flight_requests", "Requests in batches submitted and not yet collected.", p,
            namespace=ns, registry=r,
        )
        self.alarms_total = Counter(
            "alarms", "Alarms raised, by kind (see docs/operations.md).", (*p, "kind"),
            namespace=ns, registry=r,
        )

    def declare_pipeline(self, pipeline: str, budget_usd: float | None = None) -> None:
        """
        Create a pipeline's series at zero so dashboards and ``rate()`` see them at once.

        A counter that first appears at 1 hides its first increment from ``increase()``.
        """
        for state in BATCH_STATES:
            self.batches.labels(pipeline=pipeline, state=state)
        for outcome in OUTCOMES:
            self.requests_total.labels(pipeline=pipeline, outcome=outcome)
        for direction in TOKEN_DIRECTIONS:
            self.tokens_total.labels(pipeline=pipeline, direction=direction)
        for counter in (
            self.retries_total,
            self.dead_letters_total,
            self.results_rows_total,
            self.poll_calls_total,
            self.cost_usd_total,
        ):
            counter.labels(pipeline=pipeline)
        self.in_flight_requests.labels(pipeline=pipeline)
        self.oldest_in_flight_seconds.labels(pipeline=pipeline)
        self.budget_exhausted.labels(pipeline=pipeline)
        self.paused.labels(pipeline=pipeline, kind="")  # kind="" (no label): not paused
        if budget_usd is not None:
            self.budget_usd.labels(pipeline=pipeline).set(budget_usd)

    def set_paused(self, pipeline: str, kind: str | None) -> None:
        """``paused{kind}`` is 1 for the current pause kind and 0 for every other seen."""
        for labels in list(self.paused._metrics):
            if labels[0] == pipeline:
                self.paused.labels(*labels).set(0)
        if kind is not None:
            self.paused.labels(pipeline=pipeline, kind=kind).set(1)

    def set_batch_states(self, pipeline: str, counts: Mapping[str, int]) -> None:
        """Set the ``batches`` gauge for every state; states missing from ``counts`` are 0."""
        for state in (*BATCH_STATES, *(s for s in counts if s not in BATCH_STATES)):
            self.batches.labels(pipeline=pipeline, state=state).set(counts.get(state, 0))

    def observe_usage(
        self, pipeline: str, usage: Mapping[str, object], cost_usd: float
    ) -> None:
        """Add one result's API ``usage`` block to the token counters and its cost."""
        for field, direction in _USAGE_FIELDS.items():
            value = usage.get(field)
            if isinstance(value, int) and value > 0:
                self.tokens_total.labels(pipeline=pipeline, direction=direction).inc(value)
        if cost_usd > 0:
            self.cost_usd_total.labels(pipeline=pipeline).inc(cost_usd)

    def render(self) -> str:
        """The Prometheus text exposition of every series, as a scrape would see it."""
        return generate_latest(self.registry).decode()


@dataclass
class MetricsServer:
    """A running metrics endpoint; close it (or use ``with``) to stop it."""

    host: str
    port: int
    _server: WSGIServer
    _thread: threading.Thread

    @property
    def url(self) -> str:
        """Where Prometheus scrapes: ``http://host:port/metrics``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving and release the port; returns once the thread has ended."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def start_http_server(metrics: Metrics, host: str = "127.0.0.1", port: int = 0) -> MetricsServer:
    """
    Serve ``metrics`` over HTTP from a daemon thread.

    Scrapes run in that thread, never on the event loop, so a slow scraper cannot delay
    a watchdog ping. Bind to localhost (the default); put a reverse proxy in front for
    remote scraping.

    Args:
        metrics: What to serve.
        host: Address to bind.
        port: Port to bind; 0 picks a free one, which the returned server reports.

    Raises:
        OSError: The port is taken or the address cannot be bound.

    .. versionadded:: 0.1
    """
    server, thread = _start_wsgi_server(port, addr=host, registry=metrics.registry)
    return MetricsServer(host=host, port=server.server_port, _server=server, _thread=thread)

