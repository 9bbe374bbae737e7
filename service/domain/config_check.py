"""Checks a model spec, and the parameters of compile objects and callbacks, against the
allowlist before anything is deserialized.

Keras ``safe_mode`` alone has been bypassed repeatedly, so a client-supplied config is
walked as plain JSON first: every object it names must be a built-in Keras class on the
allowlist, from a Keras module, or a layer registered by a server-side plugin (by its
registered name, ``package>Name``), with no lambdas or functions inside.

Bounds, checked before anything is built so that a hostile or mistaken request is refused
at submission, never a job that crashes its worker:

- a Keras config is at most ``MAX_CONFIG_BYTES`` and nested at most ``MAX_CONFIG_DEPTH``
  arrays and objects deep (measured on the text before it is parsed: ``json.loads``
  itself fails on deep nesting), with at most ``MAX_LAYERS`` layers;
- every layer size (``SIZE_PARAMS``: units, filters, kernel and pool sizes, embedding
  sizes, heads, ...) and every dimension of a shape (``SHAPE_PARAMS``) is at most
  ``MAX_LAYER_SIZE``;
- the weights of the layers whose count follows from the request (Dense, Embedding and
  convolutions; a layer list's shapes are followed from its ``input_shape`` through the
  layers that keep or flatten them) add up to at most ``MAX_WEIGHTS``;
- a layer list's ``input_shape`` is a list of whole numbers from 1 to MAX_LAYER_SIZE.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from service.domain import allowed_keras
from service.errors import ECHO_LIMIT, InvalidRequest, shown
from service.plugins.registry import Kind, Plugin, installed

if TYPE_CHECKING:
    from service.domain.job_specs import ModelSpec

MAX_LAYERS = 1000
MAX_CONFIG_BYTES = 4 * 1024 * 1024
MAX_CONFIG_DEPTH = 100
MAX_LAYER_SIZE = 1_000_000
MAX_WEIGHTS = 1_000_000_000  # 4 GB of float32
MAX_INPUT_RANK = 32
SIZE_PARAMS = frozenset(
    {
        "units",
        "filters",
        "kernel_size",
        "pool_size",
        "strides",
        "dilation_rate",
        "depth_multiplier",
        "groups",
        "input_dim",
        "output_dim",
        "num_heads",
        "num_query_heads",
        "num_key_value_heads",
        "key_dim",
        "value_dim",
        "head_dim",
        "num_tokens",
        "num_bins",
        "n",
        "size",
        "padding",
        "cropping",
        "height",
        "width",
        "output_size",
        "batch_size",
    }
)
SHAPE_PARAMS = frozenset(
    {"input_shape", "batch_shape", "batch_input_shape", "shape", "target_shape", "output_shape"}
)
_SIZES_SAID = "units, filters, kernel and pool sizes, embedding sizes, heads, shape dimensions"
# Layers that leave the shape of what flows through them as it is (for the weight count).
_SAME_SHAPE = frozenset(
    {
        "Activation",
        "ActivityRegularization",
        "AlphaDropout",
        "BatchNormalization",
        "Dropout",
        "ELU",
        "GaussianDropout",
        "GaussianNoise",
        "GroupNormalization",
        "Identity",
        "LayerNormalization",
        "LeakyReLU",
        "Masking",
        "PReLU",
        "RMSNormalization",
        "ReLU",
        "Rescaling",
        "Softmax",
        "SpatialDropout1D",
        "SpatialDropout2D",
        "SpatialDropout3D",
        "UnitNormalization",
    }
)
_CONVOLUTIONS = {"Conv1D": 1, "Conv2D": 2, "Conv3D": 3} | {f"Convolution{n}D": n for n in (1, 2, 3)}
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_ALLOWED = allowed_keras.LAYERS | allowed_keras.MODELS | allowed_keras.CONFIG_OBJECTS
_FORBIDDEN_KEYS = frozenset({"function", "function_type", "module_path", "__lambda__"})


def check_model_spec(spec: ModelSpec) -> None:
    """Raise InvalidRequest naming the first layer or object that is not allowed."""
    if spec.layers:
        _check_layer_list(spec.layers)
    else:
        _check_keras_config(spec.keras_json)


def _check_layer_list(layers: list[dict[str, Any]]) -> None:
    if len(layers) > MAX_LAYERS:
        raise InvalidRequest(f"model has {len(layers)} layers; the limit is {MAX_LAYERS}")
    for i, layer in enumerate(layers):
        _check_entry(i, layer)
    _check_layer_list_weights(layers)


def _check_entry(i: int, layer: dict[str, Any]) -> None:
    """One entry of a layer list: its class, its parameters, its sizes."""
    kind = layer.get("type")
    field = f"model.layers[{i}]"
    if not isinstance(kind, str) or not kind:
        raise InvalidRequest(
            f"{field} has no 'type' (a Keras layer class name such as 'Dense')", field=field
        )
    if kind in allowed_keras.LAYERS:
        _check_class(kind, field, allowed_keras.LAYERS)
    else:
        plugin = _layer_plugin(kind, field)
        # As the worker builds it: input_shape is dropped from every entry, input_name
        # only from the first (where it names the model's input).
        skipped = ("type", "input_shape", "input_name") if i == 0 else ("type", "input_shape")
        params = {k: v for k, v in layer.items() if k not in skipped}
        plugin.check_params(params, field)
    _check_input(layer, field, first=i == 0)
    _check_sizes(layer, f"{field} ({kind})", field)
    _walk(layer, field, field)


def _check_input(layer: dict[str, Any], field: str, *, first: bool) -> None:
    """``input_shape`` and the first entry's ``input_name`` as the worker reads them (a
    list of dimensions, a name)."""
    if "input_shape" in layer:
        shape = layer["input_shape"]
        if not (
            isinstance(shape, list)
            and len(shape) <= MAX_INPUT_RANK
            and all(_is_int(d) and 1 <= d <= MAX_LAYER_SIZE for d in shape)
        ):
            raise InvalidRequest(
                f"{field}: input_shape must be a list of whole numbers from 1 to "
                f"{MAX_LAYER_SIZE:,}, e.g. [28, 28]; got {shown(shape)}",
                field=field,
            )
    name = layer.get("input_name", "x") if first else "x"
    if not isinstance(name, str) or not name or len(name) > 256:
        raise InvalidRequest(
            f"{field}: input_name must be a name of 1 to 256 characters, such as 'pixels'; "
            f"got {shown(name)}",
            field=field,
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_sizes(params: dict[str, Any], where: str, field: str | None) -> None:
    """Every layer size and shape dimension a layer's parameters give is at most
    MAX_LAYER_SIZE."""
    for key in sorted((SIZE_PARAMS | SHAPE_PARAMS) & params.keys()):
        value = params[key]
        for number in value if isinstance(value, list) else [value]:
            if not isinstance(number, int | float) or isinstance(number, bool):
                continue  # 'same', None: Keras says what it takes
            if not math.isfinite(number) or number > MAX_LAYER_SIZE:
                raise InvalidRequest(
                    f"{where}: {key} is {shown(number)}; the limit is {MAX_LAYER_SIZE:,} for "
                    f"any one layer size ({_SIZES_SAID})",
                    field=field,
                )


def _check_layer_list_weights(layers: list[dict[str, Any]]) -> None:
    """The weights of a layer list, followed from its input shape, at most MAX_WEIGHTS."""
    first = layers[0].get("input_shape") if layers else None
    shape: list[int | None] | None = list(first) if isinstance(first, list) else None
    total = 0
    for i, layer in enumerate(layers):
        kind = str(layer.get("type"))
        last = shape[-1] if shape else None
        total += _weights(kind, layer, last)
        _check_weights(total, f"model.layers[{i}] ({kind})", f"model.layers[{i}]")
        shape = _shape_after(kind, layer, shape)


def _shape_after(kind: str, params: dict[str, Any], shape: list[int | None] | None) -> Any:
    """The shape a layer gives, without the batch dimension, where it follows from the
    request; None when unknown."""
    if shape is None or kind in _SAME_SHAPE:
        return shape
    if kind == "Flatten":
        known = all(isinstance(d, int) for d in shape)
        return [math.prod(d for d in shape if d is not None)] if known else [None]
    if kind == "Dense" and shape:
        return [*shape[:-1], _size(params.get("units"))]
    if kind == "Embedding":
        return [*shape, _size(params.get("output_dim"))]
    if kind in _CONVOLUTIONS and shape:
        return [*([None] * (len(shape) - 1)), _size(params.get("filters"))]
    return None


def _weights(kind: str, params: dict[str, Any], inputs: int | None) -> int:
    """The weights a layer holds, from its parameters and the size of its input's last
    dimension (1 when unknown: a lower bound); 0 for layers not counted."""
    features = inputs or 1
    if kind == "Dense":
        units = _size(params.get("units"))
        return features * units + units
    if kind == "Embedding":
        return _size(params.get("input_dim")) * _size(params.get("output_dim"))
    if kind in _CONVOLUTIONS:
        rank, filters = _CONVOLUTIONS[kind], _size(params.get("filters"))
        kernel = params.get("kernel_size")
        window = [_size(k) for k in kernel] if isinstance(kernel, list) else [_size(kernel)] * rank
        return math.prod(window) * features * filters + filters
    return 0


def _size(value: Any) -> int:
    """A size parameter as a whole number; 0 when it is not one (Keras refuses it)."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return max(int(value), 0)
    return 0


def _check_weights(total: int, where: str, field: str) -> None:
    if total > MAX_WEIGHTS:
        raise InvalidRequest(
            f"{where}: the model would hold about {total:,} weights; the limit is "
            f"{MAX_WEIGHTS:,} — use fewer units, filters or input features",
            field=field,
        )


_KERAS_JSON = "model.keras_json"


def _check_keras_config(text: str) -> None:
    config = _decoded(text)
    class_name = config.get("class_name") if isinstance(config, dict) else None
    if not isinstance(class_name, str) or class_name not in allowed_keras.MODELS:
        raise InvalidRequest(
            "model.keras_json must be a Keras model config as model.to_json() returns it, "
            "with class_name Sequential or Functional",
            field="model.keras_json",
        )
    inner = config.get("config")
    if not isinstance(inner, dict):
        raise InvalidRequest(
            "model.keras_json has no 'config' object; send what model.to_json() returns",
            field="model.keras_json",
        )
    layers = inner.get("layers", [])
    if isinstance(layers, list) and len(layers) > MAX_LAYERS:
        raise InvalidRequest(
            f"model has {len(layers)} layers; the limit is {MAX_LAYERS}", field=_KERAS_JSON
        )
    _walk(config, "model", _KERAS_JSON)
    total = 0
    for node in _objects(config):
        total += _weights(node["class_name"], node["config"], _input_features(node))
        _check_weights(total, _describe(node, "model"), _KERAS_JSON)


def _objects(node: Any) -> Iterator[dict[str, Any]]:
    """Every object of a Keras config with a class name and a config object, nested
    models' layers included."""
    if isinstance(node, list):
        for item in node:
            yield from _objects(item)
    elif isinstance(node, dict):
        if isinstance(node.get("class_name"), str) and isinstance(node.get("config"), dict):
            yield node
        for value in node.values():
            yield from _objects(value)


def _input_features(node: dict[str, Any]) -> int | None:
    """The last input dimension a layer was built with (Keras 3 writes ``build_config``)."""
    build = node.get("build_config")
    shape = build.get("input_shape") if isinstance(build, dict) else None
    last = shape[-1] if isinstance(shape, list) and shape else None
    return last if isinstance(last, int) and 0 < last <= MAX_LAYER_SIZE else None


def _layer_plugin(name: str, field: str) -> Plugin:
    if name == "Lambda":
        _check_class(name, field)
    registry = installed()
    plugin = registry.get(name)
    if plugin is None or plugin.kind is not Kind.LAYER:
        layers = registry.names(Kind.LAYER)
        raise InvalidRequest(
            f"{field}: {shown(name)} is neither a Keras layer class nor a plugin layer; plugin "
            f"layers installed: {', '.join(layers) if layers else 'none'}",
            field=field,
        )
    return plugin


def adds_loss(spec: ModelSpec) -> bool:
    """Whether the model contains a plugin layer that calls ``add_loss`` (so compile may
    leave the loss out); only a Keras config can (a layer list is one chain of layers)."""
    if not spec.keras_json:
        return False
    loss_layers = {p.name for p in installed().model_layers() if p.kind is Kind.LOSS}
    if not loss_layers:
        return False
    return not loss_layers.isdisjoint(registered_names(_parsed(spec)))


def output_names(spec: ModelSpec) -> list[str] | None:
    """The output names of a functional Keras config, as compile's per-output losses and
    metrics key them (dict keys of dict outputs, else the output layers' names); None
    when not told (a layer list or a Sequential model has one output)."""
    config = _parsed(spec)
    inner = config.get("config") if config else None
    outputs = inner.get("output_layers") if isinstance(inner, dict) else None
    if isinstance(outputs, dict):
        return [str(k) for k in outputs]
    if isinstance(outputs, list) and outputs and isinstance(outputs[0], str):
        return [outputs[0]]
    if isinstance(outputs, list) and all(isinstance(o, list) and o for o in outputs):
        return [str(o[0]) for o in outputs]
    return None


def output_units(spec: ModelSpec) -> int | None:
    """Units of a model whose one output is a Dense layer (a layer list, a Sequential or
    a functional config): how many classes it can tell apart; None when not known."""
    last: Any = None
    if spec.layers:
        entry = spec.layers[-1]
        last = entry.get("units") if entry.get("type") == "Dense" else None
    else:
        last = _dense_output_units(_parsed(spec), output_names(spec))
    if isinstance(last, int | float) and not isinstance(last, bool) and float(last).is_integer():
        return int(last)
    return None


def _dense_output_units(config: dict[str, Any] | None, outputs: list[str] | None) -> Any:
    """``units`` of a Keras config's one output layer when it is a Dense layer: the last
    layer of a Sequential config, or the named output layer of a functional one."""
    inner = config.get("config") if config else None
    layers = inner.get("layers") if isinstance(inner, dict) else None
    if not isinstance(layers, list) or not layers or config is None:
        return None
    node: Any = layers[-1]
    if config.get("class_name") != "Sequential":
        by_name = {_name_of(n): n for n in layers if isinstance(n, dict)}
        node = by_name.get(outputs[0]) if outputs and len(outputs) == 1 else None
    if not isinstance(node, dict) or node.get("class_name") != "Dense":
        return None
    layer_config = node.get("config")
    return layer_config.get("units") if isinstance(layer_config, dict) else None


def _name_of(node: dict[str, Any]) -> str | None:
    config = node.get("config")
    name = config.get("name") if isinstance(config, dict) else None
    return name if isinstance(name, str) else None


def _parsed(spec: ModelSpec) -> dict[str, Any] | None:
    """A spec's Keras config as a dict; None for a layer list or text that is not one,
    or is too large or too deeply nested to read (``check_model_spec`` says why)."""
    if not spec.keras_json:
        return None
    try:
        config = _decoded(spec.keras_json)
    except InvalidRequest:
        return None
    return config if isinstance(config, dict) else None


@functools.lru_cache(maxsize=1)
def _decoded(text: str) -> Any:
    """``json.loads``, once per config: one request's checks (loss layers, outputs, the
    allowlist walk) all read the config it sends, up to MAX_CONFIG_BYTES of it, one
    after the other. Read-only for every caller; only the last config is kept. Its size
    and nesting are checked first: past about 1,000 levels json.loads raises
    RecursionError, and every walk of the config recurses too."""
    if len(text) > MAX_CONFIG_BYTES:
        raise InvalidRequest(
            f"model config is {len(text)} bytes; the limit is {MAX_CONFIG_BYTES}",
            field=_KERAS_JSON,
        )
    if (depth := nesting(text)) > MAX_CONFIG_DEPTH:
        raise InvalidRequest(
            f"{_KERAS_JSON} is nested {depth} levels deep; the limit is {MAX_CONFIG_DEPTH} "
            "(send what model.to_json() returns)",
            field=_KERAS_JSON,
        )
    try:
        return json.loads(text)
    except ValueError as exc:  # JSONDecodeError, or an integer of over 4300 digits
        raise InvalidRequest(f"{_KERAS_JSON} is not JSON: {exc}", field=_KERAS_JSON) from None


def nesting(text: str) -> int:
    """How deep arrays and objects nest in JSON text (brackets inside strings left out),
    counted without parsing it."""
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text)).encode()
    if not brackets:
        return 0
    codes = np.frombuffer(brackets, dtype=np.uint8)
    steps = np.where((codes == ord("[")) | (codes == ord("{")), 1, -1)
    return int(np.cumsum(steps).max())


def registered_names(node: Any) -> set[str]:
    """Every ``registered_name`` in a Keras config."""
    if isinstance(node, list):
        return set().union(*map(registered_names, node)) if node else set()
    if not isinstance(node, dict):
        return set()
    found = {node["registered_name"]} if isinstance(node.get("registered_name"), str) else set()
    return found.union(*map(registered_names, node.values()))


def check_params(params: dict[str, Any], where: str) -> None:
    """Walk the parameters of a compile object or callback as a model config is walked:
    a nested Keras object must be allowed, and nothing may carry code."""
    _walk(params, where)


def _walk(node: Any, where: str, field: str | None = None, depth: int = 0) -> None:
    """Check every object nested in ``node``; errors name ``where`` and ``field``."""
    if depth > MAX_CONFIG_DEPTH:
        raise InvalidRequest(
            f"{where}: nested more than {MAX_CONFIG_DEPTH} levels deep; the limit is "
            f"{MAX_CONFIG_DEPTH}",
            field=field,
        )
    if isinstance(node, list):
        for item in node:
            _walk(item, where, field, depth + 1)
        return
    if not isinstance(node, dict):
        return
    if "class_name" in node:
        where = _describe(node, where)
        _check_object(node, where, field)
    if bad := _FORBIDDEN_KEYS & node.keys():
        raise InvalidRequest(
            f"{where}: {sorted(bad)[0]!r} is not allowed (no code in specs)", field=field
        )
    for value in node.values():
        _walk(value, where, field, depth + 1)


def _check_object(node: dict[str, Any], where: str, field: str | None = None) -> None:
    """A built-in Keras class from a Keras module, or a plugin layer by registered name,
    with a config object of sizes within bounds."""
    try:
        _check_named(node, where)
    except InvalidRequest as exc:
        raise InvalidRequest(exc.message, field=field) from None
    config = node.get("config")
    if isinstance(config, dict):
        _check_sizes(config, where, field)
    elif config is not None and not isinstance(config, str):  # a function's is its name
        raise InvalidRequest(
            f"{where}: 'config' must be a JSON object (the class's constructor arguments); "
            f"got {shown(config)}",
            field=field,
        )


def _check_named(node: dict[str, Any], where: str) -> None:
    class_name, registered = node["class_name"], node.get("registered_name")
    if registered not in (None, class_name):
        layers = installed().model_layers()
        plugin = next((p for p in layers if p.name == registered), None)
        if plugin is None:
            names = ", ".join(p.name for p in layers) or "none"
            raise InvalidRequest(
                f"{where}: registered_name {shown(registered)} is not a plugin installed on the "
                f"server; plugin layers: {names}"
            )
        if class_name != plugin.class_name or node.get("module") not in (None, plugin.module):
            raise InvalidRequest(
                f"{where}: {shown(registered)} is the plugin class "
                f"{plugin.module}.{plugin.class_name}, not "
                f"{str(node.get('module'))[:ECHO_LIMIT]}.{str(class_name)[:ECHO_LIMIT]}"
            )
        return
    _check_class(class_name, where)
    _check_module(node.get("module"), where)


def _describe(node: dict[str, Any], where: str) -> str:
    name, class_name = _name_of(node), node["class_name"]
    if name is None:
        return where
    shown_class = class_name if isinstance(class_name, str) and len(class_name) <= 64 else "?"
    return f"layer {shown(name)} ({shown_class})"


def _check_class(name: Any, where: str, allowed: frozenset[str] = _ALLOWED) -> None:
    if name == "Lambda":
        raise InvalidRequest(
            f"{where}: Lambda layers are not allowed (they carry code); register a plugin "
            "layer on the server instead"
        )
    if not isinstance(name, str) or name not in allowed:
        raise InvalidRequest(
            f"{where}: class {shown(name)} is not an allowed Keras class; use a built-in Keras "
            "layer or a plugin registered on the server"
        )


def _check_module(module: Any, where: str) -> None:
    if module is None or module == "keras":
        return
    if not isinstance(module, str) or not module.startswith(allowed_keras.ALLOWED_MODULE_PREFIXES):
        raise InvalidRequest(f"{where}: module {shown(module)} is not allowed; only Keras modules")
