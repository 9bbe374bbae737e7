"""Adds the data plane to a server: InferenceService and TF Serving's PredictionService
over one set of loaded models, their feedback log and hot reload."""

from __future__ import annotations

import asyncio
import logging

import grpc
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2

from fitserve.v1 import inference_pb2, inference_pb2_grpc
from service.api.app import FitserveServer
from service.api.serving import tfserving
from service.api.serving.inference import InferenceServicer
from service.api.status import RpcOutcomes
from service.domain.model_store import ModelStore
from service.inference.feedback import FeedbackLog
from service.inference.models import ServingModels
from service.inference.reload import start_reloading
from service.metrics import multiprocess

log = logging.getLogger(__name__)
_SERVING = health_pb2.HealthCheckResponse.SERVING


def add_inference(server: grpc.aio.Server, app: FitserveServer, outcomes: RpcOutcomes) -> list[str]:
    """InferenceService and TF Serving's PredictionService over one set of loaded models."""
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
        InferenceServicer(outcomes, models, feedback, s.max_message_bytes), server
    )
    tfserving.add_to_server(
        tfserving.PredictionServicer(outcomes, models, s.max_message_bytes), server
    )
    names = [
        inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name,
        tfserving.SERVICE_NAME,
    ]
    if s.inference.preload_models:
        models.spawn(preload_then_serve(models, app, [*names, ""]))
    return names


async def preload_then_serve(models: ServingModels, app: FitserveServer, names: list[str]) -> None:
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
