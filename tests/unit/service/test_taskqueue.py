"""Queue positions read from a real Redis broker list that Celery filled, no worker."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis
from celery import Celery

from service.config import Settings
from service.taskqueue import TASK_TRAIN, TaskQueue, create_celery

QUEUE = "taskqueue-test"  # a queue of its own: no worker of the session consumes it


@pytest.fixture
def app(redis_url: str, tmp_path: Path) -> Iterator[Celery]:
    with redis.Redis.from_url(redis_url) as r:
        r.delete(QUEUE)
    celery = create_celery(Settings(redis_url=redis_url, data_dir=tmp_path))
    yield celery
    celery.close()


def _positions(app: Celery, redis_url: str, ids: list[str]) -> dict[str, int]:
    async def read() -> dict[str, int]:
        broker = aioredis.Redis.from_url(redis_url)
        try:
            return await TaskQueue(app, broker).positions(QUEUE, ids)
        finally:
            await broker.aclose()

    return asyncio.run(read())


def test_positions_count_from_the_oldest_and_leave_the_rest_unknown(
    app: Celery, redis_url: str
) -> None:
    for job_id in ("a1", "b2", "c3"):
        TaskQueue(app).submit(TASK_TRAIN, job_id, QUEUE)
    with redis.Redis.from_url(redis_url) as r:
        r.lpush(QUEUE, "not a celery message")  # ignored, but it holds a place

    assert _positions(app, redis_url, ["c3", "a1", "zz"]) == {"a1": 0, "c3": 2, "zz": -1}
    assert _positions(app, redis_url, []) == {}


def test_without_a_broker_every_position_is_unknown(app: Celery) -> None:
    queue = TaskQueue(app)
    queue.submit(TASK_TRAIN, "a1", QUEUE)

    assert asyncio.run(queue.positions(QUEUE, ["a1"])) == {"a1": -1}
    assert asyncio.run(queue.position(QUEUE, "a1")) == -1
