"""Writes a model version: SavedModel (TF Serving layout), model.keras and fitserve.json."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import keras
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

from service.domain import model_events
from service.domain.dtypes import WIRE_DTYPES
from service.domain.files import write_json_atomic
from service.domain.model_store import KERAS_FILE, METADATA_FILE, ModelStore
from service.plugins.registry import installed, used_plugins
from service.training import failures, plugins


def export_version(
    model: keras.Model,
    store: ModelStore,
    name: str,
    job_id: str,
    metadata: dict[str, Any],
    events: model_events.Publisher | None = None,
) -> int:
    """Stage the whole version, then publish it by rename; once per job id. ``events``
    announces it to inference servers (None: they find it by polling the store).

    A failed export leaves nothing behind: the staged files are removed whatever went
    wrong, and the storage refusing a write (a full disk) fails DISK_FULL naming the file
    from the data folder (``failures.writing``)."""
    if (version := store.published_version(name, job_id)) is not None:
        return version
    data_dir = store.root.parent
    with failures.writing(store.root / name / ".staging" / job_id, data_dir):
        staging = store.staging_dir(name, job_id)
    try:
        with failures.writing(staging, data_dir):
            dropped = training_only_inputs(model)
            if dropped or _listed_outputs(model):
                export_serving(model, staging, dropped)
                metadata = metadata | ({"serving_drops_inputs": dropped} if dropped else {})
            else:
                model.export(str(staging), format="tf_saved_model", verbose=False)
        with failures.writing(staging / KERAS_FILE, data_dir):
            model.save(str(staging / KERAS_FILE))
        metadata = metadata | {
            "signature": read_signature(str(staging)),
            "plugins": used_plugins(
                installed(), model.to_json(), json.dumps(metadata, default=str)
            ),
        }
        with failures.writing(staging / METADATA_FILE, data_dir):
            write_json_atomic(staging / METADATA_FILE, metadata)
        with failures.writing(store.root / name / ".jobs" / job_id, data_dir):  # the marker
            version = store.publish(name, job_id, staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if events is not None:
        events.publish(model_events.ModelEvent(name, version))
    return version


def training_only_inputs(model: keras.Model) -> list[str]:
    """Inputs that only plugin layers calling ``add_loss`` consume: the targets of the
    endpoint-layer pattern, which a served model is not given."""
    classes = plugins.loss_layer_classes()
    if not classes or isinstance(model, keras.Sequential):
        return []
    loss_layers = {str(layer.name) for layer in model.layers if isinstance(layer, classes)}
    if not loss_layers:
        return []
    config = model.get_config()
    consumers: dict[str, set[str]] = {}
    for entry in config.get("layers", []):
        for source in _history_names(entry.get("inbound_nodes", [])):
            consumers.setdefault(source, set()).add(entry["name"])
    inputs = [str(entry[0]) for entry in _input_layers(config.get("input_layers", []))]
    return [n for n in inputs if consumers.get(n) and consumers[n] <= loss_layers]


def _input_layers(value: Any) -> list[list[Any]]:
    """``input_layers`` of a functional config: one ``[name, 0, 0]`` or a structure of them."""
    if isinstance(value, list | tuple) and value and isinstance(value[0], str):
        return [list(value)]
    if isinstance(value, dict):
        return [e for v in value.values() for e in _input_layers(v)]
    if isinstance(value, list | tuple):
        return [e for v in value for e in _input_layers(v)]
    return []


def _history_names(node: Any) -> set[str]:
    """Names of the layers whose outputs a layer's inbound nodes take."""
    if isinstance(node, list | tuple):
        return set().union(*map(_history_names, node)) if node else set()
    if not isinstance(node, dict):
        return set()
    if node.get("class_name") == "__keras_tensor__":
        history = node.get("config", {}).get("keras_history") or []
        return {str(history[0])} if history else set()
    return set().union(*map(_history_names, node.values())) if node else set()


def _listed_outputs(model: keras.Model) -> bool:
    """Several outputs given as a list: ``model.export`` would call them output_0, ..."""
    return len(model.outputs) > 1 and isinstance(model.output, list | tuple)


def export_serving(model: keras.Model, path: Path, dropped: list[str]) -> None:
    """A SavedModel whose serving signature has every input but ``dropped``, which are
    fed zeros (the loss layers that take them only add a training loss), and whose
    outputs are named as the model names them (``cls``, ``reg``; not output_0, ...)."""
    by_name = {t.name: t for t in model.inputs}
    kept = [n for n in by_name if n not in dropped]
    if not kept:
        raise ValueError("every input of the model feeds only loss layers; nothing to serve")
    signature = [tf.TensorSpec(by_name[n].shape, by_name[n].dtype, name=n) for n in kept]

    def serve(*args: tf.Tensor) -> Any:
        batch = tf.shape(args[0])[0]
        feed: dict[str, tf.Tensor] = dict(zip(kept, args, strict=True))
        for n in dropped:
            shape = [1 if d is None else d for d in by_name[n].shape[1:]]
            feed[n] = tf.zeros(tf.concat([[batch], shape], 0), dtype=by_name[n].dtype)
        # In the structure the model was built with (a tensor, a list or a dict).
        structured = keras.tree.map_structure(lambda t: feed[t.name], model.input)
        out = model(structured, training=False)
        if isinstance(out, list | tuple):
            return dict(zip(model.output_names, out, strict=True))
        return out

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serve", serve, input_signature=signature)
    archive.write_out(str(path), verbose=False)


def read_signature(path: str) -> dict[str, list[dict[str, Any]]]:
    """Inputs and outputs of the serving_default signature, as plain data.

    Read from saved_model.pb itself: loading the SavedModel would register its functions in
    this long-lived worker's eager context for good, a few MB per job.
    """
    saved = saved_model_pb2.SavedModel()
    saved.ParseFromString((Path(path) / "saved_model.pb").read_bytes())
    signature = saved.meta_graphs[0].signature_def["serving_default"]
    return {
        "inputs": [_spec(n, signature.inputs[n]) for n in _natural(signature.inputs)],
        "outputs": [_spec(n, signature.outputs[n]) for n in _natural(signature.outputs)],
    }


def _natural(names: Iterable[str]) -> list[str]:
    """Names in TF's order (sorted), with output_10 after output_9."""
    return sorted(
        names, key=lambda n: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", n)]
    )


def _spec(name: str, info: Any) -> dict[str, Any]:
    dtype = tf.dtypes.as_dtype(info.dtype).name
    dims = [] if info.tensor_shape.unknown_rank else info.tensor_shape.dim
    return {
        "name": name,
        "dtype": WIRE_DTYPES.get(dtype, dtype.upper()),
        "shape": [-1 if d.size < 0 else int(d.size) for d in dims],
    }
