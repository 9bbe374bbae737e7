"""Integration tests run against the session's real Redis, worker and server."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import numpy as np
import pytest

import fitserve
from tests.conftest import RunningServer

pytestmark = pytest.mark.integration

MLP_LAYERS = [
    {"type": "Flatten", "input_shape": [28, 28]},
    {"type": "Dense", "units": 16, "activation": "relu"},
    {"type": "Dropout", "rate": 0.2},
    {"type": "Dense", "units": 10, "activation": "softmax"},
]


@pytest.fixture
def client(server: RunningServer, worker: subprocess.Popen[bytes]) -> Iterator[fitserve.Client]:
    with fitserve.Client(server.target, timeout=120) as c:
        yield c


@pytest.fixture(scope="session")
def digits() -> tuple[np.ndarray, np.ndarray]:
    """A small, learnable stand-in for MNIST: the label is the brightest of 10 bands."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, size=512)
    x = rng.random((512, 28, 28), dtype=np.float32) * 0.3
    for i, label in enumerate(y):
        x[i, :, label * 2 : label * 2 + 3] += 0.7
    return x, y
