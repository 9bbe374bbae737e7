"""Plugins on the worker: registered with Keras, built from a request's names, and a
plugin's failure named as the plugin's.

``keras.saving.register_keras_serializable`` puts each loss, metric and layer under its
registered name (``package>Name``), so model configs and ``model.keras`` files that
name it deserialize here. Callbacks are not serialized with a model; they are run
through ``GuardedCallback``, which keeps the never-crash-training rule of fitserve's own
callbacks: a plugin callback that raises is reported in the job's events and switched
off for the rest of the job.
"""

from __future__ import annotations

import contextlib
import logging
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import keras

# Keras's own wrapper of a loss function and its keyword arguments: it serializes the
# function by registered name, so model.keras reloads wherever the plugin is installed.
# Not exported by keras.losses (keras.metrics exports its MeanMetricWrapper twin).
from keras.src.losses.losses import LossFunctionWrapper

from service.domain.job_specs import NamedConfig
from service.domain.job_store import JobStore
from service.errors import FailedPrecondition, FitserveError, plain_text
from service.plugins.registry import Form, Kind, Plugin, Registry, installed

log = logging.getLogger(__name__)


class PluginFailed(FailedPrecondition):
    """A plugin raised while a job ran: the job fails with the plugin's name and message."""

    reason = "PLUGIN_FAILED"


def register_with_keras(registry: Registry) -> None:
    """Register every serializable plugin object under its registered name (idempotent:
    a plugin that registered itself under the same name is left as it is)."""
    for plugin in registry.plugins:
        if plugin.kind is Kind.CALLBACK or plugin.obj is None:
            continue
        if keras.saving.get_registered_object(plugin.name) is plugin.obj:
            continue
        package, _, name = plugin.name.partition(">")
        keras.saving.register_keras_serializable(package=package, name=name)(plugin.obj)


def loss(cfg: NamedConfig) -> Any:
    """A plugin loss: a function (wrapped, with its parameters, so it serializes) or a
    ``Loss`` subclass built with its parameters."""
    plugin = _plugin(Kind.LOSS, cfg.name)
    if plugin.form is Form.FUNCTION:
        params = _plain(plugin, cfg.params)
        return LossFunctionWrapper(plugin.obj, name=_short(plugin), **params)
    return _build(plugin, cfg.params)


def metric(cfg: NamedConfig) -> Any:
    """A plugin metric: a function (averaged over batches, as Keras does with metric
    functions) or a ``Metric`` subclass built with its parameters."""
    plugin = _plugin(Kind.METRIC, cfg.name)
    if plugin.form is Form.FUNCTION:
        params = _plain(plugin, cfg.params)
        return keras.metrics.MeanMetricWrapper(plugin.obj, name=_short(plugin), **params)
    return _build(plugin, cfg.params)


def callbacks(
    configs: list[NamedConfig], jobs: JobStore, job_id: str
) -> list[keras.callbacks.Callback]:
    """The request's plugin callbacks, each guarded."""
    out = []
    for cfg in configs:
        plugin = _plugin(Kind.CALLBACK, cfg.name)
        out.append(GuardedCallback(plugin.name, _build(plugin, cfg.params), jobs, job_id))
    return out


def loss_layer_classes() -> tuple[type[keras.layers.Layer], ...]:
    """The plugin layer classes that call ``add_loss``."""
    return tuple(p.obj for p in installed().plugins if p.form is Form.LOSS_LAYER and p.obj)


def _plugin(kind: Kind, name: str) -> Plugin:
    return installed().find(kind, name, "")


def _short(plugin: Plugin) -> str:
    return plugin.name.partition(">")[2]


def _plain(plugin: Plugin, params: dict[str, Any]) -> dict[str, Any]:
    from service.training.building import plain_for  # building imports this module

    return plain_for(plugin.obj, params)


def _build(plugin: Plugin, params: dict[str, Any]) -> Any:
    with raised_by(plugin):
        return plugin.obj(**_plain(plugin, params))


@contextlib.contextmanager
def raised_by(plugin: Plugin) -> Iterator[None]:
    """Around code that runs a plugin: an exception becomes PluginFailed naming it."""
    try:
        yield
    except FitserveError:
        raise
    except Exception as exc:
        raise PluginFailed(f"plugin {plugin.name} raised {type(exc).__name__}: {exc}") from None


def blame(exc: BaseException) -> PluginFailed | None:
    """The plugin whose code raised ``exc`` (read from its traceback), as PluginFailed;
    None when no plugin code is on the traceback."""
    modules = {p.module: p for p in installed().plugins if p.module}
    if not modules:
        return None
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        plugin = modules.get(frame.f_globals.get("__name__", ""))
        if plugin is not None:
            owner = _owner(frame, plugin)
            message = str(exc).strip() or type(exc).__name__
            return PluginFailed(f"plugin {owner} raised {type(exc).__name__}: {message}"[:2000])
    return None


def _owner(frame: Any, fallback: Plugin) -> str:
    """The plugin object of a frame in a plugin module: the class whose method it is (or
    the function), else the module's first plugin."""
    self_obj = frame.f_locals.get("self")
    for plugin in installed().plugins:
        if plugin.obj is None:
            continue
        if (
            self_obj is not None
            and isinstance(plugin.obj, type)
            and isinstance(self_obj, plugin.obj)
        ):
            return plugin.name
        if getattr(plugin.obj, "__code__", None) is frame.f_code:
            return plugin.name
    return f"{fallback.package} (module {fallback.module})"


_HOOKS = (
    "on_batch_begin",
    "on_batch_end",
    "on_train_begin",
    "on_train_end",
    "on_epoch_begin",
    "on_epoch_end",
    "on_train_batch_begin",
    "on_train_batch_end",
    "on_test_begin",
    "on_test_end",
    "on_test_batch_begin",
    "on_test_batch_end",
    "on_predict_begin",
    "on_predict_end",
    "on_predict_batch_begin",
    "on_predict_batch_end",
)


class GuardedCallback(keras.callbacks.Callback):  # type: ignore[misc]
    """Runs a plugin callback so that it can never crash training: the first exception
    it raises is logged, reported as a WARNING event of the job naming the plugin, and
    the callback is off for the rest of the job.

    Only the hooks the plugin overrides are forwarded (as instance attributes, which
    Keras's ``is_default`` check sees): Keras syncs every step for a callback with batch
    hooks, so a plugin without them costs nothing per batch.
    """

    def __init__(
        self, name: str, inner: keras.callbacks.Callback, jobs: JobStore, job_id: str
    ) -> None:
        super().__init__()
        self.name, self.inner = name, inner
        self._jobs, self._job_id = jobs, job_id
        self.failed = False
        for hook in _HOOKS:
            if _overrides(inner, hook):
                setattr(self, hook, self._guard(hook))

    def set_model(self, model: keras.Model) -> None:
        super().set_model(model)
        self.inner.set_model(model)

    def set_params(self, params: dict[str, Any]) -> None:
        super().set_params(params)
        self.inner.set_params(params)

    def _guard(self, hook: str) -> Callable[..., None]:
        method = getattr(self.inner, hook)

        def call(*args: Any, **kwargs: Any) -> None:
            if self.failed:
                return
            try:
                method(*args, **kwargs)
            except Exception as exc:
                self.failed = True
                message = plain_text(
                    f"callback plugin {self.name} raised {type(exc).__name__} in {hook}: "
                    f"{exc}; it is off for the rest of this job"
                )
                log.warning(message, exc_info=True)
                try:
                    self._jobs.add_event(
                        self._job_id, "log", {"level": "WARNING", "message": message[:2000]}
                    )
                except Exception:
                    log.warning("could not report the callback's failure", exc_info=True)

        return call


def _overrides(callback: keras.callbacks.Callback, hook: str) -> bool:
    return getattr(type(callback), hook, None) is not getattr(keras.callbacks.Callback, hook, None)
