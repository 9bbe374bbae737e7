"""The composition root: builds every part from Settings and wires them into one server.

The api role never imports TensorFlow: the inference servicer (and with it TensorFlow) is
imported only when this server has the inference role.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any
from wsgiref.simple_server import WSGIServer

import grpc
import redis.asyncio as aioredis
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from fitserve.v1 import (
    dataset_pb2,
    dataset_pb2_grpc,
    inference_pb2,
    model_pb2,
    model_pb2_grpc,
    training_pb2,
    training_pb2_grpc,
)
from service.api.datasets import DatasetServicer
from service.api.gate import (
    Backlog,
    CallGate,
    channelz_counts,
    channelz_server_ids,
    transport_limit,
    watch_backlog,
)
from service.api.models import ModelServicer
from service.api.status import Edge
from service.api.training import TrainingServicer
from service.config import Settings
from service.domain.datasets import DatasetStore
from service.domain.jobs import AsyncJobStore
from service.domain.model_store import ModelStore
from service.job_metrics import register_store_collectors
from service.metrics import Metrics, multiprocess, serve_metrics, stop_metrics
from service.taskqueue import TaskQueue, create_celery

log = logging.getLogger(__name__)
REDIS_POOL_WAIT = 10.0  # seconds a call waits for a free Redis connection

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class FitserveServer:
    """A grpc.aio server plus what must close with it (Redis, models, /metrics)."""

    grpc_server: grpc.aio.Server
    settings: Settings
    metrics: Metrics
    health: health.aio.HealthServicer
    closers: list[Any] = field(default_factory=list)
    metrics_server: WSGIServer | None = None
    metrics_port: int = 0
    backlog: Backlog | None = None
    _watch: asyncio.Task[None] | None = None

    async def start(self, *, serve_metrics_http: bool = True) -> None:
        """Start serving gRPC (and /metrics over HTTP unless told not to)."""
        await self.grpc_server.start()
        if self.backlog is not None:
            self._watch = asyncio.get_running_loop().create_task(
                watch_backlog(self.backlog, self.metrics)
            )
        if serve_metrics_http:
            self.metrics_server, self.metrics_port = serve_metrics(
                self.metrics.registry, self.settings.host, self.settings.metrics_port
            )

    async def stop(self, grace: float | None = None) -> None:
        """Refuse new calls, let in-flight ones finish for ``grace`` seconds, close the rest."""
        await self.health.enter_graceful_shutdown()
        await self.grpc_server.stop(self.settings.grace_seconds if grace is None else grace)
        if self._watch is not None:
            self._watch.cancel()
        for close in reversed(self.closers):
            try:
                await close()
            except Exception:  # one part failing to close must not keep the others open
                log.exception("closing %s failed", getattr(close, "__qualname__", close))
        if self.metrics_server is not None:
            stop_metrics(self.metrics_server)

    async def wait_for_termination(self) -> None:
        await self.grpc_server.wait_for_termination()


async def create_server(
    settings: Settings, metrics: Metrics | None = None
) -> tuple[FitserveServer, int]:
    """Build a server for ``settings`` bound to its host and port; returns it and the port."""
    metrics = metrics or Metrics()
    options = [
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_receive_message_length", transport_limit(settings.max_message_bytes)),
        ("grpc.so_reuseport", 1),
    ]
    edge = Edge(metrics)
    gate = CallGate(settings.max_message_bytes, edge)
    before = channelz_server_ids()
    server = grpc.aio.server(options=options, interceptors=[gate])
    health_servicer = health.aio.HealthServicer()
    app = FitserveServer(server, settings, metrics, health_servicer)
    if "inference" in settings.roles:
        app.backlog = gate.backlog = _backlog(before)
        max_wait = settings.inference.max_queue_wait_ms
        gate.max_wait = None if max_wait is None else max_wait / 1000
    names = [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME]
    if "api" in settings.roles:
        names += await _add_api(server, app, edge)
    waiting: list[str] = []
    if "inference" in settings.roles:
        inference_names = _add_inference(server, app, edge)
        names += inference_names
        if settings.inference.preload_models:
            waiting = [*inference_names, ""]
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(names, server)
    for name in [*names, ""]:
        serving = name not in waiting
        await health_servicer.set(name, _SERVING if serving else _NOT_SERVING)
    port = server.add_insecure_port(f"{settings.host}:{settings.port}")
    if port == 0:
        raise OSError(f"could not bind {settings.host}:{settings.port}")
    return app, port


def _backlog(before: set[int]) -> Backlog | None:
    """The backlog of the server created since ``before`` was read, via channelz."""
    new = channelz_server_ids() - before
    if len(new) != 1:
        log.warning("load shedding is off: gRPC's channelz does not show this server")
        return None
    server_id = new.pop()
    return Backlog(lambda: channelz_counts(server_id))


async def _add_api(server: grpc.aio.Server, app: FitserveServer, edge: Edge) -> list[str]:
    s = app.settings
    # Calls wait up to REDIS_POOL_WAIT s for a connection when all are busy, not fail.
    pool = aioredis.BlockingConnectionPool.from_url(
        s.redis_url,
        decode_responses=True,
        max_connections=s.redis_max_connections,
        timeout=REDIS_POOL_WAIT,
    )
    client = aioredis.Redis.from_pool(pool)
    app.closers.append(client.aclose)
    datasets = DatasetStore(s.datasets_dir, s.max_dataset_bytes)
    models = ModelStore(s.models_dir)
    queue = TaskQueue(create_celery(s, "fitserve-api"), broker=client)
    jobs = AsyncJobStore(client, retention_seconds=s.job_retention_seconds)
    app.closers.append(jobs.notifier.close)
    training = TrainingServicer(
        edge,
        jobs,
        queue,
        datasets,
        models,
        app.metrics,
        dataset_roots=s.dataset_roots,
        dataset_url_schemes=s.dataset_url_schemes,
    )
    training_pb2_grpc.add_TrainingServiceServicer_to_server(training, server)
    dataset_pb2_grpc.add_DatasetServiceServicer_to_server(
        DatasetServicer(edge, datasets, app.metrics), server
    )
    model_pb2_grpc.add_ModelServiceServicer_to_server(
        ModelServicer(edge, models, events=client), server
    )
    close_collectors = register_store_collectors(app.metrics.registry, s)
    app.closers.append(lambda: asyncio.to_thread(close_collectors))
    return [
        training_pb2.DESCRIPTOR.services_by_name["TrainingService"].full_name,
        dataset_pb2.DESCRIPTOR.services_by_name["DatasetService"].full_name,
        model_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name,
    ]


def _add_inference(server: grpc.aio.Server, app: FitserveServer, edge: Edge) -> list[str]:
    """InferenceService and TF Serving's PredictionService over one set of loaded models."""
    from fitserve.v1 import inference_pb2_grpc
    from service.api import tfserving
    from service.api.inference import InferenceServicer
    from service.inference.feedback import FeedbackLog
    from service.inference.models import ServingModels
    from service.inference.reload import start_reloading

    s = app.settings
    client = aioredis.Redis.from_url(s.redis_url)
    arriving = app.backlog.count_waiting if app.backlog is not None else None
    models = ServingModels(ModelStore(s.models_dir), s.batching, s.inference, app.metrics, arriving)
    feedback = FeedbackLog(
        client, s.inference.feedback_ttl_seconds, app.metrics, s.inference.feedback_sample_rate
    )
    app.closers += [client.aclose, feedback.close, models.close]
    start_reloading(models, client, s.inference.reload_poll_seconds)
    if multiprocess():
        models.spawn(models.sample_gauges())
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(
        InferenceServicer(edge, models, feedback), server
    )
    tfserving.add_to_server(tfserving.PredictionServicer(edge, models), server)
    names = [
        inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name,
        tfserving.SERVICE_NAME,
    ]
    if s.inference.preload_models:
        models.spawn(_preload_then_serve(models, app, [*names, ""]))
    return names


async def _preload_then_serve(models: Any, app: FitserveServer, names: list[str]) -> None:
    """Report SERVING once the default versions of the preload models are in memory."""
    preload = app.settings.inference.preload_models
    while True:
        try:
            await models.preload(preload)
            break
        except Exception as exc:
            log.warning("preloading %s failed (%s); retrying", preload, exc)
            await asyncio.sleep(app.settings.inference.reload_poll_seconds)  # retry period
    for name in names:
        await app.health.set(name, _SERVING)
    log.info("preloaded %s; serving", preload)
