"""Prometheus metrics: one ``Metrics`` object with its own registry, served on /metrics.

With ``fitserve serve --processes N``, every server process runs with
``PROMETHEUS_MULTIPROC_DIR`` set (prometheus_client then keeps each value in a per-process
file there) and the supervisor serves ``aggregate_registry`` of that folder: counters and
histograms are summed over processes, and each gauge says how in ``multiprocess_mode``.
A gauge set by a function is read at scrape time in its own process, which the aggregate
never reaches: with several processes the server samples queue depth and in-flight counts
into the files instead (``ServingModels.sample_gauges``, every second).
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

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
        self.rpc_requests = Counter(
            "fitserve_rpc_requests_total",
            "gRPC requests handled, by method and status code.",
            ["method", "code"],
            registry=r,
        )
        self.rpc_latency = Histogram(
            "fitserve_rpc_duration_seconds",
            "Time to answer a gRPC request, by method.",
            ["method"],
            buckets=_LATENCY_BUCKETS,
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
            "Predict time from arrival to answer.",
            mv,
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


def aggregate_registry(path: str) -> CollectorRegistry:
    """A registry reporting the metrics files every server process writes into ``path``."""
    registry = CollectorRegistry()
    registry.register(_ProcessFiles(path))
    return registry


class _ProcessFiles(Collector):
    """prometheus_client's MultiProcessCollector, minus files still empty: a process that
    is starting has created its file but not yet sized it, and reading that would fail
    the whole scrape."""

    def __init__(self, path: str) -> None:
        self._path = Path(path)

    def collect(self) -> Iterable[Metric]:
        from prometheus_client.multiprocess import MultiProcessCollector

        files = [str(f) for f in self._path.glob("*.db") if f.stat().st_size > 0]
        merged: Iterable[Metric] = MultiProcessCollector.merge(files, accumulate=True)  # type: ignore[no-untyped-call]
        return merged


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
