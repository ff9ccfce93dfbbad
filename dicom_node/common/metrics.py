"""Prometheus metrics of one node: what it received, refused, processed and delivered.

Served on ``metrics_port`` (``GET /metrics``) when that key is set. Queue depths are read at
scrape time from the counts the node hands over (the database's ``status``), so they are right
after a restart too. No label ever carries
patient data: labels are outcomes, routes and destination names from the config.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

#: The counts behind the queue gauges: ``{"jobs": {state: n}, "sends": ..., "series": ...,
#: "cases": ..., "instances": n}`` (what :meth:`dicom_node.store.database.Database.status`
#: returns).
QueueCounts = Callable[[], Mapping[str, Any]]


class _QueueCollector(Collector):
    def __init__(self, counts: QueueCounts) -> None:
        self.counts = counts

    def collect(self) -> Iterator[GaugeMetricFamily]:
        status = self.counts()
        for table, help_text in (
            ("jobs", "Segmentation jobs by state"),
            ("sends", "Result deliveries by state"),
            ("series", "Series by assembly state"),
            ("cases", "Study-level cases by state"),
        ):
            family = GaugeMetricFamily(f"dicom_node_{table}", help_text, labels=["state"])
            for state, n in sorted(status[table].items()):
                family.add_metric([state], n)
            yield family
        indexed = GaugeMetricFamily("dicom_node_instances_indexed", "Instances in the spool")
        indexed.add_metric([], status["instances"])
        yield indexed


class NodeMetrics:
    """The node's counters, in a registry of its own (several nodes may share a process).

    ``queue_counts``, when given, is called at each scrape for the queue gauges.
    """

    def __init__(self, queue_counts: QueueCounts | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.associations = Counter(
            "dicom_node_associations", "Associations by outcome", ["outcome"], registry=r
        )
        self.instances_received = Counter(
            "dicom_node_instances_received", "Instances stored and answered Success", registry=r
        )
        self.instances_refused = Counter(
            "dicom_node_instances_refused",
            "C-STOREs answered with a failure",
            ["status"],
            registry=r,
        )
        self.receive_step_seconds = Histogram(
            "dicom_node_receive_step_seconds",
            "Time of each step of the C-STORE handler (RECEIVE_STEPS), per received instance",
            ["step"],
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 2),
            registry=r,
        )
        self.jobs = Counter(
            "dicom_node_jobs", "Finished job attempts", ["route", "outcome"], registry=r
        )
        self.job_seconds = Histogram(
            "dicom_node_job_seconds",
            "Time to segment a series and write SEG + SR",
            ["route"],
            buckets=(0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300),
            registry=r,
        )
        self.sends = Counter(
            "dicom_node_sends",
            "C-STORE attempts of results",
            ["destination", "outcome"],
            registry=r,
        )
        if queue_counts is not None:
            r.register(_QueueCollector(queue_counts))

    def serve(self, port: int, address: str = "0.0.0.0") -> Any:
        """Serve ``/metrics`` on ``port`` in a background thread."""
        return start_http_server(port, addr=address, registry=self.registry)
