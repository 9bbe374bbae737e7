"""Python-friendly arguments -> the request messages of `fitserve.v1`.

Users write what they would write for Keras (`optimizer="adam"`, `loss={"out_a": "mse"}`,
`layers=[{"type": "Dense", "units": 10}]`); these functions turn that into messages and
reject what the contract cannot express before it costs a round trip.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import numbers
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol, TypeAlias, cast

import numpy as np
import numpy.typing as npt
from google.protobuf import struct_pb2

from fitserve.v1 import dataset_pb2, tensor_pb2, training_pb2


@dataclass(frozen=True)
class PluginRef:
    """A server-side object by name with its parameters; made by `fitserve.plugin`.

    Sent exactly as {"name": name, **params} would be: a name and JSON-like values,
    never code.
    """

    name: str
    params: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))


def plugin(name: str, /, **params: Any) -> PluginRef:
    """A plugin (or any Keras identifier) with constructor parameters, for `loss=`,
    `metrics=`, `optimizer=` or `callbacks={"plugins": [...]}`.

    `loss=fitserve.plugin("examples>huber", delta=2.0)` is the same as
    `loss={"name": "examples>huber", "delta": 2.0}`; unlike the dict, it can pass a
    parameter called `name` (e.g. a metric's display name). The plugin must be installed
    on the servers and workers; `Client.list_plugins()` lists the installed ones.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f'plugin() needs a registered name such as "examples>huber", got {name!r}')
    return PluginRef(name, MappingProxyType(dict(params)))


ConfigLike: TypeAlias = str | Mapping[str, Any] | PluginRef
"""A Keras identifier ("adam") or plugin name ("examples>huber"), a dict
{"name": "adam", **constructor_params}, or `fitserve.plugin(name, **params)`."""
LossLike: TypeAlias = str | Mapping[str, Any] | PluginRef
"""A ConfigLike, or a mapping of output name -> ConfigLike for multi-output models."""
DatasetLike: TypeAlias = dataset_pb2.Dataset | training_pb2.DatasetRef | str
"""An uploaded Dataset, a full DatasetRef, or a string (see `dataset_ref`)."""

_BUILTIN_PREFIX = "builtin:"
_TOGGLED_CALLBACKS: dict[
    str,
    type[training_pb2.EarlyStopping]
    | type[training_pb2.ModelCheckpoint]
    | type[training_pb2.ReduceLROnPlateau],
] = {
    "early_stopping": training_pb2.EarlyStopping,
    "model_checkpoint": training_pb2.ModelCheckpoint,
    "reduce_lr_on_plateau": training_pb2.ReduceLROnPlateau,
}


class KerasModel(Protocol):
    """Anything with Keras' `to_json()`; the SDK never imports Keras itself."""

    def to_json(self) -> str: ...


def struct(values: Mapping[str, Any]) -> struct_pb2.Struct:
    """A Struct from a JSON-like mapping; numpy scalars and arrays become plain values."""
    message = struct_pb2.Struct()
    message.update(_plain(values))
    return message


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    return value


def model_spec(
    layers: Sequence[Mapping[str, Any]] | None, model: str | KerasModel | None
) -> training_pb2.ModelSpec:
    """Exactly one of a declarative layer list or a Keras model (config JSON or object)."""
    if (layers is None) == (model is None):
        raise ValueError("pass exactly one of layers= (a list of layer dicts) or model=")
    if layers is not None:
        return training_pb2.ModelSpec(layers=_layer_list(layers))
    keras_json = model if isinstance(model, str) else _to_json(model)
    return training_pb2.ModelSpec(keras_json=keras_json)


def _layer_list(layers: Sequence[Mapping[str, Any]]) -> training_pb2.LayerList:
    if not layers:
        raise ValueError("layers= is empty; give at least one layer")
    for index, layer in enumerate(layers):
        if not isinstance(layer, Mapping) or "type" not in layer:
            raise ValueError(f'layers[{index}] needs a "type" key, e.g. {{"type": "Dense"}}')
    return training_pb2.LayerList(layers=[struct(layer) for layer in layers])


def _to_json(model: object) -> str:
    to_json = getattr(model, "to_json", None)
    config = to_json() if callable(to_json) else None
    if not isinstance(config, str):
        raise TypeError(
            "model= must be a Keras config JSON string or an object whose to_json() returns one"
        )
    return config


def named_config(value: ConfigLike, what: str = "a config") -> training_pb2.NamedConfig:
    """NamedConfig from "adam", {"name": "adam", "learning_rate": 1e-3} or
    `fitserve.plugin("adam", learning_rate=1e-3)`; `what` names the argument in errors.

    A Python function, class or Keras object is refused with TypeError: no client code
    runs on the server, so custom objects are installed there as plugins and named.
    """
    if isinstance(value, str):
        return training_pb2.NamedConfig(name=value)
    if isinstance(value, PluginRef):
        return training_pb2.NamedConfig(name=value.name, params=struct(value.params))
    if isinstance(value, Mapping) and isinstance(value.get("name"), str):
        params = {key: item for key, item in value.items() if key != "name"}
        return training_pb2.NamedConfig(name=value["name"], params=struct(params))
    code = _describe_code(value)
    if code is not None:
        raise TypeError(
            f"{what} got {code}, but no client code runs on the server: a request carries "
            "names and parameters only. Install it on the servers and workers as a plugin "
            "(see docs/plugins.md) and name it by its registered name, e.g. "
            'loss="examples>huber" or loss=fitserve.plugin("examples>huber", delta=2.0); '
            "list the installed ones with client.list_plugins() or `fitserve plugins`"
        )
    raise TypeError(
        f'{what}: expected a name, a dict with a "name" key, or fitserve.plugin(...), got {value!r}'
    )


# Attributes of Keras losses, metrics, layers and callbacks (matched by name: the SDK
# never imports Keras).
_KERAS_LIKE_ATTRIBUTES = ("get_config", "update_state", "set_model", "on_epoch_end")


def _describe_code(value: object) -> str | None:
    """How to name `value` in an error when it is code (a function, a class, a Keras-like
    object), else None."""
    if inspect.isclass(value):
        return f"the class {value.__name__}"
    if inspect.isroutine(value):
        return f"the function {getattr(value, '__name__', type(value).__name__)}"
    if callable(value) or any(hasattr(value, name) for name in _KERAS_LIKE_ATTRIBUTES):
        return f"a {type(value).__name__} object"
    return None


def named_configs(
    values: ConfigLike | Iterable[ConfigLike], what: str = "a config"
) -> list[training_pb2.NamedConfig]:
    """A list of NamedConfig; a lone name, dict or plugin counts as a list of one."""
    if isinstance(values, str | Mapping | PluginRef) or not isinstance(values, Iterable):
        return [named_config(cast(ConfigLike, values), what)]
    return [named_config(value, what) for value in values]


def compile_options(
    *,
    optimizer: ConfigLike,
    loss: LossLike | None,
    metrics: ConfigLike | Iterable[ConfigLike],
    weighted_metrics: ConfigLike | Iterable[ConfigLike],
    loss_weights: Mapping[str, float] | None,
) -> training_pb2.CompileOptions:
    """The arguments of model.compile; a loss or metrics dict without "name" is per
    output, as Keras takes them: loss={"cls": "sparse_categorical_crossentropy", "reg":
    "mse"}, metrics={"cls": ["accuracy"], "reg": ["mae"]}."""
    per_output = isinstance(metrics, Mapping) and "name" not in metrics
    options = training_pb2.CompileOptions(
        optimizer=named_config(optimizer, "optimizer="),
        metrics=[] if per_output else named_configs(metrics, "metrics="),
        weighted_metrics=named_configs(weighted_metrics, "weighted_metrics="),
        loss_weights={name: float(weight) for name, weight in (loss_weights or {}).items()},
    )
    if per_output:
        for output, output_metrics in cast(Mapping[str, Any], metrics).items():
            options.output_metrics[output].metrics.extend(
                named_configs(output_metrics, f"metrics[{output!r}]")
            )
    if isinstance(loss, Mapping) and "name" not in loss:
        for output, output_loss in loss.items():
            options.output_losses[output].CopyFrom(named_config(output_loss, f"loss[{output!r}]"))
    elif loss is not None:
        options.loss.CopyFrom(named_config(loss, "loss="))
    return options


def dataset_ref(value: DatasetLike) -> training_pb2.DatasetRef:
    """A DatasetRef from a Dataset, a DatasetRef, or a string.

    Strings: "builtin:mnist" (or "builtin:mnist:test" for the test split) is a built-in
    Keras dataset; one containing "://" or starting with "/" is a URI; anything else is
    an uploaded dataset's id or name.
    """
    if isinstance(value, training_pb2.DatasetRef):
        return value
    if isinstance(value, dataset_pb2.Dataset):
        return training_pb2.DatasetRef(dataset=value.id)
    if not isinstance(value, str) or not value:
        raise TypeError(f"expected a Dataset, a DatasetRef or a non-empty string, got {value!r}")
    if value.startswith(_BUILTIN_PREFIX):
        name, _, split = value.removeprefix(_BUILTIN_PREFIX).partition(":")
        return training_pb2.DatasetRef(builtin=name, split=split)
    if "://" in value or value.startswith("/"):
        return training_pb2.DatasetRef(uri=value)
    return training_pb2.DatasetRef(dataset=value)


def fit_options(
    *,
    validation_data: DatasetLike | None,
    validation_split: float,
    epochs: int,
    batch_size: int,
    shuffle: bool,
    class_weight: Mapping[int, float] | None,
    sample_weight_key: str,
    initial_epoch: int,
    steps_per_epoch: int,
    seed: int | None,
) -> training_pb2.FitOptions:
    """The arguments of model.fit."""
    if validation_data is not None and validation_split:
        raise ValueError("pass validation_data= or validation_split=, not both")
    return training_pb2.FitOptions(
        epochs=epochs,
        batch_size=batch_size,
        shuffle=shuffle,
        validation_split=validation_split,
        validation_data=None if validation_data is None else dataset_ref(validation_data),
        class_weight={int(k): float(v) for k, v in (class_weight or {}).items()},
        sample_weight_key=sample_weight_key,
        initial_epoch=initial_epoch,
        steps_per_epoch=steps_per_epoch,
        seed=seed,
    )


def callback_options(callbacks: Mapping[str, Any] | None) -> training_pb2.CallbackOptions:
    """CallbackOptions from {"early_stopping": {"patience": 2}, "tensorboard": True}.

    A callback given as a dict is enabled with those fields; True enables it with the
    server's defaults; False or None leaves it off. "plugins" is a list of server-side
    callback plugins (names, dicts or `fitserve.plugin(...)`). "thresholds" is a list of
    watched metrics (or one), e.g. [{"monitor": "val_accuracy", "value": 0.98,
    "stop": True}]: each sends a threshold event when first reached; with "stop" the fit
    ends there and the model is published. "mode" is "auto" (default), "min" or "max".
    """
    options = training_pb2.CallbackOptions()
    for key, value in (callbacks or {}).items():
        if key in _TOGGLED_CALLBACKS:
            getattr(options, key).CopyFrom(_toggled(key, value))
        elif key == "plugins":
            options.plugins.extend(named_configs(value, "callbacks['plugins']"))
        elif key == "thresholds":
            options.thresholds.extend(thresholds(value))
        elif key in training_pb2.CallbackOptions.DESCRIPTOR.fields_by_name:
            setattr(options, key, value)
        else:
            known = ", ".join(training_pb2.CallbackOptions.DESCRIPTOR.fields_by_name)
            raise ValueError(f"unknown callback {key!r}; expected one of: {known}")
    return options


def _toggled(
    key: str, value: object
) -> training_pb2.EarlyStopping | training_pb2.ModelCheckpoint | training_pb2.ReduceLROnPlateau:
    message_type = _TOGGLED_CALLBACKS[key]
    if value is None or isinstance(value, bool):
        return message_type(enabled=bool(value))
    if isinstance(value, Mapping):
        try:
            return message_type(**{"enabled": True, **_plain(value)})
        except ValueError as error:
            raise ValueError(f"callbacks[{key!r}]: {error}") from None
    raise TypeError(f"callbacks[{key!r}] must be a dict or a bool, got {value!r}")


_THRESHOLD_KEYS = ("monitor", "value", "mode", "stop")
_THRESHOLD_MODES = ("auto", "min", "max")


def thresholds(values: object) -> list[training_pb2.Threshold]:
    """Threshold messages from one dict or a list of dicts (or Threshold messages); None
    is none."""
    if values is None:
        return []
    if isinstance(values, Mapping | training_pb2.Threshold):
        values = [values]
    if not isinstance(values, Iterable) or isinstance(values, str | bytes):
        raise TypeError(
            "callbacks['thresholds'] must be a list of dicts such as "
            f'{{"monitor": "accuracy", "value": 0.98, "stop": True}}, got {values!r}'
        )
    return [_threshold(index, value) for index, value in enumerate(values)]


def _threshold(index: int, value: object) -> training_pb2.Threshold:
    where = f"callbacks['thresholds'][{index}]"
    if isinstance(value, training_pb2.Threshold):
        return value
    if not isinstance(value, Mapping):
        raise TypeError(f"{where} must be a dict, got {value!r}")
    unknown = sorted(str(key) for key in value if key not in _THRESHOLD_KEYS)
    if unknown:
        raise ValueError(
            f"{where}: unknown key {unknown[0]!r}; valid keys: {', '.join(_THRESHOLD_KEYS)}"
        )
    monitor, target = value.get("monitor"), value.get("value")
    if not monitor or target is None:
        raise ValueError(
            f'{where} needs "monitor" (a metric of the epoch logs, e.g. "val_accuracy") '
            f'and "value" (the number to reach), e.g. {{"monitor": "accuracy", '
            f'"value": 0.98}}; got {dict(value)!r}'
        )
    if not isinstance(monitor, str):
        raise TypeError(f'{where}["monitor"] must be a string, got {monitor!r}')
    if isinstance(target, bool) or not isinstance(target, numbers.Real):
        raise TypeError(f'{where}["value"] must be a number, got {target!r}')
    mode = value.get("mode") or "auto"
    if mode not in _THRESHOLD_MODES:
        raise ValueError(f'{where}["mode"] must be one of auto, min, max; got {mode!r}')
    stop = value.get("stop", False)
    if not isinstance(stop, bool):
        raise TypeError(f'{where}["stop"] must be True or False, got {stop!r}')
    return training_pb2.Threshold(monitor=monitor, value=float(target), mode=mode, stop=stop)


def run_options(
    *,
    queue: str,
    mixed_precision: str,
    labels: Mapping[str, str] | None,
    time_limit_seconds: int | None = None,
) -> training_pb2.RunOptions:
    """Where and how the job runs; no time limit given: the server's default."""
    return training_pb2.RunOptions(
        queue=queue,
        mixed_precision=mixed_precision,
        labels=dict(labels or {}),
        time_limit_seconds=time_limit_seconds,
    )


def model_ref(name: str, version: int | None, alias: str | None) -> tensor_pb2.ModelRef:
    """A ModelRef; neither version nor alias selects `stable`, else the latest version."""
    if version is not None and alias is not None:
        raise ValueError("pass version= or alias=, not both")
    if version is not None:
        return tensor_pb2.ModelRef(name=name, version=version)
    if alias is not None:
        return tensor_pb2.ModelRef(name=name, alias=alias)
    return tensor_pb2.ModelRef(name=name)


def freeze_options(
    *,
    train_last_n_layers: int | None,
    new_head: int | Mapping[str, Any] | None,
    freeze_layers: Sequence[str | int] | None = None,
    head_layers: Sequence[Mapping[str, Any]] | None = None,
    drop_last: int = 0,
    train_base: bool = False,
    unfreeze_top_k: int,
    unfreeze_learning_rate: float,
    unfreeze_epochs: int,
) -> training_pb2.FreezeOptions:
    """How a fine-tune changes the base model; new_head is a class count or NewHead dict."""
    chosen = [
        name
        for name, value in (
            ("train_last_n_layers", train_last_n_layers),
            ("new_head", new_head),
            ("freeze_layers", freeze_layers),
            ("head_layers", head_layers),
        )
        if value is not None
    ]
    if len(chosen) > 1:
        raise ValueError(f"pass one of {', '.join(c + '=' for c in chosen)}, not several")
    if (drop_last or train_base) and head_layers is None:
        raise ValueError("drop_last= and train_base= go with head_layers=")
    options = training_pb2.FreezeOptions(
        unfreeze_top_k=unfreeze_top_k,
        unfreeze_learning_rate=unfreeze_learning_rate,
        unfreeze_epochs=unfreeze_epochs,
    )
    if train_last_n_layers is not None:
        options.train_last_n_layers = train_last_n_layers
    elif isinstance(new_head, int):
        options.new_head.CopyFrom(training_pb2.NewHead(num_classes=new_head))
    elif new_head is not None:
        options.new_head.CopyFrom(training_pb2.NewHead(**new_head))
    elif freeze_layers is not None:
        if isinstance(freeze_layers, str | int):
            freeze_layers = [freeze_layers]
        names = [layer for layer in freeze_layers if isinstance(layer, str)]
        indices = [layer for layer in freeze_layers if not isinstance(layer, str)]
        options.freeze_layers.CopyFrom(training_pb2.LayerSelection(names=names, indices=indices))
    elif head_layers is not None:
        options.head_layers.CopyFrom(
            training_pb2.HeadLayers(
                layers=_layer_list(head_layers).layers, drop_last=drop_last, train_base=train_base
            )
        )
    return options


def npz_bytes(arrays: Mapping[str, npt.ArrayLike | None]) -> bytes:
    """The arrays (None skipped) as an in-memory .npz; object arrays are refused.

    np.savez pickles object arrays, and the server refuses pickles, so fail here with
    the array's name instead of after the upload.
    """
    named = {name: np.asarray(value) for name, value in arrays.items() if value is not None}
    if not named:
        raise ValueError("no arrays to upload: pass x=, y=, or named arrays")
    for name, array in named.items():
        if array.dtype.hasobject:
            raise TypeError(
                f"array {name!r} has dtype object, which .npz stores pickled and the server "
                "refuses; convert it to a numeric, bool or str dtype"
            )
    buffer = io.BytesIO()
    np.savez(buffer, **cast(dict[str, Any], named))
    return buffer.getvalue()


def upload_requests(
    header: dataset_pb2.DatasetHeader, chunks: Iterable[bytes]
) -> Iterator[dataset_pb2.UploadDatasetRequest]:
    """The UploadDataset stream: the header, then one message per chunk."""
    yield dataset_pb2.UploadDatasetRequest(header=header)
    for chunk in chunks:
        yield dataset_pb2.UploadDatasetRequest(chunk=chunk)


def memory_chunks(content: bytes, chunk_bytes: int) -> Iterator[bytes]:
    """Slices of `content`, `chunk_bytes` each (the last may be shorter)."""
    _check_chunk_bytes(chunk_bytes)
    return (content[start : start + chunk_bytes] for start in range(0, len(content), chunk_bytes))


def file_chunks(path: str | os.PathLike[str], chunk_bytes: int) -> Iterator[bytes]:
    """The file's bytes, read `chunk_bytes` at a time so it never sits whole in memory.

    Arguments are checked now, not when gRPC first pulls a chunk on its own thread.
    """
    _check_chunk_bytes(chunk_bytes)
    return _read_chunks(path, chunk_bytes)


def _read_chunks(path: str | os.PathLike[str], chunk_bytes: int) -> Iterator[bytes]:
    with open(path, "rb") as file:
        while chunk := file.read(chunk_bytes):
            yield chunk


def npz_header(name: str, *, size_bytes: int, sha256: str) -> dataset_pb2.DatasetHeader:
    """The first message of an .npz upload; the server checks size and digest at the end."""
    return dataset_pb2.DatasetHeader(name=name, format="npz", size_bytes=size_bytes, sha256=sha256)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The lowercase hex sha256 of a file, read in blocks."""
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def _check_chunk_bytes(chunk_bytes: int) -> None:
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
