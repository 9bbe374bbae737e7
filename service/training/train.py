"""Runs a training job: data, model, callbacks, fit, export, publish (worker side)."""

from __future__ import annotations

import importlib.util
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import tensorflow as tf

from service.domain.job_specs import (
    CallbackSpec,
    CompileSpec,
    DatasetRef,
    FitSpec,
    ModelCheckpointSpec,
    ModelSpec,
    RunSpec,
    TrainSpec,
    check_class_ids,
)
from service.domain.jobs import Job
from service.domain.workspace import Workspace
from service.errors import FailedPrecondition
from service.training import building, data, devices, failures, plugins
from service.training.callbacks import (
    BatchProgress,
    CancelWatcher,
    JobBackup,
    JobProgress,
    Thresholds,
    TimeLimit,
    plain_logs,
    time_limit,
)
from service.training.exporting import export_version

log = logging.getLogger(__name__)


@failures.frees_space_when_full
def run_train(job: Job, spec: TrainSpec, ws: Workspace) -> None:
    """Fit the model a Train request describes and publish it as a new version."""
    job_dir = prepare(job, ws, spec.fit.seed)
    with devices.precision(spec.run.mixed_precision), job_strategy(ws, job).scope():
        model = build(spec.model, spec.run.mixed_precision)
        building.compile_model(model, spec.compile)
        train_data, validation = load_fit_data(ws, job, spec.dataset, spec.fit, model, spec.compile)
        reporting = job_reporting(
            ws, job, spec.callbacks, spec.fit.epochs, spec.fit.initial_epoch, spec.run
        )
        own = keras_callbacks(spec.callbacks, job_dir)
        fit(model, spec.fit, train_data, validation, reporting.around(own))
    if reporting.cancel.cancelled:
        ws.jobs.cancelled(job.id)
        return
    reporting.check_time_limit(job_dir, spec.fit.epochs)
    logs, metadata = published_logs(ws, job, reporting.progress, own, _metadata(job, spec))
    publish(job, ws, model, spec.model_name, logs, metadata)
    shutil.rmtree(job_dir / "backup", ignore_errors=True)


def build(spec: ModelSpec, mixed_precision: str) -> keras.Model:
    """The model of a spec; under mixed precision its output computes in float32, as the
    loss and the exported signature need. A layer list is our own format, so its last
    layer simply gets ``dtype="float32"`` (unless the request set one). A Keras config
    names each layer's policy (``to_json`` writes float32 for a float32 model), so its
    float32 layers are switched to the job's policy, its output layers kept float32."""
    if not mixed_precision:
        return building.build_model(spec)
    if spec.layers:
        last = {"dtype": devices.FLOAT32} | spec.layers[-1]
        return building.build_model(spec.model_copy(update={"layers": [*spec.layers[:-1], last]}))
    model = building.build_model(spec)
    devices.set_precision(model, mixed_precision)
    return devices.float32_outputs(model)


def job_strategy(ws: Workspace, job: Job) -> tf.distribute.Strategy:
    """The distribution strategy of this worker's devices; a job on several replicas says
    so in its event stream."""
    chosen = devices.strategy()
    message = devices.describe(chosen)
    log.info(message)
    if chosen.num_replicas_in_sync > 1:
        ws.jobs.add_event(job.id, "log", {"level": "INFO", "message": message})
    return chosen


def prepare(job: Job, ws: Workspace, seed_value: int | None) -> Path:
    """The job's folder (backups, checkpoints, logs), and the seed set."""
    job_dir = ws.jobs_dir / job.id
    job_dir.mkdir(parents=True, exist_ok=True)
    seed(seed_value)
    return job_dir


def seed(value: int | None) -> None:
    """Seed Python, NumPy and TF and make ops deterministic: same request, same weights."""
    if value is not None:
        keras.utils.set_random_seed(value)
        tf.config.experimental.enable_op_determinism()


def load_fit_data(
    ws: Workspace,
    job: Job,
    ref: DatasetRef,
    fit_spec: FitSpec,
    model: keras.Model,
    compile_spec: CompileSpec,
) -> tuple[data.FitData, data.FitData | None]:
    """Training and validation data, checked against the model before fit; a uri saved
    already batched is used as it is, and the job says so."""
    if len(model.outputs) == 1 and isinstance(units := model.outputs[0].shape[-1], int):
        check_class_ids(fit_spec, units)
    ranks = input_ranks(model)
    train_data = data.load(
        ws,
        ref,
        fit_spec.batch_size,
        fit_spec.sample_weight_key,
        fit_spec.shuffle,
        fit_spec.seed,
        input_ranks=ranks,
    )
    data.check(model, compile_spec, train_data)
    validation = None
    if fit_spec.validation_data is not None:
        validation = data.load(ws, fit_spec.validation_data, fit_spec.batch_size, input_ranks=ranks)
        data.check(model, compile_spec, validation)
    for what, loaded in (("dataset", train_data), ("fit.validation_data", validation)):
        if loaded is not None:
            report_data(ws, job, what, loaded)
    return train_data, validation


def input_ranks(model: keras.Model) -> dict[str, int]:
    """Each model input's rank, batch dimension included."""
    return {t.name: len(t.shape) for t in model.inputs}


def report_data(ws: Workspace, job: Job, what: str, loaded: data.FitData) -> None:
    """Say in the job's events what it does with its data that the request did not spell
    out: a uri used as saved batches, weights found by name, arrays it does not use."""
    notes: list[tuple[str, str]] = []
    if loaded.prebatched:
        notes.append(
            (
                "INFO",
                f"{what} {loaded.uri!r} was saved already batched (its elements "
                "have the model inputs' full rank): it is used batch by batch as "
                "saved, so fit.batch_size does not apply",
            )
        )
    if loaded.weights_found:
        notes.append(
            (
                "INFO",
                f"{what}: array {loaded.weights_found!r} weights each sample "
                "(Keras's sample_weight); set fit.sample_weight_key to use another",
            )
        )
    if loaded.unused:
        names = ", ".join(map(repr, loaded.unused))
        notes.append(
            (
                "WARNING",
                f"{what}: array {names} is not used: it is neither an "
                "input, a target nor the sample weights (name it in input_keys, "
                "target_keys or fit.sample_weight_key to use it)",
            )
        )
    for level, message in notes:
        log.log(logging.getLevelNamesMapping()[level], message)
        ws.jobs.add_event(job.id, "log", {"level": level, "message": message})


@dataclass(frozen=True)
class Reporting:
    """The callbacks a job keeps across all its fits, so the epoch history, a cancel and
    a reached threshold carry over from one phase to the next."""

    progress: JobProgress
    cancel: CancelWatcher
    thresholds: Thresholds
    plugins: list[keras.callbacks.Callback]
    batches: list[keras.callbacks.Callback]
    time_limit: TimeLimit | None = None

    def around(
        self, keras_callbacks: list[keras.callbacks.Callback]
    ) -> list[keras.callbacks.Callback]:
        """Every callback of one fit, in the order Keras calls them: plugin callbacks
        first, so what they add to the epoch logs is recorded and can be watched."""
        return [
            *self.plugins,
            self.progress,
            self.thresholds,
            self.cancel,
            *([self.time_limit] if self.time_limit is not None else []),
            *keras_callbacks,
            *self.batches,
        ]

    @property
    def stopped(self) -> bool:
        """Cancelled, a stop-at-threshold or the time limit reached: no further phase runs."""
        timed_out = self.time_limit is not None and self.time_limit.reached
        return self.cancel.cancelled or self.thresholds.stopped_by is not None or timed_out

    def check_time_limit(self, job_dir: Path, epochs: int) -> None:
        """Fail the job (TimeLimitReached) if its time limit stopped it, with its
        BackupAndRestore state removed (a failed job never resumes); the files the
        request asked for (checkpoints, logs) stay in the job folder."""
        if self.time_limit is None or not self.time_limit.reached:
            return
        for backup in job_dir.glob("backup*"):
            shutil.rmtree(backup, ignore_errors=True)
        self.time_limit.check(epochs)


def job_reporting(
    ws: Workspace,
    job: Job,
    spec: CallbackSpec,
    epochs: int,
    initial_epoch: int = 0,
    run: RunSpec | None = None,
) -> Reporting:
    """The job's own callbacks, its thresholds and plugin callbacks, its time limit (from
    when this worker started it), and throttled batch progress only when asked (a batch
    hook slows every step)."""
    batches = (
        [BatchProgress(ws.jobs, job.id, spec.batch_progress_interval_seconds)]
        if spec.batch_progress
        else []
    )
    return Reporting(
        progress=JobProgress(
            ws.jobs,
            job.id,
            epochs,
            initial_epoch,
            kind=job.kind.value.lower(),
            batch_size=FitSpec.model_validate(job.request.get("fit") or {}).batch_size,
        ),
        cancel=CancelWatcher(ws.jobs, job.id),
        thresholds=Thresholds(ws.jobs, job.id, list(spec.thresholds)),
        plugins=plugins.callbacks(list(spec.plugins), ws.jobs, job.id),
        batches=batches,
        time_limit=time_limit(run.time_limit_seconds, job.started_at) if run else None,
    )


def publish(
    job: Job,
    ws: Workspace,
    model: keras.Model,
    name: str,
    logs: dict[str, float],
    metadata: dict[str, Any],
) -> None:
    """Export the fitted model as the job's version and mark the job SUCCEEDED."""
    if not logs and (history := ws.jobs.get(job.id).history):
        logs = history[-1]["logs"]  # resumed after the last epoch: nothing left to fit
    metadata = metadata | {"metrics": plain_logs(logs), "num_layers": len(trainable_layers(model))}
    version = export_version(model, ws.models, name, job.id, metadata, ws.model_events)
    ws.jobs.succeed(job.id, logs, version)


def published_logs(
    ws: Workspace,
    job: Job,
    progress: JobProgress,
    callbacks: list[keras.callbacks.Callback],
    metadata: dict[str, Any],
) -> tuple[dict[str, float], dict[str, Any]]:
    """The metrics of the weights being published: the last epoch's, or, when
    EarlyStopping restored the best epoch's weights, that epoch's (recorded as
    ``metrics_epoch`` in fitserve.json, and said in the job's events)."""
    stopper = next((c for c in callbacks if isinstance(c, keras.callbacks.EarlyStopping)), None)
    if stopper is None or not stopper.restore_best_weights or stopper.best_weights is None:
        return progress.last_logs, metadata
    best = int(stopper.best_epoch) + 1
    logs = progress.logs_by_epoch.get(best)
    if logs is None:  # an epoch of an earlier attempt (resumed from a backup)
        logs = next((e["logs"] for e in ws.jobs.get(job.id).history if e["epoch"] == best), None)
    if logs is None:
        return progress.last_logs, metadata
    message = f"restored the weights of epoch {best}, the best {stopper.monitor}; published those"
    ws.jobs.add_event(job.id, "log", {"level": "INFO", "message": message})
    return logs, metadata | {"metrics_epoch": best}


def trainable_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The layers freezing counts: ``model.layers`` without InputLayers (which a
    functional model lists and a Sequential one does not)."""
    return [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]


def fit(
    model: keras.Model,
    fit_spec: FitSpec,
    train_data: data.FitData,
    validation: data.FitData | None,
    callbacks: list[keras.callbacks.Callback],
    *,
    epochs: int | None = None,
    initial_epoch: int | None = None,
) -> None:
    """``model.fit`` with a request's fit options; ``epochs``/``initial_epoch`` override
    them for a later phase that continues the epoch count."""
    common: dict[str, Any] = {
        "epochs": epochs or fit_spec.epochs,
        "initial_epoch": fit_spec.initial_epoch if initial_epoch is None else initial_epoch,
        "validation_data": validation.validation() if validation else None,
        "class_weight": dict(fit_spec.class_weight) or None,
        "steps_per_epoch": fit_spec.steps_per_epoch or None,
        "callbacks": callbacks,
        "verbose": 0,
    }
    started = time.monotonic()
    with data.read_errors(train_data, validation):
        if train_data.streamed:  # batched and shuffled by tf.data already
            model.fit(train_data.x, **common)
        else:
            model.fit(
                train_data.x,
                train_data.y,
                sample_weight=train_data.sample_weight,
                batch_size=fit_spec.batch_size,
                shuffle=fit_spec.shuffle,
                validation_split=fit_spec.validation_split,
                **common,
            )
    log.info("fit finished", extra={"seconds": round(time.monotonic() - started, 3)})


def keras_callbacks(
    spec: CallbackSpec, job_dir: Path, backup: str = "backup"
) -> list[keras.callbacks.Callback]:
    """Keras's own callbacks a request asked for, plus BackupAndRestore (always on)."""
    out: list[keras.callbacks.Callback] = [JobBackup(job_dir / backup)]
    if (es := spec.early_stopping).enabled:
        out.append(keras.callbacks.EarlyStopping(**es.model_dump(exclude={"enabled"})))
    if (rl := spec.reduce_lr_on_plateau).enabled:
        out.append(keras.callbacks.ReduceLROnPlateau(**rl.model_dump(exclude={"enabled"})))
    if (mc := spec.model_checkpoint).enabled:
        out.append(_checkpoint(mc, job_dir / "checkpoints"))
    if spec.tensorboard:
        _require_tensorboard()
        out.append(keras.callbacks.TensorBoard(str(job_dir / "tensorboard")))
    if spec.csv_logger:
        out.append(keras.callbacks.CSVLogger(str(job_dir / "history.csv")))
    return out


def _checkpoint(spec: ModelCheckpointSpec, folder: Path) -> keras.callbacks.ModelCheckpoint:
    """Keras's ModelCheckpoint into the job's checkpoints folder: a file per epoch (or
    per ``save_freq_batches`` batches), whole models or, with ``save_weights_only``,
    weights (Keras wants ``.weights.h5`` for those)."""
    name = "epoch-{epoch:04d}"
    if spec.save_freq_batches is not None:
        name += "-batch-{batch:06d}"
    suffix = ".weights.h5" if spec.save_weights_only else ".keras"
    return keras.callbacks.ModelCheckpoint(
        str(folder / (name + suffix)),
        monitor=spec.monitor,
        save_best_only=spec.save_best_only,
        mode=spec.mode,
        save_weights_only=spec.save_weights_only,
        save_freq=spec.save_freq_batches or "epoch",
    )


def _require_tensorboard() -> None:
    """Keras writes TensorBoard logs through the tensorboard package; without it the job
    would fail after its first epoch with an error naming neither the option nor the fix."""
    if importlib.util.find_spec("tensorboard") is None:
        raise FailedPrecondition(
            "callbacks.tensorboard needs the 'tensorboard' package on the worker, which is "
            "not installed; install it there (pip install tensorboard) or turn tensorboard off"
        )


def _metadata(job: Job, spec: TrainSpec) -> dict[str, Any]:
    return {
        "job_id": job.id,
        "kind": job.kind.value,
        "created_at": time.time(),
        "spec": spec.model.model_dump(),
        "compile": spec.compile.model_dump(),
        "fit": spec.fit.model_dump(),
        "dataset": spec.dataset.label,
        "labels": spec.run.labels,
        "parent": None,
        "evaluations": [],
    }
