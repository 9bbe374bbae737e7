"""Job statistics for operators, exported from Redis at scrape time.

Workers count jobs as their state changes, in the same Lua step as the change
(``service.domain.job_store``): jobs finished by kind and outcome, running jobs, and queue-wait
and run-time histograms. Every api replica exports the same cluster-wide numbers, whichever
worker ran the job, and they survive server restarts.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping

import redis
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from service.config import Settings
from service.domain.evaluation_results import evaluation_samples
from service.domain.jobs import JOB_BUCKETS, STATS
from service.domain.model_store import ModelStore
from service.metrics import EvaluationCollector

log = logging.getLogger(__name__)
_HISTOGRAMS = {
    "queue_wait": (
        "fitserve_job_queue_wait_seconds",
        "Time from Train/Evaluate to the job starting.",
    ),
    "run": ("fitserve_job_run_seconds", "Time from a job starting to it ending."),
}


def register_store_collectors(
    registry: CollectorRegistry, settings: Settings
) -> Callable[[], None]:
    """Register the metrics read from the shared stores at scrape time (evaluations from the
    model store, job statistics from Redis), the same on every api replica. Returns the
    function that closes the Redis connection they use."""
    store = ModelStore(settings.models_dir)
    registry.register(EvaluationCollector(lambda: evaluation_samples(store)))
    client = redis.Redis.from_url(settings.redis_url, decode_responses=True, socket_timeout=2)
    registry.register(JobStatsCollector(lambda: client.hgetall(STATS)))  # type: ignore[arg-type,return-value]
    return client.close


class JobStatsCollector(Collector):
    """Reads the job statistics hash when Prometheus scrapes."""

    def __init__(self, read: Callable[[], Mapping[str, str]]) -> None:
        self._read = read

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily]:
        try:
            stats = dict(self._read())
        except Exception:  # a scrape must never fail because Redis is busy
            log.warning("could not read job statistics for /metrics", exc_info=True)
            stats = {}
        yield from families(stats)

    def describe(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily]:
        """Names only, so registering does not read Redis."""
        yield from families({})


def families(
    stats: Mapping[str, str],
) -> Iterator[CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily]:
    """Prometheus families from the raw statistics hash."""
    finished = CounterMetricFamily(
        "fitserve_jobs_finished", "Jobs ended, by kind and outcome.", labels=["kind", "outcome"]
    )
    running = GaugeMetricFamily("fitserve_jobs_running", "Jobs running now.", labels=["kind"])
    for key, value in sorted(stats.items()):
        parts = key.split(":")
        if parts[0] == "finished":
            finished.add_metric(parts[1:3], float(value))
        elif parts[0] == "running":
            running.add_metric([parts[1]], float(value))
    yield finished
    yield running
    for prefix, (name, doc) in _HISTOGRAMS.items():
        yield _histogram(stats, prefix, name, doc)


def _histogram(stats: Mapping[str, str], prefix: str, name: str, doc: str) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=["kind"])
    counts: dict[str, dict[str, float]] = defaultdict(dict)
    for key, value in stats.items():
        parts = key.split(":")
        if parts[0] == prefix and len(parts) == 3:
            counts[parts[1]][parts[2]] = float(value)
    for kind, by_le in sorted(counts.items()):
        buckets = [(str(float(le)), by_le.get(str(le), 0.0)) for le in JOB_BUCKETS]
        buckets.append(("+Inf", by_le.get("+Inf", 0.0)))
        total = float(stats.get(f"{prefix}_sum:{kind}", "0"))
        family.add_metric([kind], buckets, total)
    return family
