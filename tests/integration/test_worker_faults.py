"""A worker killed mid-fit: Redis redelivers the job, a new worker resumes it from its
last backed-up epoch, and exactly one version is published.

This runs on its own Redis, server and workers (not the session's), with a short
visibility timeout, so the shared worker never sees the job and redelivery comes soon.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import fitserve
from fitserve.v1 import training_pb2
from service.config import Settings
from tests.conftest import private_stack, start_worker, stop_process

pytestmark = pytest.mark.integration
EPOCHS = 40
VISIBILITY_TIMEOUT = 2


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[Settings, str]]:
    """Redis and an in-process server of our own: their settings and the server's address."""
    overrides = {"job_visibility_timeout_seconds": VISIBILITY_TIMEOUT}
    with private_stack(tmp_path, **overrides) as (settings, running):
        yield settings, running.target


@pytest.fixture
def plain_stack(tmp_path: Path) -> Iterator[tuple[Settings, str]]:
    """Like ``stack`` with the default visibility timeout: a message must not come back
    while a fresh child imports TensorFlow (several seconds), or it is redelivered to the
    next fresh child, and again, for ever."""
    with private_stack(tmp_path) as (settings, running):
        yield settings, running.target


def _worker(settings: Settings, log: Path, **extra: str) -> subprocess.Popen[bytes]:
    timeout = {"FITSERVE_JOB_VISIBILITY_TIMEOUT_SECONDS": str(VISIBILITY_TIMEOUT)}
    return start_worker(settings, log, **timeout, **extra)


def test_a_killed_worker_s_job_resumes_on_a_new_worker(
    stack: tuple[Settings, str], tmp_path: Path
) -> None:
    settings, target = stack
    first = _worker(settings, tmp_path / "worker-1.log")
    second: subprocess.Popen[bytes] | None = None
    try:
        with fitserve.Client(target, timeout=120) as client:
            job = _start_training(client)
            killed_after = _epochs_until(job, 2)
            os.killpg(first.pid, signal.SIGKILL)  # parent and prefork child, no cleanup
            first.wait(30)
            second = _worker(settings, tmp_path / "worker-2.log")
            result = job.wait(timeout=240)
            events = list(job.events())
    finally:
        stop_process(first)
        if second is not None:
            stop_process(second)

    assert result.state == training_pb2.JOB_STATE_SUCCEEDED
    assert result.attempt == 2
    resumed_at = _first_epoch_of_attempt(events, 2)
    assert 1 < resumed_at <= killed_after + 1  # from the backup, not from scratch
    assert [e.epoch for e in result.history] == list(range(1, EPOCHS + 1))  # each epoch once
    versions = [p.name for p in (settings.models_dir / "resumed").iterdir() if p.name.isdigit()]
    assert versions == ["1"]
    assert result.model_version == 1


def _start_training(client: fitserve.Client) -> fitserve.Job:
    rng = np.random.default_rng(1)
    x = rng.random((1024, 4), dtype=np.float32)
    ds = client.upload_dataset("fault-data", x=x, y=x[:, :3].argmax(axis=1))
    layers = [
        {"type": "Dense", "units": 8, "activation": "relu", "input_shape": [4]},
        {"type": "Dense", "units": 3, "activation": "softmax"},
    ]
    return client.train(
        "resumed",
        layers=layers,
        loss="sparse_categorical_crossentropy",
        dataset=ds,
        epochs=EPOCHS,
        batch_size=32,
        seed=0,
    )


def _epochs_until(job: fitserve.Job, epoch: int) -> int:
    """Follow the job until an epoch >= ``epoch`` ended; returns that epoch."""
    for event in job.events():
        if event.HasField("epoch_ended") and event.epoch_ended.epoch >= epoch:
            return event.epoch_ended.epoch
    raise AssertionError(f"the job ended before epoch {epoch}")


def _first_epoch_of_attempt(events: list[training_pb2.JobEvent], attempt: int) -> int:
    started = next(
        i
        for i, e in enumerate(events)
        if e.HasField("state_changed")
        and e.state_changed.state == training_pb2.JOB_STATE_RUNNING
        and e.state_changed.attempt == attempt
    )
    return next(e.epoch_ended.epoch for e in events[started:] if e.HasField("epoch_ended"))


def test_a_worker_child_is_replaced_after_its_job_limit_and_comes_up_warm(
    plain_stack: tuple[Settings, str], tmp_path: Path
) -> None:
    settings, target = plain_stack
    log = tmp_path / "worker.log"
    worker = start_worker(settings, log, FITSERVE_WORKER_MAX_JOBS_PER_CHILD="1")
    x = np.random.default_rng(0).random((32, 4), dtype=np.float32)
    try:
        with fitserve.Client(target, timeout=120) as client:
            ds = client.upload_dataset("limit", x=x, y=(x.sum(axis=1) > 2).astype(np.int64))
            layers = [{"type": "Dense", "units": 2, "activation": "softmax", "input_shape": [4]}]
            versions = [
                client.train(
                    "limit",
                    layers=layers,
                    loss="sparse_categorical_crossentropy",
                    dataset=ds,
                    seed=0,
                )
                .wait(timeout=120)
                .model_version
                for _ in range(2)
            ]
    finally:
        stop_process(worker)
    assert versions == [1, 2]
    text = log.read_text(errors="replace")
    # Each job ran in its own child, and each child imported TensorFlow as it started.
    assert "INFO/ForkPoolWorker-1] job started" in text
    assert "INFO/ForkPoolWorker-2] job started" in text
    assert text.count("worker child ready (TensorFlow imported)") >= 2
