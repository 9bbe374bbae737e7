"""fitserve's own Keras callbacks: progress reporting, cooperative cancel, time limits.

They use epoch hooks only: overriding batch hooks makes Keras sync every step, so
BatchProgress, which must, is added only to jobs that ask for it. Cancel is
polled from a background thread that sets ``model.stop_training``, which Keras checks
after every batch, so a running job stops at the next batch end at no per-batch cost;
a job's time limit is a timer thread that does the same.
"""

from __future__ import annotations

import logging
import math
import shutil
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import keras

from service.domain.job_specs import ThresholdSpec
from service.domain.job_store import JobStore
from service.domain.jobs import JobState
from service.errors import DeadlineExceeded

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
    """Records every epoch's logs in the job's history and event stream.

    A redelivered job resumes (BackupAndRestore) at a later epoch than the request's
    initial_epoch; the history of the epochs it redoes is dropped when it begins, so the
    history holds each epoch once.
    """

    def __init__(self, jobs: JobStore, job_id: str, epochs: int, initial_epoch: int = 0) -> None:
        super().__init__()
        self._jobs, self._job_id, self._epochs = jobs, job_id, epochs
        self._initial_epoch = initial_epoch
        self._begun = False
        self.last_logs: dict[str, float] = {}
        self.logs_by_epoch: dict[int, dict[str, float]] = {}  # 1-based epochs of this run

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if self._begun:
            return
        self._begun = True
        try:
            self._jobs.reset_history(self._job_id, epoch - self._initial_epoch)
        except Exception:
            log.warning("could not trim the history to epoch %d", epoch, exc_info=True)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.last_logs = plain_logs(logs) | self._learning_rate()
        self.logs_by_epoch[epoch + 1] = self.last_logs
        try:
            self._jobs.record_epoch(self._job_id, epoch + 1, self._epochs, self.last_logs)
        except Exception:  # reporting must never crash training
            log.warning("could not record epoch %d", epoch + 1, exc_info=True)

    def _learning_rate(self) -> dict[str, float]:
        """The rate this epoch ran at (later callbacks such as ReduceLROnPlateau may
        change it for the next one)."""
        try:
            return {"learning_rate": float(self.model.optimizer.learning_rate)}
        except (AttributeError, TypeError, ValueError):
            return {}


class BatchProgress(keras.callbacks.Callback):  # type: ignore[misc]
    """Streams a job's batch progress, at most one event per ``interval`` seconds (the
    first batch of a fit always reports)."""

    def __init__(self, jobs: JobStore, job_id: str, interval: float) -> None:
        super().__init__()
        self._jobs, self._job_id, self._interval = jobs, job_id, interval
        self._epoch = 0
        self._last = -math.inf

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._epoch = epoch + 1

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        now = time.monotonic()
        if now - self._last < self._interval:
            return
        self._last = now
        event = {
            "epoch": self._epoch,
            "batch": batch + 1,
            "batches": int(self.params.get("steps") or 0),
            "logs": plain_logs(logs),
        }
        try:
            self._jobs.add_event(self._job_id, "batch", event)
        except Exception:  # reporting must never crash training
            log.warning("could not report batch %d", batch + 1, exc_info=True)


class Thresholds(keras.callbacks.Callback):  # type: ignore[misc]
    """Watches epoch metrics: each threshold, the first time its metric reaches it, adds a
    "threshold" event to the job; one with ``stop`` ends the fit after that epoch (the
    job then publishes, as a finished one does). A monitor missing from the logs is
    reported once, as Keras's EarlyStopping warns."""

    def __init__(self, jobs: JobStore, job_id: str, specs: list[ThresholdSpec]) -> None:
        super().__init__()
        self._jobs, self._job_id = jobs, job_id
        self._waiting = list(specs)
        self._missing: set[str] = set()
        self.stopped_by: ThresholdSpec | None = None

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        values = plain_logs(logs)
        for spec in list(self._waiting):
            if spec.monitor not in values:
                self._report_missing(spec.monitor, values)
                continue
            observed = values[spec.monitor]
            reached = observed >= spec.value if spec.direction == "max" else observed <= spec.value
            if not reached:
                continue
            self._waiting.remove(spec)
            if spec.stop and self.stopped_by is None:
                self.stopped_by = spec
                self.model.stop_training = True
            event = {
                "monitor": spec.monitor,
                "value": spec.value,
                "observed": observed,
                "epoch": epoch + 1,
                "mode": spec.direction,
                "stopped": spec.stop,
            }
            self._add("threshold", event)

    def _report_missing(self, monitor: str, values: dict[str, float]) -> None:
        if monitor in self._missing:
            return
        self._missing.add(monitor)
        message = (
            f"threshold monitor {monitor!r} is not in the epoch logs; they have "
            f"{', '.join(sorted(values)) or 'nothing'}"
        )
        self._add("log", {"level": "WARNING", "message": message})

    def _add(self, kind: str, data: dict[str, Any]) -> None:
        try:
            self._jobs.add_event(self._job_id, kind, data)
        except Exception:  # reporting must never crash training
            log.warning("could not report a threshold", exc_info=True)


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


class JobBackup(keras.callbacks.BackupAndRestore):  # type: ignore[misc]
    """BackupAndRestore for jobs whose worker may be killed at any instant.

    Keras writes the backup in place, so a kill mid-write leaves a corrupt file: keep the
    previous backup too (``double_checkpoint``), which Keras falls back to; and when
    nothing readable is left, start the fit over instead of failing the job.
    """

    def __init__(self, backup_dir: Path) -> None:
        super().__init__(str(backup_dir), double_checkpoint=True, delete_checkpoint=False)

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        try:
            super().on_train_begin(logs)
        except (OSError, ValueError):
            log.warning("the job's backup is unreadable; starting the fit over", exc_info=True)
            shutil.rmtree(self.backup_dir, ignore_errors=True)
            # A private attribute: BackupAndRestore tells fit where to resume only through
            # it (no public API), and a failed restore must not leave a stale epoch there.
            self.model._initial_epoch = None


class TimeLimitReached(DeadlineExceeded):
    """A job ran for its time limit: it stopped at a batch end and published nothing."""

    reason = "TIME_LIMIT"


class TimeLimit(keras.callbacks.Callback):  # type: ignore[misc]
    """Stops a job's fits and evaluations once it has run ``seconds`` since ``started_at``
    (wall clock: when this worker started the job). A timer thread, armed while a fit or
    an evaluation runs, sets ``model.stop_training`` and ``model.stop_evaluating``, which
    Keras checks after every batch; a fit that begins past the deadline stops after its
    first batch. The job then checks ``reached`` and fails (``check``)."""

    def __init__(self, seconds: float, started_at: float) -> None:
        super().__init__()
        self.seconds = seconds
        self._deadline = started_at + seconds
        self.reached = False
        self.epoch = 0  # 1-based, of the fit running when the limit was reached
        self._depth = 0  # a fit's validation is an evaluation inside it
        self._timer: threading.Timer | None = None

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._begin()

    def on_test_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._begin()

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        self._end()

    def on_test_end(self, logs: dict[str, Any] | None = None) -> None:
        self._end()

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if not self.reached or not self.epoch:
            self.epoch = epoch + 1

    def _begin(self) -> None:
        self._depth += 1
        if self.reached or time.time() >= self._deadline:
            self._reach()  # Keras cleared the stop flags as this fit or evaluation began
            return
        if self._timer is None:
            # The thread holds the callback weakly: a job that raised mid-fit (so no
            # on_train_end cancels the timer) leaves neither it nor its model alive.
            self._timer = threading.Timer(
                self._deadline - time.time(), _reach_weakly, args=(weakref.ref(self),)
            )
            self._timer.name, self._timer.daemon = "time-limit", True
            self._timer.start()

    def _end(self) -> None:
        self._depth = max(0, self._depth - 1)
        if self._depth == 0 and self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _reach(self) -> None:
        self.reached = True
        model = self.model
        if model is not None:
            model.stop_training = True
            model.stop_evaluating = True

    def check(self, epochs: int = 0) -> None:
        """Raise TimeLimitReached if the limit stopped the job (``epochs``: the fit's
        total, 0 for an evaluation)."""
        if not self.reached:
            return
        where = f"in epoch {self.epoch} of {epochs}" if epochs else "while evaluating"
        raise TimeLimitReached(
            f"the job ran for its time limit of {self.seconds:g} s (run.time_limit_seconds) "
            f"and was stopped {where}; nothing was published. Ask for a longer "
            "run.time_limit_seconds (up to the server's maximum, "
            "FITSERVE_JOB_TIME_LIMIT__MAX_SECONDS), or train for fewer epochs or steps"
        )


def _reach_weakly(ref: weakref.ref[TimeLimit]) -> None:
    limit = ref()
    if limit is not None:
        limit._reach()


def time_limit(seconds: int | None, started_at: float) -> TimeLimit | None:
    """The time limit of a job that may run ``seconds`` from ``started_at`` (None: jobs
    queued before time limits existed, which run unlimited)."""
    return None if seconds is None else TimeLimit(seconds, started_at)
