"""A worker's /metrics: its main process serves them for itself and its prefork children.

The standard for prefork servers: prometheus_client's multiprocess mode. As the worker
starts (``celeryd_init``, in the main process, before the pool forks) it makes a folder of
its own and sets PROMETHEUS_MULTIPROC_DIR, so every metric a child makes (training times,
GPUs: ``service.metrics.TrainingMetrics``) is a file there. Once the pool runs
(``worker_ready``) the main process serves, on FITSERVE_WORKER_METRICS_PORT, those files
aggregated, every process's ``process_*`` (a ``pid`` label each), and what only it knows:
``fitserve_worker_up``, ``fitserve_worker_jobs_running``, GPU utilisation (NVML). It also
PINGs Redis (``fitserve_redis_up``) and keeps a heartbeat key per queue alive in Redis,
which the api counts as ``fitserve_queue_workers``, and an alive key of its process, by
which the api's reaper knows the worker that received a job still runs (the heartbeat
starts even when /metrics cannot bind its port). On shutdown it deletes its keys and
the folder.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIServer

import redis
from celery.signals import celeryd_init, worker_process_init, worker_ready, worker_shutdown
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from service.config import Settings
from service.domain.jobs import alive_key, worker_process
from service.job_metrics import heartbeat_key

log = logging.getLogger(__name__)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


class WorkerMetrics:
    """The worker main process's side: the folder, /metrics, the heartbeat, the probe."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.folder: Path | None = None
        self.http: WSGIServer | None = None
        self.port = 0
        self.hostname = ""
        self.queues: list[str] = []
        self._stop = threading.Event()
        self._beat_failing = False
        self._heartbeat: threading.Thread | None = None
        self.redis_up = _LastValue()
        self._redis: redis.Redis | None = None
        self._probe: Any = None

    def install(self) -> None:
        celeryd_init.connect(self._on_init, weak=False)
        worker_ready.connect(self._on_ready, weak=False)
        worker_shutdown.connect(self._on_shutdown, weak=False)
        worker_process_init.connect(_on_child_start, weak=False)

    # -- main process ----------------------------------------------------------------

    def _on_init(self, **_: Any) -> None:
        """Before the pool forks: metrics made from now on are files in our folder."""
        self.folder = Path(tempfile.mkdtemp(prefix="fitserve-worker-metrics-"))
        os.environ[MULTIPROC_ENV] = str(self.folder)
        from prometheus_client import values

        values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]  # else chosen at import

    def _on_ready(self, sender: Any = None, **_: Any) -> None:
        """The pool runs: serve /metrics, start the heartbeat and the Redis probe."""
        try:
            self.hostname = str(sender.hostname)
            self.queues = sorted(sender.app.amqp.queues.consume_from)
            self._start()
        except Exception:  # metrics must never stop a worker from training
            log.exception("worker /metrics could not start")

    def _start(self) -> None:
        from prometheus_client import Histogram

        from service.metrics import (
            REDIS_BUCKETS,
            RedisProbe,
            aggregate_registry,
            serve_metrics,
        )

        s = self.settings
        assert self.folder is not None
        # The heartbeat first, whatever happens to /metrics: the api counts workers by it,
        # and its reaper tells by it whether the worker that received a job still runs.
        self._start_heartbeat()
        registry = aggregate_registry(str(self.folder))
        registry.register(_WorkerCollector(self))
        # Not a multiprocess Gauge: a pool child forked after this point (one replacing a
        # killed or recycled child) resets every inherited value to 0 in a file of its own,
        # and "livemin" would then read Redis as down. The main process alone probes, so
        # the collector reports its last answer.
        up = self.redis_up
        ping = Histogram(
            "fitserve_redis_ping_seconds",
            "Round trip of the background probe's Redis PING.",
            buckets=REDIS_BUCKETS,
            registry=None,
        )
        self._probe = RedisProbe(s.redis_url, up, ping, s.redis_probe_seconds).start()
        try:
            self.http, self.port = serve_metrics(
                registry, s.worker_metrics_host, s.worker_metrics_port
            )
        except OSError as exc:
            print(
                f"fitserve worker: /metrics cannot bind {s.worker_metrics_host}:"
                f"{s.worker_metrics_port} ({exc}); set FITSERVE_WORKER_METRICS_PORT to a free "
                "port (0 picks one); the worker runs on without /metrics (its heartbeat "
                "goes on)",
                file=sys.stderr,
                flush=True,
            )
            raise
        if s.worker_ready_file is not None:
            from service.launch.ready import write_ready

            write_ready(s.worker_ready_file, self.port, self.port)
        # logged, not printed: Celery logs a worker's stdout at WARNING
        log.info(
            "fitserve worker %s: metrics on http://%s:%s/metrics (queues %s)",
            self.hostname,
            s.worker_metrics_host,
            self.port,
            ",".join(self.queues),
        )

    def _start_heartbeat(self) -> None:
        """Write the heartbeat keys now and renew them from a thread."""
        s = self.settings
        self._redis = redis.Redis.from_url(
            s.redis_url, socket_timeout=5, socket_connect_timeout=5, decode_responses=True
        )
        self._beat()
        self._heartbeat = threading.Thread(target=self._beating, name="heartbeat", daemon=True)
        self._heartbeat.start()
        log.info(
            "worker heartbeat every %g s (keys live %g s), as %s",
            s.worker_heartbeat_seconds,
            s.heartbeat_ttl_seconds,
            self.process,
        )

    def _beat(self) -> None:
        """Renew this worker's heartbeat key of each queue, and its process's alive key
        (``heartbeat_ttl_seconds`` to live)."""
        assert self._redis is not None
        ttl_ms = max(1, round(self.settings.heartbeat_ttl_seconds * 1000))
        try:
            with self._redis.pipeline(transaction=False) as pipe:
                for queue in self.queues:
                    pipe.set(heartbeat_key(queue, self.hostname), os.getpid(), px=ttl_ms)
                pipe.set(alive_key(self.process), ",".join(self.queues), px=ttl_ms)
                pipe.execute()
            if self._beat_failing:
                log.info("worker heartbeat written again")
            self._beat_failing = False
        except redis.RedisError as exc:
            if not self._beat_failing:
                log.warning("worker heartbeat not written (%s); retried shortly", exc)
            self._beat_failing = True

    def _beating(self) -> None:
        while not self._stop.wait(self.settings.worker_heartbeat_seconds):  # a period
            self._beat()

    @property
    def process(self) -> str:
        """This worker main process (hostname/pid), as the jobs it receives name it."""
        return worker_process(self.hostname, os.getpid())

    def _on_shutdown(self, **_: Any) -> None:
        """Delete the heartbeat keys (the queue has one worker less at once), stop serving
        and remove the folder."""
        self._stop.set()
        if self._redis is not None:
            with contextlib.suppress(redis.RedisError):
                keys = [heartbeat_key(q, self.hostname) for q in self.queues]
                self._redis.delete(*keys, alive_key(self.process))
            self._redis.close()
        if self._probe is not None:
            self._probe.close()
        if self.http is not None:
            from service.metrics import stop_metrics

            stop_metrics(self.http)
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)

    def jobs_running(self) -> int:
        """Tasks the pool runs now (Celery's own book of active requests)."""
        from celery.worker import state

        return len(state.active_requests)


class _LastValue:
    """The probe's last answer, kept in this process's memory only."""

    def __init__(self) -> None:
        self.value: float | None = None

    def set(self, value: float) -> None:
        self.value = float(value)


class _WorkerCollector(Collector):
    """What only the main process knows, read at scrape time."""

    def __init__(self, worker: WorkerMetrics) -> None:
        self._worker = worker

    def collect(self) -> Iterator[GaugeMetricFamily]:
        w = self._worker
        up = GaugeMetricFamily(
            "fitserve_worker_up",
            "1 for each queue this worker consumes (worker: its Celery hostname).",
            labels=["worker", "queue"],
        )
        for queue in w.queues:
            up.add_metric([w.hostname, queue], 1.0)
        yield up
        running = GaugeMetricFamily(
            "fitserve_worker_jobs_running",
            "Jobs this worker's pool runs now.",
            labels=["worker"],
        )
        running.add_metric([w.hostname], float(w.jobs_running()))
        yield running
        if w.redis_up.value is not None:
            redis_up = GaugeMetricFamily(
                "fitserve_redis_up", "1 when this worker's last Redis PING answered, else 0."
            )
            redis_up.add_metric([], w.redis_up.value)
            yield redis_up
        yield from _gpu_utilization()


def _gpu_utilization() -> Iterator[GaugeMetricFamily]:
    """fitserve_gpu_utilization_ratio by NVML device index, only where pynvml imports and
    finds GPUs; absent otherwise (fitserve_gpu_devices 0 says there are none)."""
    try:
        import pynvml  # type: ignore[import-not-found]

        pynvml.nvmlInit()
    except Exception:  # not installed, no driver: no GPU utilisation to report
        return
    family = GaugeMetricFamily(
        "fitserve_gpu_utilization_ratio",
        "Share of the last sample period a GPU was busy (NVML), by device index.",
        labels=["device"],
    )
    try:
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            rate = pynvml.nvmlDeviceGetUtilizationRates(handle).gpu
            family.add_metric([str(index)], float(rate) / 100)
    except Exception:
        log.warning("NVML did not answer", exc_info=True)
        return
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()
    if family.samples:
        yield family


def _on_child_start(**_: Any) -> None:
    """In a new pool child: how many GPUs TensorFlow sees (after ``warm_child`` set the
    devices up, which connected first)."""
    try:
        import tensorflow as tf

        from service.metrics import training_metrics

        training_metrics().gpu_devices.set(len(tf.config.list_physical_devices("GPU")))
    except Exception:
        log.warning("could not count GPUs for /metrics", exc_info=True)
