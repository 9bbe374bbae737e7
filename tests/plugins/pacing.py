"""A plugin that paces training for the fault tests, loaded through FITSERVE_PLUGINS: each
batch takes ``seconds`` longer, so a tiny model trains long enough for a fault to land
mid-fit, the way a real model's steps would (a sleep releases the GIL, as TensorFlow's
kernels do)."""

from __future__ import annotations

import time
from typing import Any

import keras


class Pace(keras.callbacks.Callback):  # type: ignore[misc]
    """Sleeps ``seconds`` at the end of every training batch."""

    def __init__(self, seconds: float = 0.05) -> None:
        super().__init__()
        self.seconds = seconds

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        time.sleep(self.seconds)


FITSERVE_PLUGIN = {"package": "pacing", "callbacks": [Pace]}
