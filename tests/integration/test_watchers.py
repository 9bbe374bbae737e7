"""Many WatchJob streams on one api process: they wait without holding Redis connections,
so other calls keep working, and every watcher sees the end of its job.

Before the shared stream read, each watcher held a connection of the api's pool of 100 in
``XREAD BLOCK``; past 100 watchers they, and every other Redis-backed call, failed with
INTERNAL (docs/scaling.md).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import redis

import fitserve
from fitserve.v1 import training_pb2, training_pb2_grpc
from service.api import training
from service.config import Settings
from tests.conftest import private_stack

pytestmark = pytest.mark.integration
WATCHERS = 250  # over the old limit of 100 connections per api process
LAYERS = [{"type": "Dense", "units": 2, "activation": "softmax", "input_shape": [3]}]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Settings, str]]:
    with private_stack(tmp_path_factory.mktemp("watchers")) as (settings, running):
        yield settings, running.target  # no worker: jobs stay queued until cancelled


def test_hundreds_of_watchers_hold_no_connections_and_all_see_the_end(
    stack: tuple[Settings, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A watcher also re-reads its job's state every WATCH_WAIT_SECONDS; stretched to a
    # minute here (the server runs in this process), only the shared read can end the
    # watches within the test's bound.
    monkeypatch.setattr(training, "WATCH_WAIT_SECONDS", 60.0)
    settings, target = stack
    with fitserve.Client(target, timeout=30) as client:
        ds = client.upload_dataset("w-data", x=np.zeros((4, 3), np.float32), y=np.zeros(4))
        jobs = [
            client.train("w", layers=LAYERS, loss="sparse_categorical_crossentropy", dataset=ds)
            for _ in range(5)
        ]
    ids = [j.id for j in jobs]
    ends = asyncio.run(_watch_while_cancelling(settings, target, ids))

    assert len(ends) == WATCHERS
    assert set(ends) == {training_pb2.JOB_STATE_CANCELLED}


async def _watch_while_cancelling(settings: Settings, target: str, ids: list[str]) -> list[int]:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = training_pb2_grpc.TrainingServiceStub(channel)
        streams = [
            asyncio.create_task(_last_state(stub, ids[i % len(ids)])) for i in range(WATCHERS)
        ]
        await asyncio.sleep(1.0)  # every watcher has read the QUEUED event and waits
        assert not any(s.done() for s in streams), [s.exception() for s in streams if s.done()]
        with redis.Redis.from_url(settings.redis_url, decode_responses=True) as r:
            blocked = [c for c in r.client_list() if "b" in c["flags"]]
            assert len(blocked) <= 1  # one shared blocking read, not one per watcher
        for job_id in ids:  # other calls still work meanwhile
            job = await stub.GetJob(training_pb2.GetJobRequest(job_id=job_id), timeout=10)
            assert job.state == training_pb2.JOB_STATE_QUEUED
        cancelled = time.monotonic()
        for job_id in ids:
            await stub.CancelJob(training_pb2.CancelJobRequest(job_id=job_id), timeout=10)
        ends = await asyncio.wait_for(asyncio.gather(*streams), 45)
        assert max(end for _state, end in ends) - cancelled < 15  # not the minute's re-read
        return [state for state, _end in ends]


async def _last_state(
    stub: training_pb2_grpc.TrainingServiceStub, job_id: str
) -> tuple[int, float]:
    """The last state a watcher saw, and when its stream ended."""
    state = training_pb2.JOB_STATE_UNSPECIFIED
    async for event in stub.WatchJob(training_pb2.WatchJobRequest(job_id=job_id), timeout=60):
        if event.HasField("state_changed"):
            state = event.state_changed.state
    return state, time.monotonic()
