"""Checks a model spec, and the parameters of compile objects and callbacks, against the
allowlist before anything is deserialized.

Keras ``safe_mode`` alone has been bypassed repeatedly, so a client-supplied config is
walked as plain JSON first: every object it names must be a built-in Keras class on the
allowlist, from a Keras module, or a layer registered by a server-side plugin (by its
registered name, ``package>Name``), with no lambdas or functions inside.
"""

from __future__ import annotations

import functools
import json
from typing import TYPE_CHECKING, Any

from service.domain import allowed_keras
from service.errors import InvalidRequest
from service.plugins.registry import Kind, Plugin, installed

if TYPE_CHECKING:
    from service.domain.job_specs import ModelSpec

MAX_LAYERS = 1000
MAX_CONFIG_BYTES = 4 * 1024 * 1024
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
        _walk(layer, field)


def _check_keras_config(text: str) -> None:
    if len(text) > MAX_CONFIG_BYTES:
        raise InvalidRequest(f"model config is {len(text)} bytes; the limit is {MAX_CONFIG_BYTES}")
    try:
        config = _decoded(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(
            f"model.keras_json is not JSON: {exc}", field="model.keras_json"
        ) from None
    if not isinstance(config, dict) or config.get("class_name") not in allowed_keras.MODELS:
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
        raise InvalidRequest(f"model has {len(layers)} layers; the limit is {MAX_LAYERS}")
    _walk(config, "model")


def _layer_plugin(name: str, field: str) -> Plugin:
    if name == "Lambda":
        _check_class(name, field)
    registry = installed()
    plugin = registry.get(name)
    if plugin is None or plugin.kind is not Kind.LAYER:
        layers = registry.names(Kind.LAYER)
        raise InvalidRequest(
            f"{field}: {name!r} is neither a Keras layer class nor a plugin layer; plugin "
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
        by_name = {n.get("config", {}).get("name"): n for n in layers if isinstance(n, dict)}
        node = by_name.get(outputs[0]) if outputs and len(outputs) == 1 else None
    if not isinstance(node, dict) or node.get("class_name") != "Dense":
        return None
    layer_config = node.get("config")
    return layer_config.get("units") if isinstance(layer_config, dict) else None


def _parsed(spec: ModelSpec) -> dict[str, Any] | None:
    """A spec's Keras config as a dict; None for a layer list or text that is not one
    (``check_model_spec`` says why)."""
    if not spec.keras_json:
        return None
    try:
        config = _decoded(spec.keras_json)
    except json.JSONDecodeError:
        return None
    return config if isinstance(config, dict) else None


@functools.lru_cache(maxsize=1)
def _decoded(text: str) -> Any:
    """``json.loads``, once per config: one request's checks (loss layers, outputs, the
    allowlist walk) all read the config it sends, up to MAX_CONFIG_BYTES of it, one
    after the other. Read-only for every caller; only the last config is kept."""
    return json.loads(text)


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


def _walk(node: Any, where: str) -> None:
    if isinstance(node, list):
        for item in node:
            _walk(item, where)
        return
    if not isinstance(node, dict):
        return
    if "class_name" in node:
        where = _describe(node, where)
        _check_object(node, where)
    if bad := _FORBIDDEN_KEYS & node.keys():
        raise InvalidRequest(f"{where}: {sorted(bad)[0]!r} is not allowed (no code in specs)")
    for value in node.values():
        _walk(value, where)


def _check_object(node: dict[str, Any], where: str) -> None:
    """A built-in Keras class from a Keras module, or a plugin layer by registered name."""
    class_name, registered = node["class_name"], node.get("registered_name")
    if registered not in (None, class_name):
        layers = installed().model_layers()
        plugin = next((p for p in layers if p.name == registered), None)
        if plugin is None:
            names = ", ".join(p.name for p in layers) or "none"
            raise InvalidRequest(
                f"{where}: registered_name {registered!r} is not a plugin installed on the "
                f"server; plugin layers: {names}"
            )
        if class_name != plugin.class_name or node.get("module") not in (None, plugin.module):
            raise InvalidRequest(
                f"{where}: {registered!r} is the plugin class {plugin.module}.{plugin.class_name}, "
                f"not {node.get('module')}.{class_name}"
            )
        return
    _check_class(class_name, where)
    _check_module(node.get("module"), where)


def _describe(node: dict[str, Any], where: str) -> str:
    config = node.get("config")
    name = config.get("name") if isinstance(config, dict) else None
    return f"layer {name!r} ({node['class_name']})" if isinstance(name, str) else where


def _check_class(name: Any, where: str, allowed: frozenset[str] = _ALLOWED) -> None:
    if name == "Lambda":
        raise InvalidRequest(
            f"{where}: Lambda layers are not allowed (they carry code); register a plugin "
            "layer on the server instead"
        )
    if not isinstance(name, str) or name not in allowed:
        raise InvalidRequest(
            f"{where}: class {name!r} is not an allowed Keras class; use a built-in Keras "
            "layer or a plugin registered on the server"
        )


def _check_module(module: Any, where: str) -> None:
    if module is None or module == "keras":
        return
    if not isinstance(module, str) or not module.startswith(allowed_keras.ALLOWED_MODULE_PREFIXES):
        raise InvalidRequest(f"{where}: module {module!r} is not allowed; only Keras modules")
