"""A job's data in the form Keras takes (worker side: imports TensorFlow).

Uploaded and built-in datasets are arrays, small enough to hold: they go to ``fit`` as
they are and Keras batches, shuffles and splits them itself (through its own tf.data
adapter). A uri is read lazily through tf.data, so data larger than memory streams
through, whether local (under the dataset_roots) or at an fsspec URL:

- TFRecord files: local ones through ``tf.data.TFRecordDataset``; at a URL through
  ``Dataset.from_generator`` over records read from fsspec file objects by
  ``service.domain.datasets.tfrecord_frames`` (TensorFlow reads only its own filesystems). Files
  are interleaved in a fixed order either way, so the same files give the same elements.
- A ``tf.data.Dataset.save`` folder: loaded in place when local; at a URL, copied first
  into the worker's dataset cache folder (``Workspace.dataset_cache_dir``, once per URL
  and listing, by ``service.domain.datasets.cache``), since ``Dataset.load`` reads only
  through TensorFlow's filesystems, then loaded from the copy.

The elements of a uri dataset whose files add up to at most ``dataset_cache_bytes`` are
cached in memory as the first epoch reads them ("cache when it fits"), so later epochs
read no files; then come the seeded shuffle, batch and prefetch.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from service import errors
from service.domain import shapes
from service.domain.datasets import cache, sources, tfrecord_frames
from service.domain.datasets.store import DatasetStore
from service.domain.job_specs import CompileSpec, DatasetRef, parse_feature
from service.domain.workspace import Workspace
from service.errors import InvalidRequest
from service.training.builtin_datasets import load_builtin

SHUFFLE_BUFFER = 10_000
SAMPLE_WEIGHT = "sample_weight"  # an array of this name weights samples unless told otherwise
PREBATCHED_SHUFFLE_BUFFER = 100  # batches, for a uri saved already batched
PARALLEL_FILES = 4  # TFRecord files read at once; fixed, so the element order is too
_FUNCTION_NODE = re.compile(r"\{\{function_node [^}]*\}\}\s*")
_RAISED = re.compile(r"^service\.errors\.(\w+): (.*)$", re.MULTILINE)
_TF_DTYPES = {"float32": tf.float32, "int64": tf.int64, "string": tf.string}


@dataclass(frozen=True)
class FitData:
    """Arrays ``x, y, sample_weight``, or a batched tf.data.Dataset in ``x``."""

    x: Any
    y: Any = None
    sample_weight: Any = None
    uri: str = ""  # where a stream reads, for errors
    prebatched: bool = False  # a uri whose elements are batches already (used as they are)
    weights_found: str = ""  # the array used as sample weights without being named
    unused: tuple[str, ...] = ()  # arrays that are neither inputs, targets nor weights

    @property
    def streamed(self) -> bool:
        return isinstance(self.x, tf.data.Dataset)

    def validation(self) -> Any:
        """The form ``model.fit(validation_data=...)`` takes."""
        if self.streamed:
            return self.x
        return (
            (self.x, self.y) if self.sample_weight is None else (self.x, self.y, self.sample_weight)
        )


def load(
    ws: Workspace,
    ref: DatasetRef,
    batch_size: int,
    sample_weight_key: str = "",
    shuffle: bool = False,
    seed: int | None = None,
    input_ranks: Mapping[str, int] | None = None,
) -> FitData:
    """The data a ref names; a stream is shuffled through a buffer when asked.

    A ``Dataset.save`` folder of a pipeline that was batched before it was saved has
    elements of the model inputs' full rank (``input_ranks``, batch dimension included):
    it is used batch by batch as it is (``prebatched``), not batched again; shuffling
    then shuffles whole batches."""
    if ref.uri:
        stream, source = _stream(ws, ref, sample_weight_key)
        prebatched = input_ranks is not None and _is_batched(stream.element_spec, input_ranks)
        _probe(stream if prebatched else stream.batch(batch_size), ref)
        if 0 < source.size_bytes <= ws.dataset_cache_bytes:
            stream = stream.cache()
        if shuffle:
            buffer = PREBATCHED_SHUFFLE_BUFFER if prebatched else SHUFFLE_BUFFER
            stream = stream.shuffle(buffer, seed=seed)
        batches = stream if prebatched else stream.batch(batch_size)
        return FitData(batches.prefetch(tf.data.AUTOTUNE), uri=ref.uri, prebatched=prebatched)
    if ref.builtin:
        if sample_weight_key:
            raise InvalidRequest("fit.sample_weight_key is not available for built-in datasets")
        x, y = load_builtin(ws.keras_datasets_dir, ref.builtin, ref.split or "train")
        return FitData(x, y)
    return load_arrays(ws.datasets, ref, sample_weight_key)


@contextlib.contextmanager
def read_errors(*datas: FitData | None) -> Iterator[None]:
    """Around fit or evaluate: a uri dataset that fails to read past its first batch (a
    corrupt or vanished file, storage gone) fails the job with the reader's own error,
    naming the uri and the file, instead of TensorFlow's traceback."""
    uris = [d.uri for d in datas if d is not None and d.uri]
    try:
        yield
    except tf.errors.OpError as exc:
        failure = _read_failure(exc, " or ".join(map(repr, uris))) if uris else None
        if failure is None:
            raise
        raise failure from None


def check(model: keras.Model, compile_spec: CompileSpec, data: FitData) -> None:
    """Fail before fit, with both shapes named, when the data cannot fit the model."""
    x, y = _example_arrays(data) if data.streamed else (data.x, data.y)
    if x is None:
        return
    shapes.check_inputs({t.name: tuple(t.shape) for t in model.inputs}, x)
    if len(model.outputs) == 1 and compile_spec.loss is not None and y is not None:
        shapes.check_targets(tuple(model.outputs[0].shape), compile_spec.loss.name, y)


def load_arrays(datasets: DatasetStore, ref: DatasetRef, sample_weight_key: str) -> FitData:
    """Inputs, targets and sample weights of an uploaded dataset."""
    info = datasets.get(ref.dataset)
    with np.load(datasets.path(info.id), allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    keys = _keys(ref, list(arrays), sample_weight_key, info.name or info.id)
    return FitData(
        _one_or_dict(arrays, keys.inputs),
        _one_or_dict(arrays, keys.targets),
        arrays[keys.weight] if keys.weight else None,
        weights_found=keys.weight if keys.weight != sample_weight_key else "",
        unused=keys.unused,
    )


def _one_or_dict(arrays: Mapping[str, Any], keys: list[str]) -> Any:
    """One array, a dict of several, or None for no keys."""
    if not keys:
        return None
    return arrays[keys[0]] if len(keys) == 1 else {k: arrays[k] for k in keys}


@dataclass(frozen=True)
class _Keys:
    inputs: list[str]
    targets: list[str]
    weight: str  # "" for none
    unused: tuple[str, ...]


def _keys(ref: DatasetRef, names: list[str], sample_weight_key: str, dataset: str) -> _Keys:
    """Input and target names: as given, else "x"/"y", else every other array as input.
    Named inputs and no "y" array mean no targets: a model whose loss layers take the
    targets as an input (the endpoint-layer pattern). Sample weights: the array
    ``sample_weight_key`` names, else one called ``sample_weight`` (Keras's name)."""
    no_targets = bool(ref.input_keys) and "y" not in names
    targets = ref.target_keys or ([] if no_targets else ["y"])
    named = {*ref.input_keys, *targets}
    weight = sample_weight_key or (
        SAMPLE_WEIGHT if SAMPLE_WEIGHT in names and SAMPLE_WEIGHT not in named else ""
    )
    weights = [weight] if weight else []
    inputs = ref.input_keys or (
        ["x"] if "x" in names else [k for k in names if k not in (*targets, *weights)]
    )
    missing = [k for k in (*inputs, *targets, *weights) if k not in names]
    if missing:
        raise InvalidRequest(
            f"dataset {dataset!r} has no array {missing[0]!r}; it has {', '.join(sorted(names))}"
        )
    used = {*inputs, *targets, *weights}
    return _Keys(inputs, targets, weight, tuple(k for k in names if k not in used))


def _stream(
    ws: Workspace, ref: DatasetRef, sample_weight_key: str
) -> tuple[tf.data.Dataset, sources.UriSource]:
    """The elements of a uri as ``(x, y[, w])``, unbatched, and what the uri holds."""
    source = sources.resolve(ref, ws.dataset_roots, ws.dataset_url_schemes)
    if source.format is sources.UriFormat.SAVED:
        ds = tf.data.Dataset.load(str(cache.local_copy(source, ws.dataset_cache_dir)))
    else:
        ds = _tfrecords(ref, source)
    return ds.map(_selector(ref, ds.element_spec, sample_weight_key), tf.data.AUTOTUNE), source


def _tfrecords(ref: DatasetRef, source: sources.UriSource) -> tf.data.Dataset:
    features = {}
    for name, text in ref.feature_spec.items():
        dtype, shape = parse_feature(text)
        features[name] = tf.io.FixedLenFeature(shape, _TF_DTYPES[dtype])
    files = tf.data.Dataset.from_tensor_slices([f.name for f in source.files])
    records = files.interleave(
        tf.data.TFRecordDataset if source.local else _url_records(source),
        cycle_length=min(PARALLEL_FILES, len(source.files)),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    return records.map(lambda r: tf.io.parse_single_example(r, features), tf.data.AUTOTUNE)


def _url_records(source: sources.UriSource) -> Any:
    """One file's records as a dataset, read through fsspec a record at a time."""
    files = {f.name: f for f in source.files}

    def records(name: bytes) -> Iterator[bytes]:
        file = files[name.decode()]
        url = source.url(file)
        with sources.storage_errors(url, "file"), source.open(file) as stream:
            yield from tfrecord_frames.read_records(stream, url, file.size)

    spec = tf.TensorSpec((), tf.string)
    return lambda name: tf.data.Dataset.from_generator(records, args=(name,), output_signature=spec)


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
    keys = _keys(ref, list(spec), sample_weight_key, ref.uri)

    def pick(element: dict[str, Any]) -> tuple[Any, ...]:
        x = _one_or_dict(element, keys.inputs)
        if not keys.targets:  # the model's loss layers take its targets as inputs
            return (x,)
        y = _one_or_dict(element, keys.targets)
        return (x, y, element[keys.weight]) if keys.weight else (x, y)

    return pick


def _is_batched(spec: Any, input_ranks: Mapping[str, int]) -> bool:
    """Whether a stream's inputs already have the model inputs' full rank (batch
    dimension included), i.e. the folder was saved from a batched pipeline."""
    x = spec[0] if isinstance(spec, tuple) else spec
    if isinstance(x, Mapping):
        ranks = [(x[name], rank) for name, rank in input_ranks.items() if name in x]
    else:
        ranks = [(x, rank) for rank in list(input_ranks.values())[:1]]
    if not ranks:
        return False
    return all(s.shape.rank == rank for s, rank in ranks)


def _probe(ds: tf.data.Dataset, ref: DatasetRef) -> None:
    """Read one batch now: a wrong feature_spec, a corrupt file or unreadable storage fails
    the job here, naming the uri, not deep inside fit."""
    try:
        next(iter(ds.take(1)))
    except StopIteration:
        raise InvalidRequest(f"dataset.uri {ref.uri!r} holds no examples") from None
    except tf.errors.OpError as exc:
        failure = _read_failure(exc, repr(ref.uri))
        if failure is not None:
            raise failure from None
        raise InvalidRequest(
            f"dataset.uri {ref.uri!r} could not be read with its feature_spec: {exc.message}"
        ) from None


def _read_failure(exc: tf.errors.OpError, uris: str) -> errors.FitserveError | None:
    """The domain error a file reader raised inside tf.data (TensorFlow passes on only its
    text, around a traceback), or the data loss its own TFRecord reader found; None for
    any other error."""
    raised = _RAISED.findall(exc.message)
    if raised:
        name, message = raised[-1]
        kind = getattr(errors, name, InvalidRequest)
        if not (isinstance(kind, type) and issubclass(kind, errors.FitserveError)):
            kind = InvalidRequest
        return kind(f"dataset.uri {uris} could not be read: {message}")
    if isinstance(exc, tf.errors.DataLossError):
        message = _FUNCTION_NODE.sub("", exc.message).strip()
        return InvalidRequest(f"dataset.uri {uris} could not be read: {message}")
    return None


def _example_arrays(data: FitData) -> tuple[Any, Any]:
    """Empty arrays shaped like a stream's elements, for the shape checks; None when a
    dimension is unknown until data is read."""
    spec = data.x.element_spec
    x, y = spec[0], spec[1] if len(spec) > 1 else None
    try:
        return _empty(x), None if y is None else _empty(y)
    except ValueError:
        return None, None


def _empty(spec: Any) -> Any:
    if isinstance(spec, Mapping):
        return {k: _empty(v) for k, v in spec.items()}
    dims = spec.shape.as_list()[1:]
    if any(d is None for d in dims):
        raise ValueError("unknown dimension")
    return np.zeros((0, *dims), dtype=spec.dtype.as_numpy_dtype)
