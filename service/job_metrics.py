"""Job statistics for operators, exported from Redis at scrape time.

Workers count jobs as their state changes, in the same Lua step as the change
(``service.domain.job_store``): jobs finished by kind and outcome, failed jobs by reason,
running jobs, and queue-wait and run-time histograms. Every api replica exports the same
cluster-wide numbers, whichever worker ran the job, and they survive server restarts. Every
kind, outcome and known reason is there at zero before the first job. When Redis does not
answer, the families are still there, empty, and ``fitserve_job_metrics_up`` says 0.

The queues are read at scrape time too (``QueueCollector``): each Celery queue's length
(kombu keeps it as a Redis list), the workers consuming it (their heartbeat keys,
``heartbeat_key``, written by each worker's main process with a TTL) and the age of its
oldest waiting message's job.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import redis
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from service import errors
from service.config import Settings
from service.domain.evaluation_results import evaluation_samples
from service.domain.jobs import JOB_BUCKETS, PREFIX, STATS, JobKind, job_key
from service.domain.model_store import ModelStore
from service.metrics import EvaluationCollector
from service.taskqueue import CPU_QUEUE, TRAIN_QUEUE

log = logging.getLogger(__name__)
Family = CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily
QUEUES = (TRAIN_QUEUE, CPU_QUEUE)
OUTCOMES = ("SUCCEEDED", "FAILED", "CANCELLED")
WORKER_REASONS = (
    "INTERNAL",
    "WORKER_LOST",
    "TIME_LIMIT",
    "OUT_OF_MEMORY",
    "DISK_FULL",
    "PLUGIN_FAILED",
    "DATASET_UNAVAILABLE",
    "INVALID_INPUTS",
    "INVALID_LABELS",
    "MIXED_FLOAT16_NEEDS_GPU",
)
"""Failure reasons set on the worker (service.training) or by the reaper; with the
reasons of the domain errors (``reasons``) every reason a job can fail with."""
HEARTBEAT_PREFIX = f"{PREFIX}worker:"
_HISTOGRAMS = {
    "queue_wait": (
        "fitserve_job_queue_wait_seconds",
        "Time from Train/Evaluate to the job starting.",
    ),
    "run": ("fitserve_job_run_seconds", "Time from a job starting to it ending."),
}


def reasons() -> list[str]:
    """Every reason a job can fail with: the worker's and the reaper's, and the default
    reason of each domain error (its class name in capitals, ``failures.reason_of``)."""
    found = set(WORKER_REASONS)
    todo: list[type[errors.FitserveError]] = [errors.FitserveError]
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        if cls is not errors.FitserveError and cls.__module__ == errors.__name__:
            found.add(getattr(cls, "reason", "") or cls.__name__.upper())
    return sorted(found)


def heartbeat_key(queue: str, worker: str) -> str:
    """The key a worker consuming ``queue`` keeps alive (SET with a TTL)."""
    return f"{HEARTBEAT_PREFIX}{queue}:{worker}"


def register_store_collectors(
    registry: CollectorRegistry, settings: Settings
) -> Callable[[], None]:
    """Register the metrics read from the shared stores at scrape time (evaluations from the
    model store, job statistics and queues from Redis), the same on every api replica.
    Returns the function that closes the Redis connection they use."""
    store = ModelStore(settings.models_dir)
    registry.register(EvaluationCollector(lambda: evaluation_samples(store)))
    client = redis.Redis.from_url(
        settings.redis_url, decode_responses=True, socket_timeout=2, socket_connect_timeout=2
    )
    registry.register(JobStatsCollector(lambda: client.hgetall(STATS)))
    registry.register(QueueCollector(client))
    close: Callable[[], None] = client.close
    return close


class JobStatsCollector(Collector):
    """Reads the job statistics hash when Prometheus scrapes."""

    def __init__(self, read: Callable[[], Mapping[str, str]]) -> None:
        self._read = read
        self._reasons = reasons()

    def collect(self) -> Iterator[Family]:
        up = GaugeMetricFamily(
            "fitserve_job_metrics_up",
            "1 when this scrape read the job statistics from Redis; 0 when Redis did not "
            "answer (the job families are then empty, not zero).",
        )
        try:
            stats: Mapping[str, str] | None = dict(self._read())
        except Exception:  # a scrape must never fail because Redis is busy
            log.warning("could not read job statistics for /metrics", exc_info=True)
            stats = None
        up.add_metric([], 0.0 if stats is None else 1.0)
        yield up
        yield from families(stats, self._reasons)

    def describe(self) -> Iterator[Family]:
        """Names only, so registering does not read Redis."""
        yield GaugeMetricFamily("fitserve_job_metrics_up", "")
        yield from families(None, [])


def families(stats: Mapping[str, str] | None, reasons: Sequence[str] = ()) -> Iterator[Family]:
    """Prometheus families from the raw statistics hash, every kind, outcome and reason
    at zero unless counted; None (Redis did not answer): the families without samples."""
    finished = CounterMetricFamily(
        "fitserve_jobs_finished", "Jobs ended, by kind and outcome.", labels=["kind", "outcome"]
    )
    failed = CounterMetricFamily(
        "fitserve_jobs_failed",
        "Jobs that ended FAILED, by kind and reason (the job's error_reason).",
        labels=["kind", "reason"],
    )
    running = GaugeMetricFamily("fitserve_jobs_running", "Jobs running now.", labels=["kind"])
    if stats is None:
        yield from (finished, failed, running)
        for name, doc in _HISTOGRAMS.values():
            yield HistogramMetricFamily(name, doc, labels=["kind"])
        return
    kinds = [k.value for k in JobKind]
    counted: dict[tuple[str, ...], float] = {}
    for kind in kinds:
        counted |= {("finished", kind, o): 0.0 for o in OUTCOMES}
        counted |= {("failed", kind, r): 0.0 for r in reasons}
        counted[("running", kind)] = 0.0
    for key, raw in stats.items():
        parts = tuple(key.split(":"))
        if (parts[0] in ("finished", "failed") and len(parts) == 3) or (
            parts[0] == "running" and len(parts) == 2
        ):
            counted[parts] = float(raw)
    for parts, amount in sorted(counted.items()):
        family = {"finished": finished, "failed": failed}.get(parts[0], running)
        family.add_metric(list(parts[1:]), amount)
    yield from (finished, failed, running)
    for prefix, (name, doc) in _HISTOGRAMS.items():
        yield _histogram(stats, prefix, name, doc, kinds)


def _histogram(
    stats: Mapping[str, str], prefix: str, name: str, doc: str, kinds: Sequence[str]
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=["kind"])
    counts: dict[str, dict[str, float]] = {kind: {} for kind in kinds}
    for key, value in stats.items():
        parts = key.split(":")
        if parts[0] == prefix and len(parts) == 3:
            counts.setdefault(parts[1], {})[parts[2]] = float(value)
    for kind, by_le in sorted(counts.items()):
        buckets = [(str(float(le)), by_le.get(str(le), 0.0)) for le in JOB_BUCKETS]
        buckets.append(("+Inf", by_le.get("+Inf", 0.0)))
        total = float(stats.get(f"{prefix}_sum:{kind}", "0"))
        family.add_metric([kind], buckets, total)
    return family


class QueueCollector(Collector):
    """``fitserve_queue_length``, ``fitserve_queue_workers`` and
    ``fitserve_job_oldest_queued_seconds`` by queue, read from Redis at scrape time."""

    def __init__(self, client: redis.Redis, queues: Sequence[str] = QUEUES) -> None:
        self._client, self._queues = client, queues

    def collect(self) -> Iterator[GaugeMetricFamily]:
        length, workers, oldest = _queue_families()
        try:
            rows = [self._read(queue) for queue in self._queues]
        except Exception:  # fitserve_job_metrics_up says so; the scrape goes on
            log.warning("could not read the queues for /metrics", exc_info=True)
            rows = []
        for queue, (n, consumers, age) in zip(self._queues, rows, strict=False):
            length.add_metric([queue], n)
            workers.add_metric([queue], consumers)
            oldest.add_metric([queue], age)
        yield from (length, workers, oldest)

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield from _queue_families()

    def _read(self, queue: str) -> tuple[float, float, float]:
        """Messages waiting, live heartbeat keys, and the age (by Redis's clock) of the
        job of the oldest message (kombu LPUSHes, workers BRPOP: the right end); 0
        when nothing waits."""
        c: Any = self._client
        n = float(c.llen(queue))
        consumers = float(sum(1 for _ in c.scan_iter(heartbeat_key(queue, "*"), count=1000)))
        age = 0.0
        if n and (message := c.lindex(queue, -1)) is not None:
            queued = _queued_at(c, _task_id(message))
            if queued is not None:
                seconds, micros = c.time()
                age = max(0.0, seconds + micros / 1e6 - queued)
        return n, consumers, age


def _queue_families() -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
    return (
        GaugeMetricFamily(
            "fitserve_queue_length",
            "Jobs waiting in each Celery queue (messages in its Redis list).",
            labels=["queue"],
        ),
        GaugeMetricFamily(
            "fitserve_queue_workers",
            "Workers consuming each queue now (heartbeat keys that have not expired).",
            labels=["queue"],
        ),
        GaugeMetricFamily(
            "fitserve_job_oldest_queued_seconds",
            "How long the job of the oldest message in each queue has waited since it was "
            "queued (0: nothing waits).",
            labels=["queue"],
        ),
    )


def _task_id(message: str) -> str:
    try:
        task_id = json.loads(message)["headers"]["id"]
    except (ValueError, KeyError, TypeError):
        return ""
    return task_id if isinstance(task_id, str) else ""


def _queued_at(client: Any, job_id: str) -> float | None:
    """When the job was queued (last requeue, else creation); None when unknown."""
    if not job_id:
        return None
    queued, created = client.hmget(job_key(job_id), "queued_at", "created_at")
    for value in (queued, created):
        try:
            return float(value)
        except (TypeError, ValueError):
            continue
    return None
