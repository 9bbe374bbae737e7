"""A two-output functional model through the service: per-output losses and metrics as
Keras takes them, and outputs that keep their names when served."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import pytest

import fitserve
from fitserve.v1 import training_pb2

pytestmark = pytest.mark.integration


def _two_outputs() -> keras.Model:
    x = keras.Input((4,), name="x")
    hidden = keras.layers.Dense(8, activation="relu")(x)
    cls = keras.layers.Dense(3, activation="softmax", name="cls")(hidden)
    reg = keras.layers.Dense(1, name="reg")(hidden)
    return keras.Model(x, [cls, reg])


def test_per_output_metrics_and_named_outputs(client: fitserve.Client) -> None:
    rng = np.random.default_rng(3)
    x = rng.random((64, 4), dtype=np.float32)
    arrays: dict[str, Any] = {
        "x": x,
        "cls": x[:, :3].argmax(axis=1),
        "reg": x.sum(axis=1, keepdims=True),
    }
    ds = client.upload_dataset("two-outputs", **arrays)
    ref = training_pb2.DatasetRef(dataset=ds.id, input_keys=["x"], target_keys=["cls", "reg"])

    with pytest.raises(fitserve.InvalidArgumentError, match=r"2 outputs \('cls', 'reg'\)"):
        client.train(
            "two-outputs",
            model=_two_outputs(),
            dataset=ref,
            metrics=["accuracy"],
            loss={"cls": "sparse_categorical_crossentropy", "reg": "mse"},
        )
    job = client.train(
        "two-outputs",
        model=_two_outputs(),
        dataset=ref,
        loss={"cls": "sparse_categorical_crossentropy", "reg": "mse"},
        metrics={"cls": ["accuracy"], "reg": ["mae"]},
        epochs=2,
        seed=1,
    ).wait(timeout=180)

    assert {"cls_accuracy", "reg_mae"} <= set(job.history[-1].logs)
    outputs = client.predict("two-outputs", x[:5])
    assert isinstance(outputs, dict)
    assert sorted(outputs) == ["cls", "reg"]
    assert outputs["cls"].shape == (5, 3)
    assert outputs["reg"].shape == (5, 1)

    full = client.predict_full("two-outputs", x[:4])
    with pytest.raises(
        fitserve.InvalidArgumentError, match=r"2 outputs \('cls', 'reg'\); set output"
    ):
        client.feedback(full.request_id, arrays["cls"][:4])
    with pytest.raises(fitserve.InvalidArgumentError, match=r"'clss' is not an output"):
        client.feedback(full.request_id, arrays["cls"][:4], output="clss")
    reply = client.feedback(full.request_id, arrays["reg"][:4].astype(np.float32), output="reg")
    assert (reply.output, reply.rows) == ("reg", 4)
