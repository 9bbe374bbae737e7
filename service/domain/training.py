"""Runs a training job: data, model, callbacks, fit, export, publish (worker side)."""

from __future__ import annotations

import importlib.util
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from service.domain import building, shapes
from service.domain.callbacks import CancelWatcher, JobBackup, JobProgress, plain_logs
from service.domain.datasets import DatasetStore
from service.domain.exporting import export_version
from service.domain.jobs import Job
from service.domain.requests import CallbackSpec, CompileSpec, DatasetRef, TrainSpec
from service.domain.workspace import Workspace
from service.errors import FailedPrecondition, InvalidRequest, Unimplemented

log = logging.getLogger(__name__)


def run_train(job: Job, spec: TrainSpec, ws: Workspace) -> None:
    """Fit the model a Train request describes and publish it as a new version."""
    job_dir = ws.jobs_dir / job.id
    job_dir.mkdir(parents=True, exist_ok=True)
    seed(spec.fit.seed)
    model = building.build_model(spec.model)
    building.compile_model(model, spec.compile)
    data, validation = _load_data(ws.datasets, spec, model)
    # Progress first: an epoch is recorded before its backup is written, so a resumed
    # attempt redoes (and trims) at most the last recorded epoch, never skips one.
    progress = JobProgress(ws.jobs, job.id, spec.fit.epochs, spec.fit.initial_epoch)
    cancel = CancelWatcher(ws.jobs, job.id)
    callbacks = [progress, cancel, *keras_callbacks(spec.callbacks, job_dir)]
    started = time.monotonic()
    _fit(model, spec, data, validation, callbacks)
    log.info("fit finished", extra={"seconds": round(time.monotonic() - started, 3)})
    if cancel.cancelled:
        ws.jobs.cancelled(job.id)
        return
    _publish(job, spec, ws, model, progress.last_logs)
    shutil.rmtree(job_dir / "backup", ignore_errors=True)


def seed(value: int | None) -> None:
    """Seed Python, NumPy and TF and make ops deterministic: same request, same weights."""
    if value is not None:
        keras.utils.set_random_seed(value)
        tf.config.experimental.enable_op_determinism()


def _load_data(
    datasets: DatasetStore, spec: TrainSpec, model: keras.Model
) -> tuple[tuple[Any, Any, Any], tuple[Any, Any] | None]:
    x, y, sample_weight = load_arrays(datasets, spec.dataset, spec.fit.sample_weight_key)
    check_data(model, spec.compile, x, y)
    validation = None
    if spec.fit.validation_data is not None:
        xv, yv, _ = load_arrays(datasets, spec.fit.validation_data, "")
        check_data(model, spec.compile, xv, yv)
        validation = (xv, yv)
    return (x, y, sample_weight), validation


def _publish(
    job: Job, spec: TrainSpec, ws: Workspace, model: keras.Model, logs: dict[str, float]
) -> None:
    if not logs and (history := ws.jobs.get(job.id).history):
        logs = history[-1]["logs"]  # resumed after the last epoch: nothing left to fit
    version = export_version(model, ws.models, spec.model_name, job.id, _metadata(job, spec, logs))
    ws.jobs.succeed(job.id, logs, version)


def check_data(model: keras.Model, compile_spec: CompileSpec, x: Any, y: Any) -> None:
    """Fail before fit, with both shapes named, when the data cannot fit the model."""
    shapes.check_inputs({t.name: tuple(t.shape) for t in model.inputs}, x)
    if len(model.outputs) == 1 and compile_spec.loss is not None:
        shapes.check_targets(tuple(model.outputs[0].shape), compile_spec.loss.name, y)


def _fit(
    model: keras.Model,
    spec: TrainSpec,
    data: tuple[Any, Any, Any],
    validation: tuple[Any, Any] | None,
    callbacks: list[keras.callbacks.Callback],
) -> None:
    fit = spec.fit
    x, y, sample_weight = data
    model.fit(
        x,
        y,
        sample_weight=sample_weight,
        epochs=fit.epochs,
        batch_size=fit.batch_size,
        shuffle=fit.shuffle,
        validation_split=fit.validation_split,
        validation_data=validation,
        class_weight=dict(fit.class_weight) or None,
        initial_epoch=fit.initial_epoch,
        steps_per_epoch=fit.steps_per_epoch or None,
        callbacks=callbacks,
        verbose=0,
    )


def keras_callbacks(spec: CallbackSpec, job_dir: Path) -> list[keras.callbacks.Callback]:
    """Keras's own callbacks a request asked for, plus BackupAndRestore (always on)."""
    out: list[keras.callbacks.Callback] = [JobBackup(job_dir / "backup")]
    if (es := spec.early_stopping).enabled:
        out.append(keras.callbacks.EarlyStopping(**es.model_dump(exclude={"enabled"})))
    if (rl := spec.reduce_lr_on_plateau).enabled:
        out.append(keras.callbacks.ReduceLROnPlateau(**rl.model_dump(exclude={"enabled"})))
    if (mc := spec.model_checkpoint).enabled:
        path = str(job_dir / "checkpoints" / "epoch-{epoch:04d}.keras")
        out.append(keras.callbacks.ModelCheckpoint(path, **mc.model_dump(exclude={"enabled"})))
    if spec.tensorboard:
        _require_tensorboard()
        out.append(keras.callbacks.TensorBoard(str(job_dir / "tensorboard")))
    if spec.csv_logger:
        out.append(keras.callbacks.CSVLogger(str(job_dir / "history.csv")))
    return out


def _require_tensorboard() -> None:
    """Keras writes TensorBoard logs through the tensorboard package; without it the job
    would fail after its first epoch with an error naming neither the option nor the fix."""
    if importlib.util.find_spec("tensorboard") is None:
        raise FailedPrecondition(
            "callbacks.tensorboard needs the 'tensorboard' package on the worker, which is "
            "not installed; install it there (pip install tensorboard) or turn tensorboard off"
        )


def load_arrays(
    datasets: DatasetStore, ref: DatasetRef, sample_weight_key: str
) -> tuple[Any, Any, Any]:
    """Inputs, targets and sample weights of an uploaded dataset."""
    if not ref.dataset:
        raise Unimplemented(
            "datasets by uri or built-in name are not supported yet; upload an .npz"
        )
    info = datasets.get(ref.dataset)
    with np.load(datasets.path(info.id), allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    targets = ref.target_keys or ["y"]
    weights = [sample_weight_key] if sample_weight_key else []
    inputs = ref.input_keys or (
        ["x"] if "x" in arrays else [k for k in arrays if k not in (*targets, *weights)]
    )
    _require(arrays, [*inputs, *targets, *weights], info.name or info.id)
    x = arrays[inputs[0]] if len(inputs) == 1 else {k: arrays[k] for k in inputs}
    y = arrays[targets[0]] if len(targets) == 1 else {k: arrays[k] for k in targets}
    return x, y, arrays[sample_weight_key] if sample_weight_key else None


def _require(arrays: dict[str, Any], keys: list[str], dataset: str) -> None:
    missing = [k for k in keys if k not in arrays]
    if missing:
        raise InvalidRequest(
            f"dataset {dataset!r} has no array {missing[0]!r}; it has {', '.join(sorted(arrays))}"
        )


def _metadata(job: Job, spec: TrainSpec, logs: dict[str, float]) -> dict[str, Any]:
    return {
        "job_id": job.id,
        "kind": job.kind.value,
        "created_at": time.time(),
        "spec": spec.model.model_dump(),
        "compile": spec.compile.model_dump(),
        "fit": spec.fit.model_dump(),
        "dataset": spec.dataset.dataset,
        "metrics": plain_logs(logs),
        "labels": spec.run.labels,
        "parent": None,
        "evaluations": [],
    }
