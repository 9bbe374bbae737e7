"""A job's data in the form Keras takes (worker side: imports TensorFlow).

Uploaded and built-in datasets are arrays (small enough to hold: Keras batches and
splits them itself); a uri is read lazily through tf.data (``Dataset.load`` or
TFRecord files), batched and prefetched, so data larger than memory streams through.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from service.domain import dataset_sources, shapes
from service.domain.datasets import DatasetStore
from service.domain.keras_datasets import load_builtin
from service.domain.requests import CompileSpec, DatasetRef, parse_feature
from service.domain.workspace import Workspace
from service.errors import InvalidRequest

SHUFFLE_BUFFER = 10_000
_TF_DTYPES = {"float32": tf.float32, "int64": tf.int64, "string": tf.string}


@dataclass(frozen=True)
class FitData:
    """Arrays ``x, y, sample_weight``, or a batched tf.data.Dataset in ``x``."""

    x: Any
    y: Any = None
    sample_weight: Any = None

    @property
    def streamed(self) -> bool:
        return isinstance(self.x, tf.data.Dataset)

    def validation(self) -> Any:
        """The form ``model.fit(validation_data=...)`` takes."""
        return self.x if self.streamed else (self.x, self.y)


def load(
    ws: Workspace,
    ref: DatasetRef,
    batch_size: int,
    sample_weight_key: str = "",
    shuffle: bool = False,
    seed: int | None = None,
) -> FitData:
    """The data a ref names; a stream is shuffled through a buffer when asked."""
    if ref.uri:
        stream = _stream(ws, ref, sample_weight_key)
        if shuffle:
            stream = stream.shuffle(SHUFFLE_BUFFER, seed=seed)
        return FitData(_batched(stream, batch_size, ref))
    if ref.builtin:
        if sample_weight_key:
            raise InvalidRequest("fit.sample_weight_key is not available for built-in datasets")
        x, y = load_builtin(ws.keras_datasets_dir, ref.builtin, ref.split or "train")
        return FitData(x, y)
    return FitData(*load_arrays(ws.datasets, ref, sample_weight_key))


def check(model: keras.Model, compile_spec: CompileSpec, data: FitData) -> None:
    """Fail before fit, with both shapes named, when the data cannot fit the model."""
    x, y = _example_arrays(data) if data.streamed else (data.x, data.y)
    if x is None:
        return
    shapes.check_inputs({t.name: tuple(t.shape) for t in model.inputs}, x)
    if len(model.outputs) == 1 and compile_spec.loss is not None and y is not None:
        shapes.check_targets(tuple(model.outputs[0].shape), compile_spec.loss.name, y)


def load_arrays(
    datasets: DatasetStore, ref: DatasetRef, sample_weight_key: str
) -> tuple[Any, Any, Any]:
    """Inputs, targets and sample weights of an uploaded dataset."""
    info = datasets.get(ref.dataset)
    with np.load(datasets.path(info.id), allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    inputs, targets = _keys(ref, list(arrays), sample_weight_key, info.name or info.id)
    x = arrays[inputs[0]] if len(inputs) == 1 else {k: arrays[k] for k in inputs}
    y = arrays[targets[0]] if len(targets) == 1 else {k: arrays[k] for k in targets}
    return x, y, arrays[sample_weight_key] if sample_weight_key else None


def _keys(
    ref: DatasetRef, names: list[str], sample_weight_key: str, dataset: str
) -> tuple[list[str], list[str]]:
    """Input and target names: as given, else "x"/"y", else every other array as input."""
    targets = ref.target_keys or ["y"]
    weights = [sample_weight_key] if sample_weight_key else []
    inputs = ref.input_keys or (
        ["x"] if "x" in names else [k for k in names if k not in (*targets, *weights)]
    )
    missing = [k for k in (*inputs, *targets, *weights) if k not in names]
    if missing:
        raise InvalidRequest(
            f"dataset {dataset!r} has no array {missing[0]!r}; it has {', '.join(sorted(names))}"
        )
    return inputs, targets


def _stream(ws: Workspace, ref: DatasetRef, sample_weight_key: str) -> tf.data.Dataset:
    """The elements of a uri as ``(x, y[, w])``, unbatched."""
    path = dataset_sources.check_uri(ref, ws.dataset_roots)
    if dataset_sources.uri_format(path) is dataset_sources.UriFormat.SAVED:
        ds = tf.data.Dataset.load(str(path))
    else:
        ds = _tfrecords(ref, dataset_sources.tfrecord_files(path))
    return ds.map(_selector(ref, ds.element_spec, sample_weight_key), tf.data.AUTOTUNE)


def _batched(ds: tf.data.Dataset, batch_size: int, ref: DatasetRef) -> tf.data.Dataset:
    ds = ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
    _probe(ds, ref)
    return ds


def _tfrecords(ref: DatasetRef, files: list[Any]) -> tf.data.Dataset:
    features = {}
    for name, text in ref.feature_spec.items():
        dtype, shape = parse_feature(text)
        features[name] = tf.io.FixedLenFeature(shape, _TF_DTYPES[dtype])
    records = tf.data.TFRecordDataset([str(f) for f in files], num_parallel_reads=tf.data.AUTOTUNE)
    return records.map(lambda r: tf.io.parse_single_example(r, features), tf.data.AUTOTUNE)


def _selector(ref: DatasetRef, spec: Any, sample_weight_key: str) -> Any:
    """Elements as Keras wants them: ``(x, y)`` or ``(x, y, w)``; dict elements are
    picked by name like the arrays of an upload."""
    if not isinstance(spec, Mapping):
        if ref.input_keys or ref.target_keys or sample_weight_key:
            raise InvalidRequest(
                f"dataset.uri {ref.uri!r} holds unnamed (tuple) elements; input_keys, "
                "target_keys and sample_weight_key need elements that are dicts"
            )
        return lambda *element: element
    inputs, targets = _keys(ref, list(spec), sample_weight_key, ref.uri)

    def pick(element: dict[str, Any]) -> tuple[Any, ...]:
        x = element[inputs[0]] if len(inputs) == 1 else {k: element[k] for k in inputs}
        y = element[targets[0]] if len(targets) == 1 else {k: element[k] for k in targets}
        return (x, y, element[sample_weight_key]) if sample_weight_key else (x, y)

    return pick


def _probe(ds: tf.data.Dataset, ref: DatasetRef) -> None:
    """Read one batch now: a wrong feature_spec or a corrupt file fails the job here,
    naming the uri, not deep inside fit."""
    try:
        next(iter(ds.take(1)))
    except StopIteration:
        raise InvalidRequest(f"dataset.uri {ref.uri!r} holds no examples") from None
    except tf.errors.OpError as exc:
        raise InvalidRequest(
            f"dataset.uri {ref.uri!r} could not be read with its feature_spec: {exc.message}"
        ) from None


def _example_arrays(data: FitData) -> tuple[Any, Any]:
    """Empty arrays shaped like a stream's elements, for the shape checks; None when a
    dimension is unknown until data is read."""
    spec = data.x.element_spec
    x, y = spec[0], spec[1]
    try:
        return _empty(x), _empty(y)
    except ValueError:
        return None, None


def _empty(spec: Any) -> Any:
    if isinstance(spec, Mapping):
        return {k: _empty(v) for k, v in spec.items()}
    dims = spec.shape.as_list()[1:]
    if any(d is None for d in dims):
        raise ValueError("unknown dimension")
    return np.zeros((0, *dims), dtype=spec.dtype.as_numpy_dtype)
