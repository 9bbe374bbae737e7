"""Prometheus metrics: one ``Metrics`` object with its own registry, served on /metrics."""

from __future__ import annotations

import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

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
        self.predict_latency = Histogram(
            "fitserve_predict_duration_seconds",
            "Predict time from arrival to answer.",
            ["model", "version"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.predict_queue_wait = Histogram(
            "fitserve_predict_queue_wait_seconds",
            "Time a Predict request waited for its batch to start.",
            ["model", "version"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.predict_compute = Histogram(
            "fitserve_predict_compute_seconds",
            "Time one batch spent in the model.",
            ["model", "version"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "fitserve_predict_batch_size",
            "Requests per model call.",
            ["model", "version"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "fitserve_predict_queue_depth",
            "Predict requests waiting for a batch.",
            ["model", "version"],
            registry=r,
        )
        self.rejections = Counter(
            "fitserve_predict_rejections_total",
            "Predict requests refused before compute, by reason.",
            ["model", "version", "reason"],
            registry=r,
        )
        self.loaded_versions = Gauge(
            "fitserve_model_versions_loaded", "Model versions in memory.", ["model"], registry=r
        )
        self.model_load_seconds = Histogram(
            "fitserve_model_load_duration_seconds",
            "Time to load and warm up a model version.",
            ["model"],
            buckets=_JOB_BUCKETS,
            registry=r,
        )


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> tuple[WSGIServer, int]:
    """Serve ``/metrics`` over HTTP in a daemon thread; returns the server and its port."""
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server, server.server_port


def stop_metrics(server: WSGIServer) -> None:
    """Stop the /metrics server started by ``serve_metrics``."""
    threading.Thread(target=server.shutdown, daemon=True).start()
    server.server_close()
