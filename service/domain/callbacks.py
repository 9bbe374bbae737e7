"""fitserve's own Keras callbacks: progress reporting and cooperative cancel.

Both use epoch hooks only: overriding batch hooks makes Keras sync every step. Cancel is
polled from a background thread that sets ``model.stop_training``, which Keras checks
after every batch, so a running job stops at the next batch end at no per-batch cost.
"""

from __future__ import annotations

import logging
import math
import threading
from typing import Any

import keras

from service.domain.jobs import JobState, JobStore

log = logging.getLogger(__name__)


def plain_logs(logs: dict[str, Any] | None) -> dict[str, float]:
    """Keras logs as JSON-safe floats (numpy scalars and tensors become float)."""
    out: dict[str, float] = {}
    for key, value in (logs or {}).items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        out[key] = number if math.isfinite(number) else float("nan")
    return out


class JobProgress(keras.callbacks.Callback):  # type: ignore[misc]
    """Records every epoch's logs in the job's history and event stream."""

    def __init__(self, jobs: JobStore, job_id: str, epochs: int) -> None:
        super().__init__()
        self._jobs, self._job_id, self._epochs = jobs, job_id, epochs
        self.last_logs: dict[str, float] = {}

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.last_logs = plain_logs(logs)
        try:
            self._jobs.record_epoch(self._job_id, epoch + 1, self._epochs, self.last_logs)
        except Exception:  # reporting must never crash training
            log.warning("could not record epoch %d", epoch + 1, exc_info=True)


class CancelWatcher(keras.callbacks.Callback):  # type: ignore[misc]
    """Stops training soon after the job is set CANCELLING."""

    def __init__(self, jobs: JobStore, job_id: str, interval: float = 0.5) -> None:
        super().__init__()
        self._jobs, self._job_id, self._interval = jobs, job_id, interval
        self._done = threading.Event()
        self.cancelled = False
        self._thread: threading.Thread | None = None

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._done.clear()
        self._thread = threading.Thread(target=self._poll, name="cancel-watcher", daemon=True)
        self._thread.start()

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()

    def _poll(self) -> None:
        while not self._done.wait(self._interval):
            try:
                state = self._jobs.state(self._job_id)
            except Exception:
                log.warning("could not read the job state", exc_info=True)
                continue
            if state is JobState.CANCELLING:
                self.cancelled = True
                self.model.stop_training = True
                return
