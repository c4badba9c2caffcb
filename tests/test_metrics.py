"""Metrics: the series the dashboard needs, scraped over real HTTP and parsed as Prometheus does."""

from __future__ import annotations

import json
import re
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, cast

import pytest
from prometheus_client.parser import text_string_to_metric_families

from batchd.daemon.ops.cluster_metrics import MAX_WORKERS, ClusterCollector
from batchd.daemon.ops.cluster_watch import ClusterWatch, Seen
from batchd.daemon.ops.metrics import (
    BATCH_STATES,
    OUTCOMES,
    TOKEN_DIRECTIONS,
    Metrics,
    start_http_server,
)

EXPECTED_FAMILIES = {
    "batchd_batches": "gauge",
    "batchd_requests": "counter",
    "batchd_retries": "counter",
    "batchd_dead_letters": "counter",
    "batchd_results_rows": "counter",
    "batchd_poll_calls": "counter",
    "batchd_api_errors": "counter",
    "batchd_tokens": "counter",
    "batchd_cost_usd": "counter",
    "batchd_budget_usd": "gauge",
    "batchd_budget_exhausted": "gauge",
    "batchd_paused": "gauge",
    "batchd_manifest_bytes": "gauge",
    "batchd_ledger_bytes": "gauge",
    "batchd_oldest_in_flight_seconds": "gauge",
    "batchd_in_flight_requests": "gauge",
    "batchd_alarms": "counter",
}


DOCS = Path(__file__).resolve().parent.parent / "docs"
METRIC_NAME = re.compile(r"\b((?:batchd|process)_[a-z_]+)\b")


def _exported_sample_names() -> set[str]:
    metrics = Metrics()
    metrics.declare_pipeline("p", budget_usd=1)
    metrics.api_errors_total.labels(pipeline="p", type="api_error").inc()
    metrics.alarms_total.labels(pipeline="p", kind="reconciliation").inc()
    return {
        sample.name
        for family in text_string_to_metric_families(metrics.render())
        for sample in family.samples
    }


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        body: bytes = response.read()
    return body.decode()


class TestSeries:
    """The series exist with the right types and move as the engine drives them."""

    def test_every_documented_family_is_exported(self) -> None:
        """All sixteen batchd families are present with the documented type."""
        metrics = Metrics()
        metrics.declare_pipeline("p", budget_usd=5)
        metrics.manifest_bytes.set(1)
        metrics.ledger_bytes.set(1)
        metrics.api_errors_total.labels(pipeline="p", type="overloaded_error").inc()
        metrics.alarms_total.labels(pipeline="p", kind="source_lost").inc()
        families = {
            f.name: f.type
            for f in text_string_to_metric_families(metrics.render())
            if f.name.startswith("batchd_")
        }
        assert families == EXPECTED_FAMILIES

    def test_declare_pipeline_creates_zeroed_series(self) -> None:
        """Each outcome, direction and state exists at 0 before anything happens."""
        metrics = Metrics(process_metrics=False)
        metrics.declare_pipeline("orders", budget_usd=12.5)
        samples = _samples(metrics.render())
        for outcome in OUTCOMES:
            key = ("batchd_requests_total", (("outcome", outcome), ("pipeline", "orders")))
            assert samples[key] == 0
        for direction in TOKEN_DIRECTIONS:
            key = ("batchd_tokens_total", (("direction", direction), ("pipeline", "orders")))
            assert samples[key] == 0
        for state in BATCH_STATES:
            assert samples[("batchd_batches", (("pipeline", "orders"), ("state", state)))] == 0
        assert samples[("batchd_budget_usd", (("pipeline", "orders"),))] == 12.5

    def test_observe_usage_counts_tokens_and_cost(self) -> None:
        """An API usage block lands in the four token directions and the cost counter."""
        metrics = Metrics(process_metrics=False)
        usage = {
            "input_tokens": 100,
            "output_tokens": 40,
            "cache_creation_input_tokens": 7,
            "cache_read_input_tokens": 3,
            "service_tier": "batch",
        }
        metrics.observe_usage("p", usage, cost_usd=0.25)
        metrics.observe_usage("p", {"input_tokens": 1, "output_tokens": None}, cost_usd=0.5)
        samples = _samples(metrics.render())

        def tokens(direction: str) -> float:
            return samples[("batchd_tokens_total", (("direction", direction), ("pipeline", "p")))]

        assert [tokens(d) for d in TOKEN_DIRECTIONS] == [101, 40, 3, 7]
        assert samples[("batchd_cost_usd_total", (("pipeline", "p"),))] == 0.75

    def test_set_batch_states_zeroes_what_is_absent(self) -> None:
        """A state missing from the new counts drops to 0 instead of keeping its old value."""
        metrics = Metrics(process_metrics=False)
        metrics.set_batch_states("p", {"submitted": 4, "ended": 1})
        metrics.set_batch_states("p", {"ended": 5})
        samples = _samples(metrics.render())
        assert samples[("batchd_batches", (("pipeline", "p"), ("state", "submitted")))] == 0
        assert samples[("batchd_batches", (("pipeline", "p"), ("state", "ended")))] == 5

    def test_registries_are_independent(self) -> None:
        """Two Metrics objects in one process neither clash nor share values."""
        first, second = Metrics(), Metrics()
        first.results_rows_total.labels(pipeline="p").inc(3)
        second.results_rows_total.labels(pipeline="p").inc(1)
        assert _samples(first.render())[("batchd_results_rows_total", (("pipeline", "p"),))] == 3
        assert _samples(second.render())[("batchd_results_rows_total", (("pipeline", "p"),))] == 1

    def test_no_created_series(self) -> None:
        """Counters export no *_created timestamps that would double the scrape."""
        metrics = Metrics(process_metrics=False)
        metrics.declare_pipeline("p")
        assert "_created" not in metrics.render()

    def test_process_memory_is_exported(self) -> None:
        """Resident memory is scraped so flat memory can be watched on the dashboard."""
        samples = _samples(Metrics().render())
        assert samples[("process_resident_memory_bytes", ())] > 1_000_000


class TestHttpServer:
    """The endpoint over a real socket."""

    def test_scrape_matches_render(self) -> None:
        """A scrape over HTTP parses to the same samples render() gives."""
        metrics = Metrics(process_metrics=False)
        metrics.declare_pipeline("p")
        metrics.requests_total.labels(pipeline="p", outcome="succeeded").inc(42)
        metrics.in_flight_requests.labels(pipeline="p").set(1000)
        with start_http_server(metrics, port=0) as server:
            assert server.port > 0
            assert server.url == f"http://127.0.0.1:{server.port}/metrics"
            scraped = _samples(_scrape(server.url))
        assert scraped == _samples(metrics.render())
        assert scraped[
            ("batchd_requests_total", (("outcome", "succeeded"), ("pipeline", "p")))
        ] == 42

    def test_binds_localhost_only_by_default(self) -> None:
        """The default bind address is 127.0.0.1, not every interface."""
        with start_http_server(Metrics(process_metrics=False)) as server:
            assert server.host == "127.0.0.1"
            assert server._server.server_address[0] == "127.0.0.1"

    def test_close_releases_the_port(self) -> None:
        """After close() nothing listens on the port and it can be bound again."""
        server = start_http_server(Metrics(process_metrics=False), port=0)
        port = server.port
        _scrape(server.url)
        server.close()
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))

    def test_taken_port_is_an_error(self) -> None:
        """Starting on a port already in use raises OSError instead of serving nothing."""
        with start_http_server(Metrics(process_metrics=False), port=0) as server:
            with pytest.raises(OSError):
                start_http_server(Metrics(process_metrics=False), port=server.port)


class TestDocumentation:
    """The dashboard and the operator guide name only series that exist."""

    def test_dashboard_queries_use_exported_series(self) -> None:
        """Every metric in a Grafana query or variable is one Metrics exports."""
        dashboard = json.loads((DOCS / "grafana-dashboard.json").read_text())
        queries = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
        queries += [v["definition"] for v in dashboard["templating"]["list"]]
        used = {name for q in queries for name in METRIC_NAME.findall(q)}
        assert len(used) >= 15
        assert used <= _exported_sample_names(), used - _exported_sample_names()

    def test_dashboard_panels_have_unique_ids_and_datasource_input(self) -> None:
        """Grafana import needs unique panel ids and the DS_PROMETHEUS input."""
        dashboard = json.loads((DOCS / "grafana-dashboard.json").read_text())
        ids = [p["id"] for p in dashboard["panels"]]
        assert len(ids) == len(set(ids))
        assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]

    def test_operations_guide_names_exported_series(self) -> None:
        """Metric names in docs/operations.md (table and alert rules) all exist."""
        named = set(METRIC_NAME.findall((DOCS / "operations.md").read_text()))
        assert {"batchd_requests_total", "batchd_budget_exhausted"} <= named
        assert named <= _exported_sample_names(), named - _exported_sample_names()


class TestPaused:
    def test_pause_kind_is_a_label_and_clears_on_resume(self) -> None:
        """batchd_paused{kind} is 1 for the current pause only; 0 everywhere once resumed."""
        from batchd.daemon.ops.telemetry import Telemetry

        metrics = Metrics(process_metrics=False)
        metrics.declare_pipeline("p")
        telemetry = Telemetry(metrics, "p")
        telemetry.refresh([], 0, ("enforced_spend_limit_reached: …", "spend_limit"))
        samples = _samples(metrics.render())
        assert samples[("batchd_paused", (("kind", "spend_limit"), ("pipeline", "p")))] == 1
        telemetry.refresh([], 0, ("billing_error: …", "billing"))
        samples = _samples(metrics.render())
        assert samples[("batchd_paused", (("kind", "spend_limit"), ("pipeline", "p")))] == 0
        assert samples[("batchd_paused", (("kind", "billing"), ("pipeline", "p")))] == 1
        telemetry.refresh([], 0, (None, None))
        assert all(v == 0 for (name, _), v in _samples(metrics.render()).items()
                   if name == "batchd_paused")


def _worker(n: int, state: str, age: float) -> dict[str, Any]:
    return {"worker_id": f"h:{n}/w{n:03d}", "name": f"h:{n}", "host": "h", "pid": n,
            "state": state, "heartbeat_age": age, "lease_ttl": 30.0, "fenced": n % 3,
            "chunks": [{"pipeline": "p", "chunk": f"p-{n:06d}", "stage": "submitted",
                        "epoch": 1}] * (n % 4),
            "shards": [], "create_slots": []}


class TestClusterSeries:
    """The cluster collector on a canned overview (the real one: tests/test_cluster_view.py)."""

    def _render(self, seen: Seen) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        metrics = Metrics(process_metrics=False)
        watch = ClusterWatch(cast(Any, None), "h:1/w001", interval=5.0)
        watch.seen = seen
        metrics.registry.register(ClusterCollector(watch))
        return _samples(metrics.render())

    def test_bounded_by_worker_and_stopped_workers_only_counted(self) -> None:
        workers = [_worker(n, "alive", n / 10) for n in range(MAX_WORKERS + 6)]
        workers += [_worker(900, "stopped", 5.0), _worker(901, "dead", 99.0)]
        overview = {"workers": workers, "unowned_chunks": {"p": 2}, "limits": [
            {"scope": "queue:default", "cap": 1000, "reserved": 150, "spent": 0, "external": 0,
             "available": 850},
            {"scope": "budget:p", "cap": None, "reserved": 1.5, "spent": 2.25, "external": 0,
             "available": None}]}
        samples = self._render(Seen(overview, time.monotonic(), None, None, 1, 0))
        listed = {dict(labels)["worker"] for name, labels in samples
                  if name == "batchd_cluster_worker_heartbeat_age_seconds"}
        assert len(listed) == MAX_WORKERS
        assert "h:900/w900" not in listed  # stopped: counted only
        assert "h:70/w070" not in listed  # the least recently heard from drop out first
        assert samples[("batchd_cluster_workers", (("state", "stopped"),))] == 1
        assert samples[("batchd_cluster_workers", (("state", "alive"),))] == MAX_WORKERS + 6
        assert samples[("batchd_cluster_worker_state",
                        (("state", "alive"), ("worker", "h:3/w003")))] == 1
        assert samples[("batchd_cluster_worker_state",
                        (("state", "dead"), ("worker", "h:3/w003")))] == 0
        assert samples[("batchd_cluster_worker_chunks", (("worker", "h:3/w003"),))] == 3
        assert samples[("batchd_cluster_worker_fenced_total", (("worker", "h:5/w005"),))] == 2
        assert samples[("batchd_cluster_limit_spent", (("scope", "budget:p"),))] == 2.25
        assert ("batchd_cluster_limit_cap", (("scope", "budget:p"),)) not in samples  # no cap
        assert samples[("batchd_cluster_unowned_chunks", (("pipeline", "p"),))] == 2
        assert samples[("batchd_cluster_store_up", ())] == 1
        assert samples[("batchd_cluster_self", (("worker", "h:1/w001"),))] == 1
        documented = set(re.findall(r"\bbatchd_cluster_[a-z_]*[a-z]\b",
                                    (DOCS / "cluster.md").read_text()))
        exported = {name for name, _ in samples}
        assert len(documented) >= 10 and documented <= exported, documented - exported

    def test_before_any_read_and_while_reads_fail(self) -> None:
        samples = self._render(Seen())
        assert samples[("batchd_cluster_store_up", ())] == 0
        assert {name for name, _ in samples if name.startswith("batchd_cluster")} == {
            "batchd_cluster_store_up", "batchd_cluster_store_read_failures_total",
            "batchd_cluster_self"}
        failing = Seen({"workers": [_worker(1, "alive", 0.5)], "unowned_chunks": {},
                        "limits": []}, time.monotonic() - 30, "connection refused", time.time(),
                       4, 2)
        samples = self._render(failing)
        assert samples[("batchd_cluster_store_up", ())] == 0
        assert samples[("batchd_cluster_store_read_failures_total", ())] == 2
        assert samples[("batchd_cluster_view_age_seconds", ())] >= 30
        assert samples[("batchd_cluster_worker_state",
                        (("state", "alive"), ("worker", "h:1/w001")))] == 1  # the last view
