"""Runs a training job: data, model, callbacks, fit, export, publish (worker side)."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from service.domain import building
from service.domain.callbacks import CancelWatcher, JobProgress, plain_logs
from service.domain.datasets import DatasetStore
from service.domain.exporting import export_version
from service.domain.jobs import Job
from service.domain.requests import CallbackSpec, DatasetRef, TrainSpec
from service.domain.workspace import Workspace
from service.errors import InvalidRequest, Unimplemented

log = logging.getLogger(__name__)


def run_train(job: Job, spec: TrainSpec, ws: Workspace) -> None:
    """Fit the model a Train request describes and publish it as a new version."""
    job_dir = ws.jobs_dir / job.id
    job_dir.mkdir(parents=True, exist_ok=True)
    if spec.fit.seed is not None:
        keras.utils.set_random_seed(spec.fit.seed)
        tf.config.experimental.enable_op_determinism()
    x, y, sample_weight = load_arrays(ws.datasets, spec.dataset, spec.fit.sample_weight_key)
    model = building.build_model(spec.model)
    building.compile_model(model, spec.compile)
    progress = JobProgress(ws.jobs, job.id, spec.fit.epochs)
    cancel = CancelWatcher(ws.jobs, job.id)
    callbacks = [progress, cancel, *keras_callbacks(spec.callbacks, job_dir)]
    started = time.monotonic()
    _fit(model, spec, x, y, sample_weight, callbacks)
    log.info("fit finished", extra={"seconds": round(time.monotonic() - started, 3)})
    if cancel.cancelled:
        ws.jobs.cancelled(job.id)
        return
    metadata = _metadata(job, spec, progress.last_logs)
    version = export_version(model, ws.models, spec.model_name, job.id, metadata)
    ws.jobs.succeed(job.id, progress.last_logs, version)
    shutil.rmtree(job_dir / "backup", ignore_errors=True)


def _fit(
    model: keras.Model,
    spec: TrainSpec,
    x: Any,
    y: Any,
    sample_weight: Any,
    callbacks: list[keras.callbacks.Callback],
) -> None:
    fit = spec.fit
    model.fit(
        x,
        y,
        sample_weight=sample_weight,
        epochs=fit.epochs,
        batch_size=fit.batch_size,
        shuffle=fit.shuffle,
        validation_split=fit.validation_split,
        class_weight=dict(fit.class_weight) or None,
        initial_epoch=fit.initial_epoch,
        steps_per_epoch=fit.steps_per_epoch or None,
        callbacks=callbacks,
        verbose=0,
    )


def keras_callbacks(spec: CallbackSpec, job_dir: Path) -> list[keras.callbacks.Callback]:
    """Keras's own callbacks a request asked for, plus BackupAndRestore (always on)."""
    out: list[keras.callbacks.Callback] = [
        keras.callbacks.BackupAndRestore(str(job_dir / "backup"), delete_checkpoint=False)
    ]
    if (es := spec.early_stopping).enabled:
        out.append(keras.callbacks.EarlyStopping(**es.model_dump(exclude={"enabled"})))
    if (rl := spec.reduce_lr_on_plateau).enabled:
        out.append(keras.callbacks.ReduceLROnPlateau(**rl.model_dump(exclude={"enabled"})))
    if (mc := spec.model_checkpoint).enabled:
        path = str(job_dir / "checkpoints" / "epoch-{epoch:04d}.keras")
        out.append(keras.callbacks.ModelCheckpoint(path, **mc.model_dump(exclude={"enabled"})))
    if spec.tensorboard:
        out.append(keras.callbacks.TensorBoard(str(job_dir / "tensorboard")))
    if spec.csv_logger:
        out.append(keras.callbacks.CSVLogger(str(job_dir / "history.csv")))
    return out


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
