"""Devices and precision of a worker: MirroredStrategy over logical CPU devices, mixed
precision with a float32 output (Train from a layer list or a Keras config, FineTune of a
stored version), the policy reset between jobs of one child, and mixed_float16 refused on
a worker without GPU.

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


def _dataset(client: fitserve.Client, name: str, classes: int = 3) -> Any:
    x = np.random.default_rng(3).random((64, 4), dtype=np.float32)
    return client.upload_dataset(f"{name}-data", x=x, y=x[:, :classes].argmax(axis=1))


def _train(client: fitserve.Client, name: str, **kwargs: Any) -> fitserve.Job:
    kwargs.setdefault("layers", LAYERS)
    return client.train(
        name,
        loss="sparse_categorical_crossentropy",
        dataset=_dataset(client, name),
        epochs=2,
        batch_size=16,
        **kwargs,
    )


def _fine_tune(client: fitserve.Client, base: str, name: str, **kwargs: Any) -> fitserve.Job:
    classes = kwargs.get("new_head") or 3
    return client.fine_tune(
        base,
        model_name=name,
        loss="sparse_categorical_crossentropy",
        dataset=_dataset(client, name, classes),
        epochs=2,
        batch_size=16,
        **kwargs,
    )


def _log_lines(job: fitserve.Job) -> list[str]:
    return [e.log.message for e in job.events() if e.HasField("log")]


def _metadata(settings: Settings, name: str, version: int) -> dict[str, Any]:
    folder = settings.models_dir / name / str(version)
    metadata: dict[str, Any] = json.loads((folder / "fitserve.json").read_text())
    return metadata


def _published(settings: Settings, name: str, version: int) -> tuple[keras.Model, str]:
    """The version's model.keras, and the dtype of its serving signature's output."""
    folder = settings.models_dir / name / str(version)
    [output] = _metadata(settings, name, version)["signature"]["outputs"]
    return keras.models.load_model(folder / "model.keras"), output["dtype"]


def _policies(model: keras.Model) -> dict[str, str]:
    """Each layer's dtype policy by name, nested models' layers included."""
    out: dict[str, str] = {}
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            out |= _policies(layer)
        elif not isinstance(layer, keras.layers.InputLayer):
            out[layer.name] = layer.dtype_policy.name
    return out


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


def test_a_keras_config_trains_under_mixed_bfloat16_with_a_float32_output(
    stack: tuple[Settings, str, Path],
) -> None:
    """model.to_json() names float32 for every layer; the job's policy still applies."""
    settings, target, _ = stack
    local = keras.Sequential(
        [
            keras.Input((4,), name="x"),
            keras.layers.Dense(8, activation="relu", name="hidden"),
            keras.layers.Dense(3, activation="softmax", name="out"),
        ]
    )
    with fitserve.Client(target, timeout=120) as client:
        config = {"layers": None, "model": local.to_json()}
        job = _train(client, "config-mixed", mixed_precision="mixed_bfloat16", **config)
        result = job.wait(timeout=180)
        job = _train(client, "config-plain", **config)
        plain = job.wait(timeout=180)

    model, output_dtype = _published(settings, "config-mixed", result.model_version)
    assert _policies(model) == {"hidden": "mixed_bfloat16", "out": "float32"}  # not wrapped
    assert output_dtype == "FLOAT32"
    model, _ = _published(settings, "config-plain", plain.model_version)
    assert _policies(model) == {"hidden": "float32", "out": "float32"}


def test_fine_tune_under_mixed_bfloat16_switches_the_stored_layers_then_float32_again(
    stack: tuple[Settings, str, Path],
) -> None:
    settings, target, log = stack
    with fitserve.Client(target, timeout=120) as client:
        base = _train(client, "ft32").wait(timeout=180)  # a float32 base
        mixed = _fine_tune(
            client, "ft32", "ft-mixed", train_last_n_layers=1, mixed_precision="mixed_bfloat16"
        )
        mixed_result = mixed.wait(timeout=180)
        head = _fine_tune(client, "ft32", "ft-head", new_head=2, mixed_precision="mixed_bfloat16")
        head_result = head.wait(timeout=180)
        plain = _fine_tune(client, "ft-mixed", "ft-plain", train_last_n_layers=2)  # mixed base
        plain_result = plain.wait(timeout=180)

        assert REPLICAS in _log_lines(mixed)
        for result in (mixed_result, head_result, plain_result):
            assert result.state == training_pb2.JOB_STATE_SUCCEEDED
            assert np.isfinite(result.metrics["loss"])

    stored, _ = _published(settings, "ft32", base.model_version)
    model, output_dtype = _published(settings, "ft-mixed", mixed_result.model_version)
    names = [layer.name for layer in stored.layers]
    assert [layer.name for layer in model.layers] == names  # the output layer is not wrapped
    assert _policies(model) == {names[0]: "mixed_bfloat16", names[1]: "float32"}
    assert output_dtype == "FLOAT32"
    parent = _metadata(settings, "ft-mixed", mixed_result.model_version)["parent"]
    assert parent == {"model": "ft32", "version": base.model_version}
    x = np.ones((2, 4), np.float32)
    np.testing.assert_allclose(model.predict(x, verbose=0).sum(axis=1), 1.0, rtol=1e-3)

    model, output_dtype = _published(settings, "ft-head", head_result.model_version)
    assert _policies(model) == {"hidden": "mixed_bfloat16", "head": "float32"}
    assert output_dtype == "FLOAT32"

    model, output_dtype = _published(settings, "ft-plain", plain_result.model_version)
    assert set(_policies(model).values()) == {"float32"}  # the request's precision, not the base's
    assert output_dtype == "FLOAT32"
    assert "ForkPoolWorker-2]" not in log.read_text(errors="replace")  # all in one child


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
