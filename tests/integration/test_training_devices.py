"""Devices and precision of a worker: MirroredStrategy over logical CPU devices, mixed
precision with a float32 output, the policy reset between jobs of one child, and
mixed_float16 refused on a worker without GPU.

One worker of its own (the CPU split into 2 logical devices, a child that is never
replaced, so consecutive jobs share it) on its own Redis and server.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest

import fitserve
from fitserve.v1 import training_pb2
from service.config import Settings
from tests.conftest import private_stack, start_worker, stop_process

pytestmark = pytest.mark.integration
REPLICAS = "training on 2 replicas (MirroredStrategy)"
LAYERS = [
    {"type": "Dense", "units": 8, "activation": "relu", "input_shape": [4], "name": "hidden"},
    {"type": "Dense", "units": 3, "activation": "softmax"},
]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Settings, str, Path]]:
    """Redis, server and a 2-device worker: the settings, server address and worker log."""
    tmp = tmp_path_factory.mktemp("devices")
    with private_stack(tmp) as (settings, running):
        log = tmp / "worker.log"
        env = {"FITSERVE_WORKER_CPU_DEVICES": "2", "FITSERVE_WORKER_MAX_JOBS_PER_CHILD": "0"}
        worker = start_worker(settings, log, **env)
        try:
            yield settings, running.target, log
        finally:
            stop_process(worker)


def _train(client: fitserve.Client, name: str, **kwargs: Any) -> fitserve.Job:
    x = np.random.default_rng(3).random((64, 4), dtype=np.float32)
    ds = client.upload_dataset(f"{name}-data", x=x, y=x[:, :3].argmax(axis=1))
    return client.train(
        name,
        layers=LAYERS,
        loss="sparse_categorical_crossentropy",
        dataset=ds,
        epochs=2,
        batch_size=16,
        **kwargs,
    )


def _log_lines(job: fitserve.Job) -> list[str]:
    return [e.log.message for e in job.events() if e.HasField("log")]


def _published(settings: Settings, name: str, version: int) -> tuple[keras.Model, str]:
    """The version's model.keras, and the dtype of its serving signature's output."""
    folder = settings.models_dir / name / str(version)
    metadata = json.loads((folder / "fitserve.json").read_text())
    [output] = metadata["signature"]["outputs"]
    return keras.models.load_model(folder / "model.keras"), output["dtype"]


def test_mixed_bfloat16_on_two_replicas_then_float32_again_in_the_same_child(
    stack: tuple[Settings, str, Path],
) -> None:
    settings, target, log = stack
    with fitserve.Client(target, timeout=120) as client:
        mixed = _train(client, "mixed", mixed_precision="mixed_bfloat16")
        mixed_result = mixed.wait(timeout=180)
        plain = _train(client, "plain")
        plain_result = plain.wait(timeout=180)

        assert mixed_result.state == plain_result.state == training_pb2.JOB_STATE_SUCCEEDED
        assert REPLICAS in _log_lines(mixed)
        assert REPLICAS in _log_lines(plain)
        assert np.isfinite(mixed_result.metrics["loss"])

    model, output_dtype = _published(settings, "mixed", mixed_result.model_version)
    assert model.get_layer("hidden").dtype_policy.name == "mixed_bfloat16"
    assert model.layers[-1].dtype_policy.name == "float32"  # the output layer
    assert output_dtype == "FLOAT32"

    model, output_dtype = _published(settings, "plain", plain_result.model_version)
    assert model.get_layer("hidden").dtype_policy.name == "float32"  # the policy was reset
    assert output_dtype == "FLOAT32"

    text = log.read_text(errors="replace")  # both jobs ran in the one child
    assert text.count("ForkPoolWorker-1] job started") == 2
    assert "ForkPoolWorker-2]" not in text


def test_mixed_float16_without_a_gpu_fails_up_front_naming_the_cpu_policy(
    stack: tuple[Settings, str, Path],
) -> None:
    _, target, _ = stack
    with fitserve.Client(target, timeout=120) as client:
        job = _train(client, "half", mixed_precision="mixed_float16")
        with pytest.raises(fitserve.JobFailedError) as failed:
            job.wait(timeout=180)

    record = failed.value.job
    assert record.state == training_pb2.JOB_STATE_FAILED
    assert record.error.reason == "MIXED_FLOAT16_NEEDS_GPU"
    assert "use 'mixed_bfloat16' on CPU" in record.error.message
    assert record.history == []  # no epoch ran
