"""Data that cannot fit the model fails the job before fit, with a message that names
both shapes and the fix, and a stable reason code."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import fitserve
from tests.integration.conftest import MLP_LAYERS

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    ("arrays", "loss", "reason", "message"),
    [
        (
            {"x": np.zeros((16, 28, 28), np.float32), "y": np.eye(10)[np.arange(16) % 10]},
            "sparse_categorical_crossentropy",
            "INVALID_LABELS",
            "loss 'sparse_categorical_crossentropy' got labels of shape [16, 10]; it expects "
            "integer class ids of shape [16] — use 'categorical_crossentropy' for one-hot labels",
        ),
        (
            {"x": np.zeros((16, 28, 28), np.float32), "y": np.arange(16) % 10},
            "categorical_crossentropy",
            "INVALID_LABELS",
            "loss 'categorical_crossentropy' got labels of shape [16]; it expects one-hot labels "
            "of shape [16, 10] — use 'sparse_categorical_crossentropy' for integer class ids",
        ),
        (
            {"x": np.zeros((16, 28, 28), np.float32), "y": np.arange(16)},
            "sparse_categorical_crossentropy",
            "INVALID_LABELS",
            "labels hold class id 15, but the model's output has 10 units",
        ),
        (
            {"x": np.zeros((16, 27, 28), np.float32), "y": np.arange(16) % 10},
            "sparse_categorical_crossentropy",
            "INVALID_INPUTS",
            "dataset input 'x' has shape [16, 27, 28]; the model's input 'x' expects [-1, 28, 28]",
        ),
    ],
)
def test_mismatched_data_fails_the_job_with_the_fix(
    client: fitserve.Client, arrays: dict[str, Any], loss: str, reason: str, message: str
) -> None:
    ds = client.upload_dataset(f"mismatch-{reason.lower().replace('_', '-')}", **arrays)
    job = client.train("mismatch", layers=MLP_LAYERS, loss=loss, dataset=ds, epochs=1)
    with pytest.raises(fitserve.JobFailedError) as exc:
        job.wait(timeout=120)
    assert exc.value.reason == reason
    assert message in str(exc.value)
    assert not exc.value.job.history  # it failed before the first epoch
