"""Batch progress: streamed through WatchJob only for a job that asks, and throttled."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import fitserve
from fitserve.v1 import training_pb2

pytestmark = pytest.mark.integration

EPOCHS, BATCHES = 2, 4  # 64 rows in batches of 16


def _batch_events(client: fitserve.Client, name: str, **callbacks: Any) -> list[Any]:
    x = np.random.default_rng(2).random((64, 4), dtype=np.float32)
    ds = client.upload_dataset(f"{name}-data", x=x, y=x[:, :3].argmax(axis=1))
    job = client.train(
        name,
        layers=[{"type": "Dense", "units": 3, "activation": "softmax", "input_shape": [4]}],
        loss="sparse_categorical_crossentropy",
        dataset=ds,
        epochs=EPOCHS,
        batch_size=16,
        callbacks=callbacks or None,
    )
    result = job.wait(timeout=120)
    assert result.state == training_pb2.JOB_STATE_SUCCEEDED
    return [e.batch_progress for e in job.events() if e.HasField("batch_progress")]


def test_a_job_with_batch_progress_streams_every_batch_when_the_interval_allows(
    client: fitserve.Client,
) -> None:
    events = _batch_events(
        client, "batches-all", batch_progress=True, batch_progress_interval_seconds=1e-6
    )

    expected = [(e, b) for e in range(1, EPOCHS + 1) for b in range(1, BATCHES + 1)]
    assert [(e.epoch, e.batch) for e in events] == expected
    assert {e.batches for e in events} == {BATCHES}
    assert all(np.isfinite(e.logs["loss"]) and e.logs["loss"] > 0 for e in events)


def test_batch_progress_is_throttled_to_the_interval(client: fitserve.Client) -> None:
    events = _batch_events(
        client, "batches-throttled", batch_progress=True, batch_progress_interval_seconds=3600
    )

    assert [(e.epoch, e.batch, e.batches) for e in events] == [(1, 1, BATCHES)]  # the first only


def test_a_job_without_batch_progress_streams_none(client: fitserve.Client) -> None:
    assert _batch_events(client, "batches-none") == []
