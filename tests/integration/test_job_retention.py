"""Retention of finished jobs through the real server and worker: how long their Redis
keys live, and what GetJob and ListJobs say once they are gone."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import redis

import fitserve
from fitserve.v1 import training_pb2
from service.config import Settings
from service.domain.jobs import INDEX, events_key, history_key, job_key
from tests.conftest import private_stack

pytestmark = pytest.mark.integration
LAYERS = [{"type": "Dense", "units": 2, "activation": "softmax", "input_shape": [3]}]
EXPIRY_WAIT = 10.0  # seconds; a 1 s retention is over well before this


def _train(client: fitserve.Client, model_name: str, epochs: int = 1) -> fitserve.Job:
    x = np.random.default_rng(0).random((16, 3), dtype=np.float32)
    ds = client.upload_dataset(f"{model_name}-data", x=x, y=np.zeros(16, np.int64))
    return client.train(
        model_name,
        layers=LAYERS,
        loss="sparse_categorical_crossentropy",
        dataset=ds,
        epochs=epochs,
        batch_size=8,
    )


def test_a_job_the_worker_finished_keeps_its_keys_for_the_configured_retention(
    client: fitserve.Client, settings: Settings
) -> None:
    retention = settings.job_retention_seconds
    assert retention is not None  # the default, which the session's worker has too
    job = _train(client, "retained", epochs=2)
    assert job.wait(timeout=120).state == training_pb2.JOB_STATE_SUCCEEDED
    with redis.Redis.from_url(settings.redis_url) as r:
        for key in (job_key(job.id), events_key(job.id), history_key(job.id)):
            assert retention * 1000 - 60_000 < r.pttl(key) <= retention * 1000, key


def test_an_expired_job_is_not_found_and_no_longer_listed_or_indexed(tmp_path: Path) -> None:
    with (
        private_stack(tmp_path, job_retention_seconds=1) as (settings, running),
        fitserve.Client(running.target, timeout=30) as client,
        redis.Redis.from_url(settings.redis_url) as r,
    ):
        kept = _train(client, "short-lived")  # no worker here: it stays queued
        gone = _train(client, "short-lived")
        assert client.cancel_job(gone.id).state == training_pb2.JOB_STATE_CANCELLED
        deadline = time.monotonic() + EXPIRY_WAIT
        while r.exists(job_key(gone.id), events_key(gone.id)):
            assert time.monotonic() < deadline, "the cancelled job's keys did not expire"
            time.sleep(0.05)

        # The queued job, now older than the retention too, is still there.
        assert client.get_job(kept.id).state == "QUEUED"
        assert r.ttl(job_key(kept.id)) == -1
        with pytest.raises(fitserve.NotFoundError):
            client.get_job(gone.id)
        assert [j.id for j in client.list_jobs(model_name="short-lived")] == [kept.id]
        assert r.zscore(INDEX, gone.id) is None
        assert r.zscore(INDEX, kept.id) is not None
