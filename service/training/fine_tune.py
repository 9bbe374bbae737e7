"""Runs a fine-tune job: a stored version's model.keras, partly frozen, fitted in one or
two phases, published with its lineage (worker side).

Two strategies, as in the Keras transfer-learning guide: train only the last N layers
of the stored model; or freeze the whole stored model but its last layer (the "base")
and put a new head on it, calling the base with ``training=False`` so its BatchNorm
layers keep their moving statistics even once layers are unfrozen. An optional second
phase unfreezes the top K layers of the base (BatchNorm stays frozen) and fits again at
a lower learning rate, continuing the epoch count.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import keras

from service.domain.job_specs import (
    CompileSpec,
    FineTuneSpec,
    FreezeSpec,
    HeadLayersSpec,
    LayerSelectionSpec,
    NewHeadSpec,
)
from service.domain.jobs import Job
from service.domain.model_store import KERAS_FILE
from service.domain.workspace import Workspace
from service.errors import InvalidRequest
from service.training import building, devices, failures, train

PHASE2_BACKUP = "backup-phase2"


@failures.frees_space_when_full
def run_fine_tune(job: Job, spec: FineTuneSpec, ws: Workspace) -> None:
    """Fit a stored version under the request's freeze strategy and publish the result.

    ``run.mixed_precision`` decides how the new version computes, whatever the base did:
    the stored layers are switched to it (each keeps the policy it was saved with
    otherwise), its output layers and a new head stay float32.
    """
    job_dir = train.prepare(job, ws, spec.fit.seed)
    base_version = ws.models.resolve(spec.base.name, spec.base.version, spec.base.alias)
    mixed = spec.run.mixed_precision
    with devices.precision(mixed), train.job_strategy(ws, job).scope():
        base = _load(ws, spec.base.name, base_version)
        devices.set_precision(base, mixed)
        model, body = prepare_model(base, spec.freeze)
        model = devices.float32_outputs(model) if mixed else model
        frozen = frozen_layers(model)
        message = f"frozen layers: {', '.join(frozen) or 'none'}"
        ws.jobs.add_event(job.id, "log", {"level": "INFO", "message": message[:4000]})
        reporting, last = _fit_phases(job, spec, ws, job_dir, model, body)
    if reporting.cancel.cancelled:
        ws.jobs.cancelled(job.id)
        return
    reporting.check_time_limit(job_dir, spec.total_epochs)
    metadata = _metadata(job, spec, base_version) | {"frozen_layers": frozen}
    logs, metadata = train.published_logs(ws, job, reporting.progress, last, metadata)
    train.publish(job, ws, model, spec.model_name, logs, metadata)
    for backup in ("backup", PHASE2_BACKUP):
        shutil.rmtree(job_dir / backup, ignore_errors=True)


def _fit_phases(
    job: Job,
    spec: FineTuneSpec,
    ws: Workspace,
    job_dir: Path,
    model: keras.Model,
    body: keras.Model,
) -> tuple[train.Reporting, list[keras.callbacks.Callback]]:
    """Compile and fit the first phase, then the optional unfreeze phase (unless the
    first was cancelled or reached a stop-at-threshold); returns the job's reporting and
    the Keras callbacks of the last fit."""
    building.compile_model(model, spec.compile)
    # Under MirroredStrategy the rate is a mirrored variable, which float() refuses.
    first_rate = float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))
    train_data, validation = train.load_fit_data(
        ws, job, spec.dataset, spec.fit, model, spec.compile
    )
    reporting = train.job_reporting(
        ws, job, spec.callbacks, spec.total_epochs, spec.fit.initial_epoch, spec.run
    )
    own = train.keras_callbacks(spec.callbacks, job_dir)
    train.fit(model, spec.fit, train_data, validation, reporting.around(own))
    if spec.freeze.second_phase and not reporting.stopped:
        unfreeze_top(body, spec.freeze.unfreeze_top_k)
        building.compile_model(model, second_compile(spec, first_rate))
        own = _second_callbacks(spec, job_dir)
        train.fit(
            model,
            spec.fit,
            train_data,
            validation,
            reporting.around(own),
            epochs=spec.total_epochs,
            initial_epoch=spec.fit.epochs,
        )
    return reporting, own


def prepare_model(base: keras.Model, freeze: FreezeSpec) -> tuple[keras.Model, keras.Model]:
    """The model to fit, and the part whose top layers a second phase unfreezes."""
    if freeze.new_head is not None:
        return with_new_head(base, freeze.new_head)
    if freeze.head_layers is not None:
        return with_head_layers(base, freeze.head_layers)
    if freeze.freeze_layers is not None:
        freeze_selected(base, freeze.freeze_layers)
        return base, base
    freeze_all_but_last(base, freeze.train_last_n_layers or 0)
    return base, base


def freeze_selected(model: keras.Model, selection: LayerSelectionSpec) -> None:
    """Freeze exactly the selected layers (names, or indices counted as
    ``model.layers`` without InputLayers, negative from the end); the rest train."""
    layers = train.trainable_layers(model)
    names = [layer.name for layer in layers]
    chosen: set[int] = set()
    for name in selection.names:
        if name not in names:
            raise InvalidRequest(
                f"freeze.freeze_layers.names: the base has no layer {name!r}; its layers: "
                f"{', '.join(names)}",
                field="freeze.freeze_layers.names",
            )
        chosen.add(names.index(name))
    for index in selection.indices:
        if not -len(layers) <= index < len(layers):
            raise InvalidRequest(
                f"freeze.freeze_layers.indices: {index} is out of range; the base has "
                f"{len(layers)} layers (0 to {len(layers) - 1}, or -1 to -{len(layers)})",
                field="freeze.freeze_layers.indices",
            )
        chosen.add(index % len(layers))
    for i, layer in enumerate(layers):
        layer.trainable = i not in chosen


def with_head_layers(model: keras.Model, head: HeadLayersSpec) -> tuple[keras.Model, keras.Model]:
    """The stored model without its last ``drop_last`` layers (all kept for 0), frozen
    and called in inference mode unless ``train_base``, under the head's layers."""
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise InvalidRequest(
            "freeze.head_layers needs a base model with one input and one output; use "
            "freeze_layers or train_last_n_layers for this model",
            field="freeze.head_layers",
        )
    layers = train.trainable_layers(model)
    if head.drop_last >= len(layers):
        raise InvalidRequest(
            f"freeze.head_layers.drop_last is {head.drop_last}, but the base has only "
            f"{len(layers)} layers",
            field="freeze.head_layers.drop_last",
        )
    top = layers[-1 - head.drop_last]
    body = keras.Model(model.inputs, top.output, name=f"{model.name}_base")
    body.trainable = head.train_base
    source = model.inputs[0]
    inputs = keras.Input(shape=source.shape[1:], dtype=source.dtype, name=source.name)
    x = body(inputs, training=None if head.train_base else False)
    for i, entry in enumerate(head.layers):
        try:
            x = building.layer(i, entry, "freeze.head_layers.layers")(x)
        except ValueError as exc:  # a layer that does not fit the one below it
            field = f"freeze.head_layers.layers[{i}]"
            raise InvalidRequest(f"{field} ({entry['type']}): {exc}", field=field) from None
    return keras.Model(inputs, x, name=f"{model.name}_fine_tuned"), body


def frozen_layers(model: keras.Model, prefix: str = "") -> list[str]:
    """Names of the layers that do not train, a nested model's as ``base/dense``."""
    out: list[str] = []
    for layer in train.trainable_layers(model):
        if isinstance(layer, keras.Model):
            inner = frozen_layers(layer, f"{prefix}{layer.name}/")
            everything = [
                f"{prefix}{layer.name}/{sub.name}" for sub in train.trainable_layers(layer)
            ]
            out += inner if layer.trainable else everything
        elif not layer.trainable:
            out.append(prefix + layer.name)
    return out


def freeze_all_but_last(model: keras.Model, n: int) -> None:
    """Only the last ``n`` layers train; a frozen BatchNorm runs in inference mode."""
    layers = train.trainable_layers(model)
    _check_count(n, layers, "freeze.train_last_n_layers", "the base model")
    for i, layer in enumerate(layers):
        layer.trainable = i >= len(layers) - n


def with_new_head(model: keras.Model, head: NewHeadSpec) -> tuple[keras.Model, keras.Model]:
    """The stored model without its last layer, frozen and called in inference mode,
    under a new Dense head of ``num_classes`` units (float32, as an output layer is
    under mixed precision)."""
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise InvalidRequest(
            "freeze.new_head needs a base model with one input and one output; use "
            "train_last_n_layers for this model",
            field="freeze.new_head",
        )
    body = keras.Model(model.inputs, model.layers[-1].input, name=f"{model.name}_base")
    body.trainable = False
    source = model.inputs[0]
    inputs = keras.Input(shape=source.shape[1:], dtype=source.dtype, name=source.name)
    x = body(inputs, training=False)
    if head.dropout:
        x = keras.layers.Dropout(head.dropout, name="head_dropout")(x)
    dense = keras.layers.Dense(
        head.num_classes, activation=head.activation, dtype=devices.FLOAT32, name="head"
    )
    outputs = dense(x)
    return keras.Model(inputs, outputs, name=f"{model.name}_fine_tuned"), body


def unfreeze_top(body: keras.Model, k: int) -> None:
    """Unfreeze the top ``k`` layers of ``body``, leaving BatchNorm frozen; layers that
    trained already keep training."""
    layers = train.trainable_layers(body)
    _check_count(k, layers, "freeze.unfreeze_top_k", "the part of the model below the head")
    was = [layer.trainable for layer in layers]
    body.trainable = True  # a frozen parent hides its layers' flags: set them one by one
    for i, (layer, before) in enumerate(zip(layers, was, strict=True)):
        layer.trainable = before or i >= len(layers) - k
        if not before:
            _freeze_batch_norm(layer)


def _freeze_batch_norm(layer: keras.layers.Layer) -> None:
    if isinstance(layer, keras.layers.BatchNormalization):
        layer.trainable = False
    for inner in getattr(layer, "layers", []):
        _freeze_batch_norm(inner)


def second_compile(spec: FineTuneSpec, first_rate: float) -> CompileSpec:
    """The first phase's compile options at the second phase's (lower) learning rate."""
    rate = spec.freeze.unfreeze_learning_rate or first_rate / 10
    optimizer = spec.compile.optimizer
    params = optimizer.params | {"learning_rate": rate}
    return spec.compile.model_copy(
        update={"optimizer": optimizer.model_copy(update={"params": params})}
    )


def _check_count(n: int, layers: list[Any], field: str, what: str) -> None:
    if n > len(layers):
        raise InvalidRequest(
            f"{field} is {n}, but {what} has only {len(layers)} layers", field=field
        )


def _second_callbacks(spec: FineTuneSpec, job_dir: Path) -> list[keras.callbacks.Callback]:
    """Fresh Keras callbacks for the second fit, with its own backup; the CSV history
    continues rather than starting over."""
    callbacks = train.keras_callbacks(spec.callbacks, job_dir, PHASE2_BACKUP)
    for callback in callbacks:
        if isinstance(callback, keras.callbacks.CSVLogger):
            callback.append = True
    return callbacks


def _load(ws: Workspace, name: str, version: int) -> keras.Model:
    path = ws.models.path(name, version) / KERAS_FILE
    model: keras.Model = keras.models.load_model(path, compile=False, safe_mode=True)
    return model


def _metadata(job: Job, spec: FineTuneSpec, base_version: int) -> dict[str, Any]:
    return {
        "job_id": job.id,
        "kind": job.kind.value,
        "created_at": time.time(),
        "spec": None,
        "fine_tune": spec.freeze.model_dump(),
        "compile": spec.compile.model_dump(),
        "fit": spec.fit.model_dump(),
        "dataset": spec.dataset.label,
        "labels": spec.run.labels,
        "parent": {"model": spec.base.name, "version": base_version},
        "evaluations": [],
    }
