"""Queue positions in GetJob and ListJobs, on a stack of its own with no worker: every
job it queues stays waiting in its Celery queue, so the positions are exact."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import redis

import fitserve
from fitserve.v1 import training_pb2
from service.config import Settings
from tests.conftest import private_stack

pytestmark = pytest.mark.integration
QUEUES = ("train", "cpu")
LAYERS = [{"type": "Dense", "units": 2, "activation": "softmax", "input_shape": [3]}]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Settings, str]]:
    with private_stack(tmp_path_factory.mktemp("queue")) as (settings, running):
        yield settings, running.target


@contextmanager
def queue_scans(settings: Settings) -> Iterator[list[str]]:
    """The queues read whole (``LRANGE <queue> 0 -1``) while the block runs, as Redis's
    MONITOR saw them; filled in when the block ends."""
    scans: list[str] = []
    end = f"end-{uuid.uuid4().hex}"
    with redis.Redis.from_url(settings.redis_url, decode_responses=True) as r, r.monitor() as m:

        def watch() -> None:
            for entry in m.listen():
                words = entry["command"].split()
                if words[:1] == ["ECHO"] and end in words[1]:
                    return
                if words[:1] == ["LRANGE"] and words[1] in QUEUES:
                    scans.append(words[1])

        thread = threading.Thread(target=watch, daemon=True)
        thread.start()
        found: list[str] = []
        yield found
        r.echo(end)
        thread.join(10)
        found += scans


def _list(client: fitserve.Client, model_name: str, state: str = "") -> dict[str, int]:
    jobs = client.list_jobs(state or None, model_name=model_name)
    return {j.id: j.queue_position for j in jobs}


def test_list_jobs_gives_each_queued_job_its_place_like_get_job_with_one_scan_per_queue(
    stack: tuple[Settings, str],
) -> None:
    settings, target = stack
    with fitserve.Client(target, timeout=30) as client:
        x = np.zeros((4, 3), np.float32)
        ds = client.upload_dataset("q-data", x=x, y=np.zeros(4, np.int64))
        args = {"layers": LAYERS, "loss": "sparse_categorical_crossentropy", "dataset": ds}
        train = [client.train("q", **args) for _ in range(3)]  # type: ignore[arg-type]
        cpu = client.train("q", queue="cpu", **args)  # type: ignore[arg-type]
        jobs = [*train, cpu]

        with queue_scans(settings) as scans:
            listed = _list(client, "q")
        assert sorted(scans) == ["cpu", "train"]  # one read of each queue, not one per job

        assert [listed[j.id] for j in train] == [0, 1, 2]  # the oldest is next
        assert listed[cpu.id] == 0
        assert listed == {j.id: j.refresh().queue_position for j in jobs}  # GetJob agrees

        train[0].cancel()  # not waiting any more: unknown, though its message is still queued
        listed = _list(client, "q")
        assert listed[train[0].id] == train[0].refresh().queue_position == -1
        assert [listed[j.id] for j in train[1:]] == [1, 2]
        states = {j.id: j.state for j in client.list_jobs(model_name="q")}
        assert states[train[0].id] == training_pb2.JOB_STATE_CANCELLED

        with queue_scans(settings) as scans:
            assert _list(client, "q", state="CANCELLED") == {train[0].id: -1}
        assert scans == []  # no queued job on the page: no read
