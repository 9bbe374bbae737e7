""" "Version published" and alias events, on one Redis pub/sub channel.

Inference servers subscribe and switch to a new version (or an alias's new target) at
once; a store poll is their fallback, so a lost event only delays a switch. Publishing is
therefore best effort: a failure is logged, never raised into a job or an RPC.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import redis

log = logging.getLogger(__name__)

CHANNEL = "fitserve:model-events"


@dataclass(frozen=True)
class ModelEvent:
    """Something changed which version a model's requests should reach."""

    model: str
    version: int = 0
    alias: str = ""

    def encode(self) -> str:
        """The wire form on the channel: a small JSON object."""
        data: dict[str, str | int] = {"model": self.model, "version": self.version}
        if self.alias:
            data["alias"] = self.alias
        return json.dumps(data)

    @classmethod
    def decode(cls, raw: str | bytes) -> ModelEvent | None:
        """The event in ``raw``, or None for a malformed message (logged)."""
        try:
            data = json.loads(raw)
            return cls(str(data["model"]), int(data.get("version", 0)), str(data.get("alias", "")))
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring a malformed model event: %r", raw)
            return None


class Publisher:
    """Publishes events from synchronous code (a worker announcing a version it wrote)."""

    def __init__(self, redis_url: str) -> None:
        self._redis_url = redis_url

    def publish(self, event: ModelEvent) -> None:
        """Publish one event; a failure is logged, not raised (servers also poll)."""
        try:
            with redis.Redis.from_url(
                self._redis_url, socket_connect_timeout=2, socket_timeout=2
            ) as client:
                client.publish(CHANNEL, event.encode())
        except redis.RedisError as exc:
            log.warning("could not publish %s (servers pick it up by polling): %s", event, exc)
