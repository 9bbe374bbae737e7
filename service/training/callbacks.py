"""fitserve's own Keras callbacks: progress reporting, cooperative cancel, time limits,
and the job's backup.

They use epoch hooks only: overriding batch hooks makes Keras sync every step, so
BatchProgress, which must, is added only to jobs that ask for it. Cancel is
polled from a background thread that sets ``model.stop_training``, which Keras checks
after every batch, so a running job stops at the next batch end at no per-batch cost;
a job's time limit is a timer thread that does the same. So does a job that must stop
without finishing (handed back by a stopping worker, or its lease lost:
``service.domain.leases``); its epoch end then raises before anything of that partial
epoch is backed up or recorded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import redis

from service.domain import leases
from service.domain.job_specs import ThresholdSpec
from service.domain.job_store import JobStore
from service.domain.jobs import JobState
from service.errors import DeadlineExceeded
from service.metrics import training_metrics

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


REDIS_WAIT_SECONDS = 60.0
"""How long the end of a fit waits for Redis to record the epochs it could not yet."""


class JobProgress(keras.callbacks.Callback):  # type: ignore[misc]
    """Records every epoch's logs in the job's history and event stream, each epoch once.

    A redelivered job resumes (its backup restored) at a later epoch than the request's
    initial_epoch; the history of the epochs it redoes is dropped when it begins, so the
    history holds each epoch once. Each epoch is backed up before it is recorded (the
    backup of the running fit is ``JobControl.backup``), so the stream never shows an
    epoch the next attempt redoes; an epoch a lost attempt backed up but could not record
    is recorded from the backup when the next attempt begins, so none is missing.

    Redis unreachable (a restart, a network cut) does not stop training: the records wait
    here, in order (and in the backup), and are sent once Redis answers, at the latest
    when the fit ends. A job that must stop without finishing (``JobControl.stopping``)
    raises ``leases.Stopped`` at the epoch end, before the epoch is backed up or recorded;
    a fit that ends renews the lease first (``JobControl.confirm``), so a job whose lease
    another attempt holds never goes on to publish.
    """

    def __init__(
        self,
        jobs: JobStore,
        job_id: str,
        epochs: int,
        initial_epoch: int = 0,
        *,
        kind: str = "train",
        batch_size: int = 0,
    ) -> None:
        super().__init__()
        self._jobs, self._job_id, self._epochs = jobs, job_id, epochs
        self._initial_epoch = initial_epoch
        self._timer = EpochTimer(kind, batch_size)
        self._begun = False
        self._control = leases.current()
        self._pending: list[tuple[int, dict[str, float]]] = []  # not recorded yet, in order
        self._unreachable = False
        self.last_logs: dict[str, float] = {}
        self.logs_by_epoch: dict[int, dict[str, float]] = {}  # 1-based epochs of this run

    def on_train_batch_begin(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self._timer.step()

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._timer.begin()
        if self._begun:
            return
        self._begun = True
        keep = epoch - self._initial_epoch
        try:
            self._jobs.reset_history(self._job_id, keep)
            self._recover(keep)
        except Exception:
            log.warning("could not trim the history to epoch %d", epoch, exc_info=True)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        control = self._control
        if control is not None and control.stopping:
            raise control.stopped()  # nothing of this partial epoch is kept
        self._timer.end()
        self.last_logs = plain_logs(logs) | self._learning_rate()
        self.logs_by_epoch[epoch + 1] = self.last_logs
        self._pending.append((epoch + 1, self.last_logs))
        backup = control.backup if control is not None else None
        if isinstance(backup, JobBackup):
            backup.save(epoch + 1, dict(self._pending))
        self._flush()

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        self._flush(wait=REDIS_WAIT_SECONDS)
        if self._control is not None:
            self._control.confirm()

    def _recover(self, keep: int) -> None:
        """Record the epochs the restored backup holds that the history lacks."""
        backup = self._control.backup if self._control is not None else None
        missing = backup.unrecorded if isinstance(backup, JobBackup) else {}
        if not missing:
            return
        have = self._jobs.history_length(self._job_id)
        for epoch in range(self._initial_epoch + have + 1, self._initial_epoch + keep + 1):
            if epoch not in missing:
                log.warning("epoch %d of an earlier attempt was never recorded", epoch)
                break
            self._pending.append((epoch, missing[epoch]))
        self._flush()

    def _flush(self, wait: float = 0.0) -> None:
        """Record the pending epochs in order; while Redis is unreachable keep them (and
        retry for up to ``wait`` seconds)."""
        deadline = time.monotonic() + wait
        while self._pending:
            epoch, logs = self._pending[0]
            try:
                recorded = self._jobs.record_epoch(self._job_id, epoch, self._epochs, logs)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                if not self._unreachable:
                    log.warning(
                        "could not record epoch %d (%s); kept until Redis answers", epoch, exc
                    )
                self._unreachable = True
                if time.monotonic() >= deadline:
                    return
                time.sleep(1.0)
                continue
            except Exception:  # reporting must never crash training
                log.warning("could not record epoch %d", epoch, exc_info=True)
                recorded = True
            if self._unreachable:
                log.info("recording epochs again")
                self._unreachable = False
            self._pending.pop(0)
            if not recorded and self._control is not None:
                self._control.lose("the job's records belong to another attempt now")

    def _learning_rate(self) -> dict[str, float]:
        """The rate this epoch ran at (later callbacks such as ReduceLROnPlateau may
        change it for the next one)."""
        try:
            return {"learning_rate": float(self.model.optimizer.learning_rate)}
        except (AttributeError, TypeError, ValueError):
            return {}


class EpochTimer:
    """Epoch and step times and throughput for /metrics (``TrainingMetrics``); GPU memory
    sampled at each epoch end. Steps are timed from one batch's start to the next (a
    batch begin hook only: an end hook would stop Keras dispatching batch ends
    asynchronously)."""

    def __init__(self, kind: str, batch_size: int) -> None:
        self._kind, self._batch_size = kind, batch_size
        self._epoch_started = self._step_started = 0.0
        self._steps = 0

    def begin(self) -> None:
        self._epoch_started, self._step_started, self._steps = time.monotonic(), 0.0, 0

    def step(self) -> None:
        now = time.monotonic()
        if self._step_started:
            training_metrics().step_seconds.observe(now - self._step_started)
        self._step_started = now
        self._steps += 1

    def end(self) -> None:
        if not self._epoch_started:
            return
        m, now = training_metrics(), time.monotonic()
        if self._step_started:
            m.step_seconds.observe(now - self._step_started)
            self._step_started = 0.0
        seconds = now - self._epoch_started
        m.epoch_seconds.labels(self._kind).observe(seconds)
        if seconds > 0 and self._batch_size:
            m.samples_per_second.set(self._steps * self._batch_size / seconds)
        sample_gpu_memory()


def sample_gpu_memory() -> None:
    """fitserve_gpu_memory_used_bytes of each GPU TensorFlow sees (none on CPU)."""
    import tensorflow as tf

    gauge = training_metrics().gpu_memory
    for index, _device in enumerate(tf.config.list_logical_devices("GPU")):
        try:
            used = tf.config.experimental.get_memory_info(f"GPU:{index}")["current"]
        except (ValueError, RuntimeError):  # a device TensorFlow keeps no statistics for
            continue
        gauge.labels(str(index)).set(used)


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
    """Stops training soon after the job is set CANCELLING, or once it must stop
    without finishing (``JobControl.stopping``: handed back, lease lost); the thread ends
    with the fit, or with the job when a fit raised."""

    def __init__(self, jobs: JobStore, job_id: str, interval: float = 0.5) -> None:
        super().__init__()
        self._jobs, self._job_id, self._interval = jobs, job_id, interval
        self._control = leases.current()
        self._done = threading.Event()
        self.cancelled = False
        self._thread: threading.Thread | None = None

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._done.clear()
        if self._control is not None and self._control.stopping:
            self.model.stop_training = True  # fit cleared it as it began
        self._thread = threading.Thread(target=self._poll, name="cancel-watcher", daemon=True)
        self._thread.start()

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()

    def _poll(self) -> None:
        control, unreachable = self._control, False
        while not self._done.wait(self._interval):
            if control is not None:
                if control.finished.is_set():
                    return
                if control.stopping:
                    self.model.stop_training = True
                    return
            try:
                state = self._jobs.state(self._job_id)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                if not unreachable:  # once per outage: it is polled twice a second
                    log.warning("could not read the job state (%s); retrying", exc)
                unreachable = True
                continue
            except Exception:
                log.warning("could not read the job state", exc_info=True)
                continue
            unreachable = False
            if state is JobState.CANCELLING:
                self.cancelled = True
                self.model.stop_training = True
                return


WEIGHTS_FILE = "weights.weights.h5"
METADATA_FILE = "metadata.json"
KEEP_BACKUPS = 2
STALE_PARTIAL_SECONDS = 3600.0
_KERAS_WEIGHTS = "latest.weights.h5"  # BackupAndRestore's layout, as fitserve wrote it before
_KERAS_METADATA = "training_metadata.json"


@dataclass(frozen=True)
class _Saved:
    """One backup read back: the epochs it completed, and their logs not yet recorded."""

    name: str
    epoch: int
    unrecorded: dict[int, dict[str, float]] = field(default_factory=dict)


@dataclass(frozen=True)
class _Candidate:
    """A backup on disk: its weights and metadata files."""

    name: str
    weights: Path
    metadata: Path
    keras_layout: bool = False

    def read(self) -> _Saved:
        """The metadata, checked (and the weights file against it); ValueError or
        OSError when either is damaged, empty or missing."""
        meta = json.loads(self.metadata.read_text())
        if not isinstance(meta, dict):
            raise ValueError("the metadata is not an object")
        epoch = meta.get("epoch")
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
            raise ValueError(f"the metadata's epoch is {epoch!r}")
        if self.keras_layout:
            if not self.weights.is_file():
                raise ValueError("the weights file is missing")
            return _Saved(self.name, epoch)
        size, digest = _digest(self.weights)
        if size != meta.get("weights_bytes") or digest != meta.get("weights_sha256"):
            raise ValueError("the weights file does not match its metadata")
        unrecorded = {int(k): v for k, v in dict(meta.get("unrecorded") or {}).items()}
        return _Saved(self.name, epoch, unrecorded)


class JobBackup(keras.callbacks.Callback):  # type: ignore[misc]
    """The job's backup: the model's weights and optimizer state and the epochs done,
    after every epoch, for a later attempt to resume from (Keras's BackupAndRestore,
    made safe for workers killed at any instant).

    Each backup is a folder of its own (``gen-<epoch>-<time>``) written under a temporary
    name, flushed to disk (fsync) and renamed into place, so a kill mid-write leaves a
    temporary folder and never a damaged backup; its metadata holds the weights file's
    size and sha256, and the logs of the epochs not yet recorded in Redis (so a next
    attempt can record them: ``JobProgress``). The last two are kept.

    A fit restores the newest backup that reads back whole, trying the older ones (and
    Keras's layout of earlier releases, ``latest.weights.h5`` with ``training_metadata.json``
    and their ``.bkp`` copies) when one is empty, corrupt or does not match: never from
    the start while a good backup is there. With none readable, the fit starts over; the
    unreadable files are left until newer backups replace them.
    """

    def __init__(self, backup_dir: Path) -> None:
        super().__init__()
        self.backup_dir = Path(backup_dir)
        self._control = leases.current()
        self._saved = -1  # the epochs the newest backup this fit wrote completed
        self.restored: _Saved | None = None

    @property
    def unrecorded(self) -> dict[int, dict[str, float]]:
        """The logs of epochs the restored backup holds that may not be recorded."""
        return self.restored.unrecorded if self.restored is not None else {}

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        model = self.model
        if not model.built:
            raise ValueError("a model must be built before fit() to back it up")
        if model.optimizer is not None and not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)  # its state is in the backup
        if self._control is not None:
            self._control.backup = self
        self.restored = self._restore()
        # A private attribute: BackupAndRestore tells fit where to resume only through it
        # (no public API); fit never clears it, so a later fit of the same model (a
        # fine-tune's second phase) must not find an earlier phase's epoch there.
        model._initial_epoch = self.restored.epoch if self.restored else None

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.save(epoch + 1, {epoch + 1: plain_logs(logs)})  # a no-op once JobProgress saved

    def save(self, epochs_done: int, unrecorded: dict[int, dict[str, float]]) -> None:
        """Back up the model as it is after ``epochs_done`` epochs (once per epoch; never
        once the job's lease is another attempt's, which writes its own)."""
        if epochs_done == self._saved or (self._control is not None and self._control.lost):
            return
        folder = self.backup_dir
        folder.mkdir(parents=True, exist_ok=True)
        name = f"gen-{epochs_done:06d}-{time.time_ns():016x}"
        partial = folder / f".{name}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        weights = partial / WEIGHTS_FILE
        self.model.save_weights(str(weights), overwrite=True)
        _fsync(weights)
        size, digest = _digest(weights)
        meta = {
            "format": 1,
            "epoch": epochs_done,
            "weights_bytes": size,
            "weights_sha256": digest,
            "unrecorded": {str(k): v for k, v in unrecorded.items()},
            "saved_at": time.time(),
        }
        metadata = partial / METADATA_FILE
        metadata.write_text(json.dumps(meta))
        _fsync(metadata)
        _fsync(partial)
        os.rename(partial, folder / name)
        _fsync(folder)
        self._saved = epochs_done
        self._prune(name)

    def _restore(self) -> _Saved | None:
        candidates = self._candidates()
        if not candidates:
            return None
        variables = self._variables()
        initial = [keras.ops.convert_to_numpy(v.value) for v in variables]
        for candidate in candidates:
            try:
                saved = candidate.read()
                self._load(candidate.weights)
            except Exception as exc:  # damaged, or not this model's: try the one before
                log.warning(
                    "the job's backup %s is unreadable (%s); trying an older one",
                    candidate.name,
                    exc,
                )
                for variable, value in zip(variables, initial, strict=True):
                    variable.assign(value)  # a load that failed midway changed some
                continue
            log.info("resuming from the job's backup %s (epoch %d)", candidate.name, saved.epoch)
            return saved
        log.warning("no readable backup in %s; the fit starts over", self.backup_dir.name)
        return None

    def _load(self, weights: Path) -> None:
        """Load a weights file (Keras wants the name to end in .weights.h5, which the
        .bkp copies of its old layout do not)."""
        if weights.name.endswith(".weights.h5"):
            self.model.load_weights(str(weights))
            return
        copy = self.backup_dir / ".restoring.weights.h5"
        shutil.copyfile(weights, copy)
        try:
            self.model.load_weights(str(copy))
        finally:
            copy.unlink(missing_ok=True)

    def _variables(self) -> list[Any]:
        optimizer = self.model.optimizer
        return [*self.model.weights, *(optimizer.variables if optimizer is not None else [])]

    def _generations(self) -> list[tuple[tuple[int, int], Path]]:
        """This layout's backups, newest first."""
        found = []
        if self.backup_dir.is_dir():
            for path in self.backup_dir.iterdir():
                parts = path.name.split("-")
                if len(parts) == 3 and parts[0] == "gen" and path.is_dir():
                    try:
                        found.append(((int(parts[1]), int(parts[2], 16)), path))
                    except ValueError:
                        continue
        return sorted(found, reverse=True)

    def _candidates(self) -> list[_Candidate]:
        out = [
            _Candidate(path.name, path / WEIGHTS_FILE, path / METADATA_FILE)
            for _key, path in self._generations()
        ]
        for suffix in ("", ".bkp"):
            weights = self.backup_dir / f"{_KERAS_WEIGHTS}{suffix}"
            metadata = self.backup_dir / f"{_KERAS_METADATA}{suffix}"
            if metadata.exists():
                out.append(_Candidate(metadata.name, weights, metadata, keras_layout=True))
        return out

    def _prune(self, newest: str) -> None:
        """Keep the backup just written and the newest other one that reads; drop the
        rest, Keras's old layout, and temporary folders of writers that died (an hour
        old: a worker cut off from Redis may still be writing, for a moment, beside the
        attempt that took its job over)."""
        kept = 1
        for _key, path in self._generations():
            if path.name == newest:
                continue
            if kept < KEEP_BACKUPS and _metadata_reads(path / METADATA_FILE):
                kept += 1
                continue
            shutil.rmtree(path, ignore_errors=True)
        for path in self.backup_dir.iterdir():
            if path.name.endswith(".partial"):
                if _age(path) > STALE_PARTIAL_SECONDS:
                    shutil.rmtree(path, ignore_errors=True)
            elif path.name.startswith((_KERAS_WEIGHTS, _KERAS_METADATA)):
                path.unlink(missing_ok=True)


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


def _metadata_reads(path: Path) -> bool:
    try:
        return isinstance(json.loads(path.read_text()).get("epoch"), int)
    except (OSError, ValueError, AttributeError):
        return False


def _digest(path: Path) -> tuple[int, str]:
    """Size and sha256 of a file."""
    sha = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            sha.update(chunk)
            size += len(chunk)
    return size, sha.hexdigest()


def _fsync(path: Path) -> None:
    """Flush a file's or a folder's content to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
