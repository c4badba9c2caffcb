"""
The cluster's workers and limits as Prometheus series, on every worker's ``/metrics``.

Each worker exports the whole cluster as it last read it (:class:`ClusterWatch`),
not only itself: a dead worker cannot export its own staleness, and any survivor's
endpoint then shows it. Across workers the series are the same figures scraped
from several instances; aggregate them with ``max by (worker)``, or use
``batchd_cluster_self`` to pick each worker's own row.

Cardinality stays bounded: stopped workers are counted in ``batchd_cluster_workers``
but get no series of their own, and at most :data:`MAX_WORKERS` live, silent or dead
workers are listed (the most recently heard from first; a restarted daemon is a new
worker id, and the old one drops out once it is purged or stopped). The series are
built at scrape time from the last read, so a worker that left drops out at once.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from batchd.daemon.cluster.overview import WORKER_STATES
from batchd.daemon.ops.cluster_watch import ClusterWatch
from batchd.daemon.ops.metrics import NAMESPACE

__all__ = ("MAX_WORKERS", "ClusterCollector")

MAX_WORKERS = 64
_LISTED_STATES = ("alive", "silent", "dead")
_LIMIT_FIELDS = {
    "cap": "The limit's cap (absent: counted, not capped).",
    "reserved": "Held by chunks in flight (requests for queue:, USD for budget:).",
    "spent": "Settled use (USD for budget: scopes).",
    "external": "Used outside this cluster, as last reconciled with the API.",
    "available": "Cap less reserved, spent and external.",
}


def _name(suffix: str) -> str:
    return f"{NAMESPACE}_cluster_{suffix}"


class ClusterCollector(Collector):
    """Yields the cluster's series from *watch*'s last read (see the module docstring)."""

    def __init__(self, watch: ClusterWatch) -> None:
        self.watch = watch

    def describe(self) -> list[Metric]:
        return []  # built at scrape time; no fixed description to check against

    def collect(self) -> Iterator[Metric]:
        seen = self.watch.seen
        up = GaugeMetricFamily(_name("store_up"), "1 if the last read of the cluster's "
                               "database succeeded, 0 while it fails (the rest is then stale).")
        up.add_metric([], 0.0 if seen.error is not None or seen.overview is None else 1.0)
        yield up
        failures = CounterMetricFamily(_name("store_read_failures"),
                                       "Failed reads of the cluster's overview.")
        failures.add_metric([], seen.failures)
        yield failures
        own = GaugeMetricFamily(_name("self"), "1, labelled with this process's worker id.",
                                labels=["worker"])
        own.add_metric([self.watch.worker_id], 1.0)
        yield own
        overview = seen.overview
        age = seen.age()
        if overview is None or age is None:
            return
        read_age = GaugeMetricFamily(_name("view_age_seconds"),
                                     "Seconds since the cluster's overview was last read.")
        read_age.add_metric([], age)
        yield read_age
        workers = overview["workers"]
        counts = GaugeMetricFamily(_name("workers"), "Registered workers by state.",
                                   labels=["state"])
        for state in WORKER_STATES:
            counts.add_metric([state], sum(1 for w in workers if w["state"] == state))
        yield counts
        listed = sorted((w for w in workers if w["state"] in _LISTED_STATES),
                        key=lambda w: w["heartbeat_age"])[:MAX_WORKERS]
        states = GaugeMetricFamily(
            _name("worker_state"), "1 for the worker's state (alive: heartbeat within its "
            "TTL; silent: past it; dead: past TTL + takeover_grace, its work may be taken).",
            labels=["worker", "state"])
        heartbeat = GaugeMetricFamily(_name("worker_heartbeat_age_seconds"),
                                      "Seconds since the worker's last heartbeat (DB clock).",
                                      labels=["worker"])
        ttl = GaugeMetricFamily(_name("worker_lease_ttl_seconds"), "The worker's lease TTL.",
                                labels=["worker"])
        chunks = GaugeMetricFamily(_name("worker_chunks"), "Live chunks the worker owns.",
                                   labels=["worker"])
        shards = GaugeMetricFamily(_name("worker_shards"), "Source shards the worker reads.",
                                   labels=["worker"])
        slots = GaugeMetricFamily(_name("worker_create_slots"),
                                  "Create slots the worker holds.", labels=["worker"])
        fenced = CounterMetricFamily(_name("worker_fenced"), "Records of the worker refused "
                                     "because it had lost the lease (fenced).",
                                     labels=["worker"])
        for w in listed:
            wid = w["worker_id"]
            for s in _LISTED_STATES:
                states.add_metric([wid, s], 1.0 if w["state"] == s else 0.0)
            heartbeat.add_metric([wid], w["heartbeat_age"])
            ttl.add_metric([wid], w["lease_ttl"])
            chunks.add_metric([wid], len(w["chunks"]))
            shards.add_metric([wid], len(w["shards"]))
            slots.add_metric([wid], len(w["create_slots"]))
            fenced.add_metric([wid], w["fenced"])
        yield from (states, heartbeat, ttl, chunks, shards, slots, fenced)
        unowned = GaugeMetricFamily(_name("unowned_chunks"),
                                    "Live chunks nobody owns (the next claim takes them).",
                                    labels=["pipeline"])
        for pipeline, n in overview["unowned_chunks"].items():
            unowned.add_metric([pipeline], n)
        yield unowned
        for field, text in _LIMIT_FIELDS.items():
            family = GaugeMetricFamily(_name(f"limit_{field}"), text, labels=["scope"])
            for c in overview["limits"]:
                if c[field] is not None:
                    family.add_metric([c["scope"]], float(c[field]))
            yield family
