"""Hot reload: model events from Redis pub/sub switch routes at once; a store poll backs them.

Events are hints, not the truth: each one only makes ``ServingModels.refresh`` re-read the
store for that model. A lost event (Redis down, a message published while this server was
reconnecting) is therefore caught by the next poll, and a duplicate costs one re-read.
"""

from __future__ import annotations

import asyncio
import logging

import redis.asyncio as aioredis

from service.domain.model_events import CHANNEL, ModelEvent
from service.inference.models import ServingModels

log = logging.getLogger(__name__)

_RECONNECT_SECONDS = (0.1, 0.5, 1.0, 2.0, 5.0)


def start_reloading(models: ServingModels, client: aioredis.Redis, poll_seconds: float) -> None:
    """Follow model events and poll the store, for as long as ``models`` is open."""
    models.spawn(_listen(models, client))
    models.spawn(_poll(models, poll_seconds))


async def _listen(models: ServingModels, client: aioredis.Redis) -> None:
    failures = 0
    while True:
        try:
            await _follow(models, client)
        except (aioredis.RedisError, OSError) as exc:
            delay = _RECONNECT_SECONDS[min(failures, len(_RECONNECT_SECONDS) - 1)]
            log.warning("model events: %s; resubscribing in %.1f s", exc, delay)
            failures += 1
            await asyncio.sleep(delay)  # backoff between reconnects, not a wait for a state


async def _follow(models: ServingModels, client: aioredis.Redis) -> None:
    async with client.pubsub(ignore_subscribe_messages=True) as pubsub:
        await pubsub.subscribe(CHANNEL)
        await models.refresh()  # catch what was published while unsubscribed
        async for message in pubsub.listen():
            if message.get("type") == "message" and (event := ModelEvent.decode(message["data"])):
                models.spawn(models.refresh(event.model))


async def _poll(models: ServingModels, seconds: float) -> None:
    while True:
        await asyncio.sleep(seconds)  # the poll period itself
        try:
            await models.refresh()
        except Exception:
            log.exception("polling the model store failed")
