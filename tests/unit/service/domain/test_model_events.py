"""Model events: published on a real Redis, best effort when it is down; a version export
announces itself once per job, through the publisher it is given (no settings read)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import keras
import pytest
import redis

from service.domain import model_events
from service.domain.model_events import CHANNEL, ModelEvent, Publisher
from service.domain.model_store import ModelStore
from service.training.exporting import export_version
from tests.conftest import refused_port


def test_a_published_event_reaches_a_subscriber(redis_url: str) -> None:
    with redis.Redis.from_url(redis_url) as r, r.pubsub(ignore_subscribe_messages=True) as sub:
        sub.subscribe(CHANNEL)
        sub.get_message(timeout=1.0)  # the subscription confirmation

        Publisher(redis_url).publish(ModelEvent("mnist", 4, "stable"))

        deadline = time.monotonic() + 5
        message = None
        while message is None and time.monotonic() < deadline:
            message = sub.get_message(timeout=0.5)
    assert message is not None
    assert ModelEvent.decode(message["data"]) == ModelEvent("mnist", 4, "stable")


def test_publishing_with_redis_down_warns_and_does_not_raise(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger=model_events.__name__), refused_port() as port:
        Publisher(f"redis://127.0.0.1:{port}/0").publish(ModelEvent("mnist", 1))
    assert "could not publish" in caplog.text
    assert "servers pick it up by polling" in caplog.text


class Recorded(Publisher):
    """A publisher that keeps what it would send."""

    def __init__(self) -> None:
        super().__init__("redis://unused")
        self.events: list[ModelEvent] = []

    def publish(self, event: ModelEvent) -> None:
        self.events.append(event)


def test_an_export_announces_its_version_once_per_job(tmp_path: Path) -> None:
    model = keras.Sequential([keras.Input((3,), name="x"), keras.layers.Dense(2)])
    store, events = ModelStore(tmp_path / "models"), Recorded()

    first = export_version(model, store, "tiny", "job1", {"metrics": {}}, events)
    again = export_version(model, store, "tiny", "job1", {"metrics": {}}, events)  # a retry
    other = export_version(model, store, "tiny", "job2", {"metrics": {}})  # nobody to tell

    assert (first, again, other) == (1, 1, 2)
    assert events.events == [ModelEvent("tiny", 1)]
