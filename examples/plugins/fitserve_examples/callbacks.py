"""A callback with parameters."""

from __future__ import annotations

import time
from typing import Any

import keras


class EpochMarker(keras.callbacks.Callback):  # type: ignore[misc]
    """Adds ``key`` to the logs of every ``every``-th epoch (1-based), set to the epoch's
    wall time in seconds, so it shows in the job's history next to the metrics."""

    def __init__(self, every: int = 1, key: str = "epoch_seconds") -> None:
        super().__init__()
        if every < 1:
            raise ValueError(f"every must be at least 1, got {every}")
        self.every, self.key = every, key
        self._started = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._started = time.monotonic()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if logs is not None and (epoch + 1) % self.every == 0:
            logs[self.key] = time.monotonic() - self._started
