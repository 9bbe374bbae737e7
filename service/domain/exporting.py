"""Writes a model version: SavedModel (TF Serving layout), model.keras and fitserve.json."""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

from service.config import Settings
from service.domain import model_events
from service.domain.arrays import WIRE_DTYPES
from service.domain.files import write_json_atomic
from service.domain.model_store import KERAS_FILE, METADATA_FILE, ModelStore


def export_version(
    model: keras.Model, store: ModelStore, name: str, job_id: str, metadata: dict[str, Any]
) -> int:
    """Stage the whole version, then publish it by rename; once per job id."""
    if (version := store.published_version(name, job_id)) is not None:
        return version
    staging = store.staging_dir(name, job_id)
    model.export(str(staging), format="tf_saved_model", verbose=False)
    model.save(str(staging / KERAS_FILE))
    metadata = metadata | {"signature": read_signature(str(staging))}
    write_json_atomic(staging / METADATA_FILE, metadata)
    version = store.publish(name, job_id, staging)
    model_events.publish(Settings().redis_url, model_events.ModelEvent(name, version))
    return version


def read_signature(path: str) -> dict[str, list[dict[str, Any]]]:
    """Inputs and outputs of the serving_default signature, as plain data."""
    fn = tf.saved_model.load(path).signatures["serving_default"]
    inputs = fn.structured_input_signature[1]
    return {
        "inputs": [_spec(n, s) for n, s in inputs.items()],
        "outputs": [_spec(n, s) for n, s in fn.structured_outputs.items()],
    }


def _spec(name: str, spec: tf.TensorSpec) -> dict[str, Any]:
    dtype = spec.dtype.name
    return {
        "name": name,
        "dtype": WIRE_DTYPES.get(dtype, dtype.upper()),
        "shape": [-1 if d is None else int(d) for d in spec.shape.as_list()],
    }
