"""Prometheus metrics: one ``Metrics`` object with its own registry, served on /metrics.

With ``fitserve serve --processes N``, every server process runs with
``PROMETHEUS_MULTIPROC_DIR`` set (prometheus_client then keeps each value in a per-process
file there) and the supervisor serves ``aggregate_registry`` of that folder: counters and
histograms are summed over processes, and each gauge says how in ``multiprocess_mode``.
A gauge set by a function is read at scrape time in its own process, which the aggregate
never reaches: with several processes the server samples queue depth and in-flight counts
into the files instead (``ServingModels.sample_gauges``, every second).

Conventions (docs/metrics.md lists every metric): no ``_created`` series
(``disable_created_metrics``, at import); label sets that can occur are created at zero
up front (``prepare_*``), so the first failure of a kind shows in ``increase()``; the
series of a model version are removed when it unloads (``forget_version``). Process,
platform and GC metrics (prometheus_client's collectors) and ``fitserve_build_info`` are
on every registry served: a process's own (``Metrics``), or, for the processes that
write files, the aggregating process's (``aggregate_registry``: ``process_*`` then carry a
``pid`` label, one series per process).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import platform
import re
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol
from wsgiref.simple_server import WSGIServer

import redis
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)
disable_created_metrics()  # type: ignore[no-untyped-call]  # a tenth of the output, and nothing reads them

RPC_CODES = (
    "OK",
    "CANCELLED",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
)
"""The codes a fitserve call can end with (fitserve never answers UNKNOWN, ABORTED or
OUT_OF_RANGE): every method's counter starts at zero for each."""
PREDICT_CODES = (
    "OK",
    "CANCELLED",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "UNAVAILABLE",
    "DATA_LOSS",
    "INTERNAL",
)
"""The codes a Predict on a resolved version can end with."""
PREDICT_METHODS = ("Predict", "tfserving.Predict")
REJECTION_REASONS = ("queue_full", "deadline", "unloading")
LOAD_RESULTS = ("OK", "DATA_LOSS", "FAILED_PRECONDITION", "UNAVAILABLE", "NOT_FOUND")
REDIS_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)

_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.2,
    0.5,
    1.0,
    2.0,
    5.0,
    10.0,
)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_JOB_BUCKETS = (0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 1800, 3600, 4 * 3600, 12 * 3600)


def multiprocess() -> bool:
    """Whether metrics go to per-process files for an aggregated /metrics."""
    return "PROMETHEUS_MULTIPROC_DIR" in os.environ


class _Gauge(Gauge):
    """A Gauge whose removed series read 0 in multiprocess mode.

    prometheus_client cannot delete a series from the per-process files, so without this
    an unloaded version would stay "loaded" on the aggregated /metrics.
    """

    def remove(self, *labelvalues: Any) -> None:
        if not multiprocess():
            super().remove(*labelvalues)
            return
        self.labels(*labelvalues).set(0)
        with warnings.catch_warnings():  # "removal not implemented in multi-process mode"
            warnings.simplefilter("ignore", UserWarning)
            super().remove(*labelvalues)


class Metrics:
    """Every metric fitserve exports. Labels are bounded: never job or request ids."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        if not multiprocess():  # else the aggregating process reports them (every pid)
            add_runtime_collectors(r)
        self.rpc_requests = Counter(
            "fitserve_rpc_requests_total",
            "gRPC calls ended, by method and status code: every outcome, calls the client "
            "cancelled (CANCELLED) and calls past their deadline (DEADLINE_EXCEEDED) included.",
            ["method", "code"],
            registry=r,
        )
        self.rpc_latency = Histogram(
            "fitserve_rpc_duration_seconds",
            "Time from a call reaching its handler to its end, by method and status code "
            "(failed and cancelled calls too).",
            ["method", "code"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.redis_up = Gauge(
            "fitserve_redis_up",
            "1 when this process's last Redis PING (a background probe) answered, else 0.",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.redis_ping = Histogram(
            "fitserve_redis_ping_seconds",
            "Round trip of the background probe's Redis PING (answered pings only).",
            buckets=REDIS_BUCKETS,
            registry=r,
        )
        self.jobs_submitted = Counter(
            "fitserve_jobs_submitted_total", "Jobs queued, by kind.", ["kind"], registry=r
        )
        self.datasets_uploaded_bytes = Counter(
            "fitserve_dataset_upload_bytes_total", "Bytes of datasets stored.", registry=r
        )
        self._add_inference_metrics(r)

    def _add_inference_metrics(self, r: CollectorRegistry) -> None:
        """Data-plane metrics, every one labelled by model and version."""
        mv = ["model", "version"]
        self.predict_requests = Counter(
            "fitserve_predict_requests_total",
            "Inference requests answered, by method (Predict, tfserving.Predict) and code.",
            [*mv, "method", "code"],
            registry=r,
        )
        self.predict_latency = Histogram(
            "fitserve_predict_duration_seconds",
            "Predict time from the version resolved to the answer, by code (failed and "
            "cancelled calls too).",
            [*mv, "code"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.predict_queue_wait = Histogram(
            "fitserve_predict_queue_wait_seconds",
            "Time a Predict request waited for its batch to start.",
            mv,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.predict_compute = Histogram(
            "fitserve_predict_compute_seconds",
            "Time one batch spent in the model.",
            mv,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "fitserve_predict_batch_size",
            "Rows per model call, before padding.",
            mv,
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.batch_requests = Histogram(
            "fitserve_predict_batch_requests",
            "Requests per model call.",
            mv,
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.queue_depth = _Gauge(
            "fitserve_predict_queue_depth",
            "Predict requests waiting for a batch.",
            mv,
            registry=r,
            multiprocess_mode="livesum",
        )
        self.in_flight = _Gauge(
            "fitserve_predict_in_flight",
            "Predict requests holding a version: queued or computing.",
            mv,
            registry=r,
            multiprocess_mode="livesum",
        )
        self.rejections = Counter(
            "fitserve_predict_rejections_total",
            "Predict requests refused before compute, by reason (queue_full, deadline, "
            "unloading; overloaded, with empty model and version: shed before parsing).",
            [*mv, "reason"],
            registry=r,
        )
        self.batch_timeout = _Gauge(
            "fitserve_predict_batch_timeout_seconds",
            "Batch timeout in force: fixed, or adapted to latency_target_ms.",
            mv,
            registry=r,
            multiprocess_mode="livemax",
        )
        self.loaded_versions = _Gauge(
            "fitserve_model_version_loaded",
            "1 while a model version is in memory and taking traffic (in any process).",
            mv,
            registry=r,
            multiprocess_mode="livemax",
        )
        self.model_loads = Counter(
            "fitserve_model_loads_total",
            "Attempts to load a model version, by result: OK, or the code its requests get "
            "(DATA_LOSS: unreadable files; FAILED_PRECONDITION: fails its warm-up; "
            "UNAVAILABLE: out of memory). A failure is remembered for "
            "FITSERVE_INFERENCE__LOAD_FAILURE_SECONDS, so retried requests load nothing.",
            [*mv, "result"],
            registry=r,
        )
        self.model_load_failures = Counter(
            "fitserve_model_load_failures_total",
            "Versions that failed to load, by reason: the code its requests get, as in "
            "fitserve_model_loads_total{result} (kept after the version is gone).",
            ["reason"],
            registry=r,
        )
        for reason in LOAD_RESULTS[1:]:
            self.model_load_failures.labels(reason)
        self.loaded_bytes = _Gauge(
            "fitserve_model_version_loaded_bytes",
            "Variable bytes of a loaded model version (summed over processes).",
            mv,
            registry=r,
            multiprocess_mode="livesum",
        )
        self.model_load_seconds = Histogram(
            "fitserve_model_load_duration_seconds",
            "Time to load and warm up a model version.",
            mv,
            buckets=_JOB_BUCKETS,
            registry=r,
        )
        self.grpc_queued_calls = Gauge(
            "fitserve_grpc_queued_calls",
            "Calls waiting in gRPC's own queue before a handler takes them (load shedding).",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.grpc_queue_wait = Gauge(
            "fitserve_grpc_queue_wait_seconds",
            "Estimated wait in gRPC's queue before a handler; Predict is shed past "
            "FITSERVE_INFERENCE__MAX_QUEUE_WAIT_MS.",
            registry=r,
            multiprocess_mode="livemax",
        )
        self._add_feedback_metrics(r)

    def _add_feedback_metrics(self, r: CollectorRegistry) -> None:
        """Live accuracy: correct / rows for classification, error / rows for regression,
        per output of the model (a multi-output model's feedback names its output)."""
        mv = ["model", "version", "output"]
        self.feedback_rows = Counter(
            "fitserve_feedback_rows_total", "Rows with a true label received.", mv, registry=r
        )
        self.feedback_correct = Counter(
            "fitserve_feedback_correct_total",
            "Rows whose predicted class matched the true label (classification).",
            mv,
            registry=r,
        )
        self.feedback_absolute_error = Counter(
            "fitserve_feedback_absolute_error_total",
            "Sum of |prediction - label| over rows (regression); divide by rows for MAE.",
            mv,
            registry=r,
        )

    # -- label sets: created at zero up front, removed with their version ---------------

    def prepare_rpc(self, method: str) -> None:
        """Create ``method``'s call counter at zero for every code it can end with."""
        for code in RPC_CODES:
            self.rpc_requests.labels(method, code)

    def prepare_version(self, model: str, version: int, outputs: Sequence[str] = ()) -> None:
        """Create the counters of a version being loaded at zero: Predict codes of both
        APIs, rejection reasons, load results and, per output, feedback."""
        labels = (model, str(version))
        for method in PREDICT_METHODS:
            for code in PREDICT_CODES:
                self.predict_requests.labels(*labels, method, code)
        for reason in REJECTION_REASONS:
            self.rejections.labels(*labels, reason)
        for result in LOAD_RESULTS:
            self.model_loads.labels(*labels, result)
        for output in outputs:
            for counter in (
                self.feedback_rows,
                self.feedback_correct,
                self.feedback_absolute_error,
            ):
                counter.labels(*labels, output)

    def forget_version(self, model: str, version: int) -> None:
        """Remove every series of a version that unloaded. Gauges read 0 instead with
        --processes (prometheus_client cannot delete from the files), and counters and
        histograms stay there: they are summed from files that only grow."""
        labels = {"model": model, "version": str(version)}
        for metric in self._version_metrics():
            if isinstance(metric, _Gauge):
                for key in [k for k in metric._metrics if tuple(k[:2]) == (model, str(version))]:
                    metric.remove(*key)
            elif not multiprocess():
                metric.remove_by_labels(labels)

    def _version_metrics(self) -> list[Counter | Gauge | Histogram]:
        return [
            self.predict_requests,
            self.predict_latency,
            self.predict_queue_wait,
            self.predict_compute,
            self.batch_size,
            self.batch_requests,
            self.queue_depth,
            self.in_flight,
            self.rejections,
            self.batch_timeout,
            self.loaded_versions,
            self.model_loads,
            self.loaded_bytes,
            self.model_load_seconds,
            self.feedback_rows,
            self.feedback_correct,
            self.feedback_absolute_error,
        ]


# -- training (worker children) -------------------------------------------------------

_STEP_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
TRAINING_KINDS = ("train", "fine_tune")


class TrainingMetrics:
    """What a worker child measures as it trains (files with PROMETHEUS_MULTIPROC_DIR,
    which its worker's main process serves aggregated: ``worker.metrics``)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry or CollectorRegistry()
        self.epoch_seconds = Histogram(
            "fitserve_training_epoch_duration_seconds",
            "Time of one training epoch (validation included), by kind: train, fine_tune.",
            ["kind"],
            buckets=_JOB_BUCKETS,
            registry=r,
        )
        for kind in TRAINING_KINDS:
            self.epoch_seconds.labels(kind)
        self.step_seconds = Histogram(
            "fitserve_training_step_duration_seconds",
            "Time of one training step: from a batch's start to the next one's (the last "
            "of an epoch to the epoch's end).",
            buckets=_STEP_BUCKETS,
            registry=r,
        )
        self.samples_per_second = Gauge(
            "fitserve_training_samples_per_second",
            "Training throughput of the last epoch this worker ran: its steps times "
            "fit.batch_size over its time (0 before the first).",
            registry=r,
            multiprocess_mode="livemostrecent",
        )
        self.samples_per_second.set(0)
        self.gpu_devices = Gauge(
            "fitserve_gpu_devices",
            "GPUs TensorFlow sees in this worker (0 on a CPU-only worker).",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.gpu_memory = Gauge(
            "fitserve_gpu_memory_used_bytes",
            "GPU memory TensorFlow holds now, by device (tf.config.experimental."
            "get_memory_info), sampled at every epoch end; only where a GPU is present.",
            ["device"],
            registry=r,
            multiprocess_mode="livesum",
        )


_training: TrainingMetrics | None = None


def training_metrics() -> TrainingMetrics:
    """This process's TrainingMetrics (made at first use, so in the worker child)."""
    global _training
    if _training is None:
        _training = TrainingMetrics()
    return _training


# -- process, runtime and build -----------------------------------------------------------


def add_runtime_collectors(registry: CollectorRegistry) -> None:
    """prometheus_client's process (CPU, RSS, fds, start time), platform and GC
    collectors, and fitserve_build_info, for this one process."""
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    registry.register(BuildInfo())


def _version_of(package: str) -> str:
    """An installed package's version, read without importing it (the api role must not
    import TensorFlow); "" when it is not installed."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return ""


class BuildInfo(Collector):
    """``fitserve_build_info{version,python,tensorflow,keras} 1``."""

    def __init__(self) -> None:
        self._values = [
            _version_of("fitserve-server"),
            platform.python_version(),
            _version_of("tensorflow") or _version_of("tensorflow-cpu"),
            _version_of("keras"),
        ]

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "fitserve_build_info",
            "Always 1; the labels say what runs: fitserve, Python, TensorFlow and Keras.",
            labels=["version", "python", "tensorflow", "keras"],
        )
        family.add_metric(self._values, 1.0)
        yield family


class ProcessTree(Collector):
    """process_* of several processes (the aggregating one and those writing files), each
    sample labelled with its ``pid``: prometheus_client's ProcessCollector reads one
    process's /proc, and a process writing metrics files cannot report its own."""

    def __init__(self, pids: Callable[[], Iterable[int]]) -> None:
        self._pids = pids

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        for pid in [os.getpid(), *self._pids()]:
            for family in ProcessCollector(pid=_constant(pid), registry=None).collect():
                into = merged.setdefault(
                    family.name, Metric(family.name, family.documentation, family.type)
                )
                for sample in family.samples:
                    labels = dict(sample.labels, pid=str(pid))
                    into.add_sample(sample.name, labels, sample.value)
        yield from merged.values()


def _constant(pid: int) -> Callable[[], int]:
    return lambda: pid


def children_of(pid: int | None = None) -> list[int]:
    """The pids of a process's live children (this process's by default)."""
    import psutil

    try:
        return [child.pid for child in psutil.Process(pid).children()]
    except psutil.Error:
        return []


# -- Redis health -------------------------------------------------------------------------

REDIS_PROBE_TIMEOUT = 2.0


class Settable(Protocol):
    """What RedisProbe sets: a Gauge, or a plain holder read by a collector."""

    def set(self, value: float) -> None: ...


class RedisProbe:
    """PINGs Redis from a daemon thread every ``period`` s: ``fitserve_redis_up`` 1 or 0,
    ``fitserve_redis_ping_seconds`` the answered round trips. A thread, so a busy event
    loop or a job in progress does not delay it."""

    def __init__(self, url: str, up: Settable, ping: Histogram, period: float) -> None:
        self._client = redis.Redis.from_url(
            url, socket_timeout=REDIS_PROBE_TIMEOUT, socket_connect_timeout=REDIS_PROBE_TIMEOUT
        )
        self._up, self._ping, self._period = up, ping, period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="redis-probe", daemon=True)

    def start(self) -> RedisProbe:
        self.probe()  # the first answer is there before the first scrape
        self._thread.start()
        return self

    def probe(self) -> bool:
        """One PING; whether it answered."""
        started = time.monotonic()
        try:
            self._client.ping()
        except Exception:  # every failure is "down": refused, timed out, auth, ...
            self._up.set(0)
            self._client.connection_pool.disconnect()
            return False
        self._ping.observe(time.monotonic() - started)
        self._up.set(1)
        return True

    def _run(self) -> None:
        while not self._stop.wait(self._period):  # a sampling period, not a condition
            self.probe()

    def close(self) -> None:
        """Stop the thread and close the connection (waits at most one PING)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(REDIS_PROBE_TIMEOUT * 2 + 1)
        with contextlib.suppress(Exception):
            self._client.close()


def start_redis_probe(metrics: Metrics, url: str, period: float) -> Callable[[], Any]:
    """Start a RedisProbe on ``metrics``; returns an async closer (for FitserveServer)."""
    import asyncio

    probe = RedisProbe(url, metrics.redis_up, metrics.redis_ping, period).start()

    async def close() -> None:
        await asyncio.to_thread(probe.close)

    return close


def aggregate_registry(
    path: str, pids: Callable[[], Iterable[int]] = children_of
) -> CollectorRegistry:
    """A registry reporting the metrics files the processes ``pids`` (by default this
    process's children) write into ``path``, and their process metrics and this one's."""
    registry = CollectorRegistry()
    registry.register(_ProcessFiles(path))
    registry.register(ProcessTree(pids))
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)  # this process's own
    registry.register(BuildInfo())
    return registry


class _ProcessFiles(Collector):
    """prometheus_client's MultiProcessCollector, minus files still empty (a process that
    is starting has created its file but not yet sized it, and reading that would fail
    the whole scrape) and minus the live gauges of processes that are gone (a worker
    child replaced or killed, whose ``jobs running`` must not stay)."""

    def __init__(self, path: str) -> None:
        self._path = Path(path)

    def collect(self) -> Iterable[Metric]:
        from prometheus_client.multiprocess import MultiProcessCollector

        files = [
            str(f)
            for f in self._path.glob("*.db")
            if f.stat().st_size > 0 and not _dead_live_gauge(f.name)
        ]
        merged: Iterable[Metric] = MultiProcessCollector.merge(files, accumulate=True)  # type: ignore[no-untyped-call]
        return merged


_LIVE_GAUGE = re.compile(r"gauge_live\w+_(\d+)\.db")


def _dead_live_gauge(name: str) -> bool:
    """Whether a metrics file is a live gauge's of a process that no longer runs."""
    if (match := _LIVE_GAUGE.fullmatch(name)) is None:
        return False
    try:
        os.kill(int(match.group(1)), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> tuple[WSGIServer, int]:
    """Serve ``/metrics`` over HTTP in a daemon thread; returns the server and its port."""
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server, server.server_port


def stop_metrics(server: WSGIServer) -> None:
    """Stop the /metrics server started by ``serve_metrics``."""
    threading.Thread(target=server.shutdown, daemon=True).start()
    server.server_close()


EvaluationRows = Callable[[], Iterable[tuple[str, int, str, str, float]]]
"""(model, version, dataset, metric, value) rows, read when Prometheus scrapes."""


class EvaluationCollector(Collector):
    """Exports ``fitserve_model_evaluation_metric`` from the model store at scrape time.

    Evaluations are written by workers into the versions' metadata, which every api
    replica can read, so a collector (instead of a gauge set by whichever process saw
    the job end) gives every replica the same, current answer, survives restarts, and
    drops series of deleted versions by itself.
    """

    def __init__(self, rows: EvaluationRows) -> None:
        self._rows = rows

    def collect(self) -> Iterator[GaugeMetricFamily]:
        gauge = _evaluation_family()
        try:
            rows = list(self._rows())
        except Exception:  # a scrape must never fail because the store is busy
            log.warning("could not read evaluations for /metrics", exc_info=True)
            rows = []
        for model, version, dataset, metric, value in rows:
            gauge.add_metric([model, str(version), dataset, metric], value)
        yield gauge

    def describe(self) -> Iterator[GaugeMetricFamily]:
        """Names only, so registering does not read the store."""
        yield _evaluation_family()


def _evaluation_family() -> GaugeMetricFamily:
    return GaugeMetricFamily(
        "fitserve_model_evaluation_metric",
        "Latest Evaluate result of a model version on a dataset, by metric.",
        labels=["model", "version", "dataset", "metric"],
    )
