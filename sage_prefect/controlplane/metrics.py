"""Prometheus metrics of the control plane (one registry per process, served at ``/metrics``)."""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ["model", "slo_class"]
        self.queue_depth = Gauge(
            "sage_queue_depth", "Requests waiting in the scheduler", labels, registry=self.registry
        )
        self.batch_size = Histogram(
            "sage_embedding_batch_size",
            "Inputs per coalesced embedding batch",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.ttft = Histogram(
            "sage_time_to_first_token_seconds",
            "Time to first token",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.tpot = Histogram(
            "sage_time_per_output_token_seconds",
            "Time between output tokens",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.e2e = Histogram(
            "sage_e2e_request_latency_seconds",
            "End-to-end request latency",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.rejections = Counter(
            "sage_rejected_requests",
            "Requests answered with an error by admission control or failover",
            [*labels, "reason"],
            registry=self.registry,
        )
        self.replica_failures = Counter(
            "sage_replica_failures",
            "Requests or batches that failed on a replica (retried elsewhere when possible)",
            ["replica"],
            registry=self.registry,
        )
        self.replica_up = Gauge(
            "sage_replica_up",
            "1 while a replica is healthy, 0 while it is taken out",
            ["replica"],
            registry=self.registry,
        )
        self.cancelled = Counter(
            "sage_cancelled_requests",
            "Requests whose client went away: 'queued' ones were dropped before any compute, "
            "'running' ones stopped (an LLM sequence frees its slot; an embedding batch finishes)",
            [*labels, "stage"],
            registry=self.registry,
        )
        self.requests = Counter(
            "sage_requests", "Requests received", ["model", "slo_class", "endpoint"], registry=self.registry
        )
        self.scale_events = Counter(
            "sage_scale_events",
            "Replicas of placed models asked for ('up'), stopped ('down') or given up ('start_failed')",
            ["model", "direction"],
            registry=self.registry,
        )

    def observe_batch(self, model: str, size: int) -> None:
        self.batch_size.labels(model).observe(size)

    def observe_ttft(self, model: str, slo: str, seconds: float) -> None:
        self.ttft.labels(model, slo).observe(seconds)

    def observe_tpot(self, model: str, slo: str, seconds: float) -> None:
        self.tpot.labels(model, slo).observe(seconds)

    def observe_e2e(self, model: str, slo: str, seconds: float) -> None:
        self.e2e.labels(model, slo).observe(seconds)

    def rejected(self, model: str, slo: str, reason: str) -> None:
        self.rejections.labels(model, slo, reason).inc()

    def replica_failed(self, replica: str) -> None:
        self.replica_failures.labels(replica).inc()

    def watch(self, scheduler: Any) -> None:
        """Queue depths and replica health are read from ``scheduler`` when ``/metrics`` is
        scraped (on the event loop, like every scheduler call), not recomputed on every event."""
        for model in {r.model for r in scheduler.replicas.values()}:
            for slo in scheduler.classes:
                self.queue_depth.labels(model, slo).set_function(partial(scheduler.queue_depth, model, slo))
        for replica in scheduler.replicas.values():
            self.watch_replica(replica)

    def watch_replica(self, replica: Any) -> None:
        """Report a replica added after start-up (a placed model's, scaled up)."""
        self.replica_up.labels(replica.id).set_function(partial(_healthy, replica))

    def watch_placements(self, supervisor: Any, scheduler: Any) -> None:
        """Placed replicas, read at scrape time: ``sage_replica_state{replica, model, worker, state}``
        (1 for the state it is in), ``sage_replica_restarts{replica, model}`` and
        ``sage_replicas{model, state}`` (serving, starting, draining: the scheduler's view)."""
        self.registry.register(_PlacementCollector(supervisor, scheduler))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _PlacementCollector(Collector):
    def __init__(self, supervisor: Any, scheduler: Any) -> None:
        self.supervisor = supervisor
        self.scheduler = scheduler

    def collect(self) -> Iterator[Metric]:
        state = GaugeMetricFamily(
            "sage_replica_state",
            "Placed replicas: 1 for the state each is in, with the Dask worker it runs on",
            labels=["replica", "model", "worker", "state"],
        )
        restarts = CounterMetricFamily(
            "sage_replica_restarts",
            "Times a placed replica was started again (its process or worker died)",
            labels=["replica", "model"],
        )
        for rid, info in list(self.supervisor.replicas.items()):
            state.add_metric([rid, info.model.name, info.worker_name or "", info.state], 1.0)
            restarts.add_metric([rid, info.model.name], float(info.restarts))
        replicas = GaugeMetricFamily(
            "sage_replicas", "Replicas of a placed model by scaling state", labels=["model", "state"]
        )
        for model in {m.name for m in (i.model for i in self.supervisor.replicas.values())} | set(
            self.scheduler.scaled_models()
        ):
            view = self.scheduler.scaling_state(model)
            for key in ("ready", "starting", "draining"):
                replicas.add_metric([model, key], float(view.get(key, 0)))
        yield state
        yield restarts
        yield replicas


def _healthy(replica: Any) -> float:
    return 1.0 if replica.healthy else 0.0


def sample_sum(text: str, name: str, **labels: str) -> float | None:
    """Sum of the samples called ``name`` (``x_total``, ``x_count``, ``x_bucket``...) whose labels
    include ``labels``, in a Prometheus text page; None when there is none. Reads this gateway's
    ``/metrics`` and an upstream's (vLLM's ``vllm:num_requests_waiting``)."""
    values = [
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    ]
    return sum(values) if values else None
