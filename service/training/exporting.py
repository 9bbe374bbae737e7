"""Writes a model version: SavedModel (TF Serving layout), model.keras and fitserve.json."""

from __future__ import annotations

import re
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


def export_version(
    model: keras.Model,
    store: ModelStore,
    name: str,
    job_id: str,
    metadata: dict[str, Any],
    events: model_events.Publisher | None = None,
) -> int:
    """Stage the whole version, then publish it by rename; once per job id. ``events``
    announces it to inference servers (None: they find it by polling the store)."""
    if (version := store.published_version(name, job_id)) is not None:
        return version
    staging = store.staging_dir(name, job_id)
    model.export(str(staging), format="tf_saved_model", verbose=False)
    model.save(str(staging / KERAS_FILE))
    metadata = metadata | {"signature": read_signature(str(staging))}
    write_json_atomic(staging / METADATA_FILE, metadata)
    version = store.publish(name, job_id, staging)
    if events is not None:
        events.publish(model_events.ModelEvent(name, version))
    return version


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
