"""Builds and compiles Keras models from validated specs (worker side: imports Keras)."""

from __future__ import annotations

import functools
import inspect
from typing import Any

import keras

from service.domain.config_check import check_model_spec
from service.domain.job_specs import CompileSpec, ModelSpec, NamedConfig, whole_numbers
from service.domain.keras_signatures import NO_PARAMETERS
from service.errors import InvalidRequest
from service.plugins.registry import Kind, installed
from service.training import plugins

DEFAULT_INPUT_NAME = "x"


def build_model(spec: ModelSpec) -> keras.Model:
    """A fresh model from a checked spec; errors name the layer at fault."""
    check_model_spec(spec)
    if spec.keras_json:
        return _from_config(spec.keras_json)
    return _from_layers(spec.layers)


def _from_config(text: str) -> keras.Model:
    try:
        model = keras.models.model_from_json(text)
    except (ValueError, TypeError, KeyError) as exc:
        raise InvalidRequest(f"model.keras_json could not be built: {exc}") from None
    if not isinstance(model, keras.Model):
        raise InvalidRequest("model.keras_json did not describe a model")
    return model


def _from_layers(layers: list[dict[str, Any]]) -> keras.Model:
    first = dict(layers[0])
    input_shape = first.pop("input_shape", None)
    input_name = str(first.pop("input_name", DEFAULT_INPUT_NAME))
    if input_shape is None:
        raise InvalidRequest(
            "model.layers[0] needs 'input_shape', e.g. "
            '{"type": "Flatten", "input_shape": [28, 28]}',
            field="model.layers[0]",
        )
    model = keras.Sequential(
        [keras.Input(shape=tuple(int(d) for d in input_shape), name=input_name)]
    )
    for i, entry in enumerate([first, *layers[1:]]):
        try:
            model.add(layer(i, entry))
        except ValueError as exc:
            field = f"model.layers[{i}]"
            raise InvalidRequest(f"{field} ({entry['type']}): {exc}", field=field) from None
    return model


def layer(index: int, entry: dict[str, Any], where: str = "model.layers") -> keras.layers.Layer:
    """One entry of a layer list as a Keras (or plugin) layer; errors name it."""
    params = {k: v for k, v in entry.items() if k not in ("type", "input_shape")}
    kind = entry["type"]
    plugin = installed().get(kind)
    try:
        if plugin is not None and plugin.kind is Kind.LAYER:
            # A TypeError or ValueError is the request's (refused below, naming the layer);
            # anything else the plugin's own (the job fails naming it).
            built: keras.layers.Layer = plugin.obj(**plain_for(plugin.obj, params))
            return built
        cls = getattr(keras.layers, kind)
        built = cls(**plain_for(cls, params))
    except (TypeError, ValueError) as exc:
        raise InvalidRequest(
            f"{where}[{index}] ({kind}): {exc}", field=f"{where}[{index}]"
        ) from None
    return built


def plain_for(cls: Any, params: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``params`` for ``cls``: JSON numbers arrive as floats and Keras wants
    ints where a float is whole, but a parameter whose default is a float stays a float
    (Keras refuses ``learning_rate=0``, an int, where it takes ``0.0``)."""
    plain: dict[str, Any] = whole_numbers(params)
    try:
        defaults = {n: p.default for n, p in inspect.signature(cls).parameters.items()}
    except (TypeError, ValueError):
        return plain
    return {
        k: float(v) if isinstance(defaults.get(k), float) and type(v) is int else v
        for k, v in plain.items()
    }


def compile_model(model: keras.Model, spec: CompileSpec) -> None:
    """``model.compile`` from a spec; without a loss, the model must add its own."""
    if not spec.has_loss and not adds_loss(model):
        raise InvalidRequest(
            "compile.loss is required: this model has no layer that calls add_loss",
            field="compile.loss",
        )
    loss: Any = (
        {name: _loss(cfg) for name, cfg in spec.output_losses.items()}
        if spec.output_losses
        else _loss(spec.loss)
    )
    model.compile(
        optimizer=_optimizer(spec.optimizer),
        loss=loss,
        loss_weights=dict(spec.loss_weights) or None,
        metrics=(
            {name: [_metric(m) for m in ms] for name, ms in spec.output_metrics.items()}
            if spec.output_metrics
            else [_metric(m) for m in spec.metrics] or None
        ),
        weighted_metrics=[_metric(m) for m in spec.weighted_metrics] or None,
    )


def _optimizer(cfg: NamedConfig) -> keras.optimizers.Optimizer:
    return _construct(_classes(keras.optimizers, keras.optimizers.Optimizer), cfg, "optimizer")


def adds_loss(model: keras.Model) -> bool:
    """Whether a layer of the model is a plugin that calls ``add_loss``."""
    classes = plugins.loss_layer_classes()
    return bool(classes) and any(isinstance(layer, classes) for layer in _all_layers(model))


def _all_layers(layer: keras.layers.Layer) -> list[keras.layers.Layer]:
    """A layer and, for a model, every layer inside it, nested models included."""
    inner = getattr(layer, "layers", None) or []
    return [layer, *(sub for child in inner for sub in _all_layers(child))]


def _loss(cfg: NamedConfig | None) -> Any:
    if cfg is None:
        return None
    if installed().get(cfg.name) is not None:
        return plugins.loss(cfg)
    if not cfg.params:
        return cfg.name
    return _construct(_classes(keras.losses, keras.losses.Loss), cfg, "loss")


def _metric(cfg: NamedConfig) -> Any:
    if installed().get(cfg.name) is not None:
        return plugins.metric(cfg)
    if not cfg.params:
        return cfg.name
    return _construct(_classes(keras.metrics, keras.metrics.Metric), cfg, "metric")


@functools.cache
def _classes(module: Any, base: type) -> dict[str, type]:
    """Classes of a Keras module keyed by lowercase name without underscores."""
    return {
        name.lower(): cls
        for name, cls in vars(module).items()
        if inspect.isclass(cls) and issubclass(cls, base)
    }


def _construct(classes: dict[str, type], cfg: NamedConfig, what: str) -> Any:
    cls = classes.get(cfg.name.replace("_", "").lower())
    if cls is None:
        raise InvalidRequest(f"{what} {cfg.name!r} {NO_PARAMETERS}")
    try:
        return cls(**plain_for(cls, cfg.params))
    except (TypeError, ValueError) as exc:
        raise InvalidRequest(f"{what} {cfg.name!r}: {exc}") from None
