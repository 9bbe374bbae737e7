"""Finds plugins: entry points in the group ``fitserve.plugins``, and the modules
``FITSERVE_PLUGINS`` names for code that is not packaged.

A plugin module declares what it provides in one dict, ``FITSERVE_PLUGIN``::

    FITSERVE_PLUGIN = {
        "package": "examples",          # optional; default: the entry point's name
        "losses": [huber, ScaledHuber, LogisticEndpoint],
        "metrics": [TruePositives],
        "layers": {"SimpleDense": SimpleDense},   # a list, or names mapped to objects
        "callbacks": [LogEvery],
    }

Each object is registered as ``package>Name`` (its ``__name__``, or the key it is mapped
to). Objects are classified by their Keras base class, read from the class's MRO by name,
so discovery itself imports no Keras (the plugin modules import it). A source that fails
to import or declares something wrong becomes a ``Failure``: it is logged and reported,
and the rest still load.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import ModuleType
from typing import Any

from service.plugins.registry import SEPARATOR, Failure, Form, Kind, Param, Plugin, Registry

log = logging.getLogger(__name__)

GROUP = "fitserve.plugins"
DECLARATION = "FITSERVE_PLUGIN"
_SECTIONS: Mapping[str, Kind] = {
    "losses": Kind.LOSS,
    "metrics": Kind.METRIC,
    "layers": Kind.LAYER,
    "callbacks": Kind.CALLBACK,
}
_BASES: Mapping[Kind, str] = {
    Kind.LOSS: "Loss",
    Kind.METRIC: "Metric",
    Kind.LAYER: "Layer",
    Kind.CALLBACK: "Callback",
}
_FUNCTION_ARGS = ("y_true", "y_pred")


class PluginError(Exception):
    """A declaration that cannot be registered."""


def discover(modules: Sequence[str] = (), group: str = GROUP) -> Registry:
    """Every plugin of the installed entry points and of ``modules``; logs what it found."""
    plugins: list[Plugin] = []
    failures: list[Failure] = []
    sources: list[tuple[str, Callable[[], tuple[ModuleType, str, str, str]]]] = [
        (f"entry point {ep.name!r} ({ep.value})", _entry_point_loader(ep))
        for ep in importlib.metadata.entry_points(group=group)
    ]
    sources += [(f"module {name!r} (FITSERVE_PLUGINS)", _module_loader(name)) for name in modules]
    for source, load in sources:
        try:
            module, package, distribution, version = load()
            found = describe_module(module, package, distribution, version)
        except Exception as exc:  # a broken plugin must not stop the server
            failures.append(Failure(source, f"{type(exc).__name__}: {exc}"))
            log.error("plugin %s failed to load: %s: %s", source, type(exc).__name__, exc)
            continue
        duplicate = next((p.name for p in found if any(q.name == p.name for q in plugins)), None)
        if duplicate is not None:
            failures.append(Failure(source, f"{duplicate!r} is already registered by another"))
            log.error("plugin %s: %r is already registered by another", source, duplicate)
            continue
        plugins += found
        log.info("plugins loaded from %s: %s", source, ", ".join(p.name for p in found))
    if not sources:
        log.info("no plugins installed")
    return Registry(tuple(plugins), tuple(failures))


def _entry_point_loader(
    ep: importlib.metadata.EntryPoint,
) -> Callable[[], tuple[ModuleType, str, str, str]]:
    def load() -> tuple[ModuleType, str, str, str]:
        loaded = ep.load()
        module = loaded if isinstance(loaded, ModuleType) else inspect.getmodule(loaded)
        if module is None:
            raise PluginError(f"entry point {ep.value!r} is not a module")
        dist = ep.dist
        return module, ep.name, dist.name if dist else "", dist.version if dist else ""

    return load


def _module_loader(name: str) -> Callable[[], tuple[ModuleType, str, str, str]]:
    def load() -> tuple[ModuleType, str, str, str]:
        module = importlib.import_module(name)
        top = name.partition(".")[0]
        try:
            version = importlib.metadata.version(top)
        except importlib.metadata.PackageNotFoundError:
            version = ""
        return module, name.rpartition(".")[2], top if version else "", version

    return load


def describe_module(
    module: ModuleType, package: str, distribution: str = "", version: str = ""
) -> list[Plugin]:
    """The plugins a module's ``FITSERVE_PLUGIN`` declares."""
    declaration = getattr(module, DECLARATION, None)
    if not isinstance(declaration, Mapping):
        raise PluginError(f"module {module.__name__!r} has no {DECLARATION} dict")
    unknown = set(declaration) - {"package", *_SECTIONS}
    if unknown:
        raise PluginError(
            f"{DECLARATION} has unknown key {sorted(unknown)[0]!r}; "
            f"valid: package, {', '.join(_SECTIONS)}"
        )
    package = str(declaration.get("package") or package)
    if not package or SEPARATOR in package:
        raise PluginError(f"package name {package!r} must be non-empty and have no {SEPARATOR!r}")
    found: list[Plugin] = []
    for section, kind in _SECTIONS.items():
        for name, obj in _entries(declaration.get(section, ())):
            found.append(
                describe(obj, kind, f"{package}{SEPARATOR}{name}", package, distribution, version)
            )
    names = [p.name for p in found]
    if len(set(names)) != len(names):
        raise PluginError(f"{DECLARATION} names {max(names, key=names.count)!r} twice")
    return found


def _entries(section: Any) -> Iterable[tuple[str, Any]]:
    if isinstance(section, Mapping):
        return [(str(k), v) for k, v in section.items()]
    if isinstance(section, list | tuple):
        return [(getattr(obj, "__name__", repr(obj)), obj) for obj in section]
    raise PluginError(
        f"a {DECLARATION} section must be a list or a dict, not {type(section).__name__}"
    )


def describe(
    obj: Any, kind: Kind, name: str, package: str, distribution: str = "", version: str = ""
) -> Plugin:
    """One object as a Plugin, classified by its Keras base class."""
    form = _form(obj, kind, name)
    target = obj.__init__ if inspect.isclass(obj) else obj
    params, var_kwargs = _params(target, skip=_FUNCTION_ARGS if form is Form.FUNCTION else ())
    return Plugin(
        name=name,
        kind=kind,
        form=form,
        package=package,
        module=getattr(obj, "__module__", ""),
        class_name=obj.__name__,
        doc=inspect.getdoc(obj) or "",
        distribution=distribution,
        version=version,
        params=tuple(params),
        var_kwargs=var_kwargs,
        obj=obj,
    )


def _form(obj: Any, kind: Kind, name: str) -> Form:
    if inspect.isclass(obj):
        if _has_base(obj, _BASES[kind]):
            return Form.CLASS
        if kind is Kind.LOSS and _has_base(obj, "Layer"):
            return Form.LOSS_LAYER
        also = " (or a Layer that calls add_loss)" if kind is Kind.LOSS else ""
        raise PluginError(
            f"{name}: a {kind} plugin class must subclass keras's {_BASES[kind]}{also}"
        )
    if inspect.isfunction(obj) and kind in (Kind.LOSS, Kind.METRIC):
        args = list(inspect.signature(obj).parameters)[:2]
        if tuple(args) != _FUNCTION_ARGS:
            raise PluginError(
                f"{name}: a {kind} function takes (y_true, y_pred, ...), not ({', '.join(args)})"
            )
        return Form.FUNCTION
    raise PluginError(
        f"{name}: a {kind} plugin must be a Keras {_BASES[kind]} subclass"
        + (" or a function of (y_true, y_pred)" if kind in (Kind.LOSS, Kind.METRIC) else "")
    )


def _has_base(cls: type, base: str) -> bool:
    return any(b.__name__ == base and b.__module__.startswith("keras") for b in cls.__mro__)


def _params(target: Any, skip: Sequence[str]) -> tuple[list[Param], bool]:
    signature = inspect.signature(target)
    params: list[Param] = []
    var_kwargs = False
    for i, (pname, p) in enumerate(signature.parameters.items()):
        if (i == 0 and pname == "self") or pname in skip or p.kind is p.VAR_POSITIONAL:
            continue
        if p.kind is p.VAR_KEYWORD:
            var_kwargs = True
            continue
        required = p.default is p.empty
        default = None if required else _json_safe(p.default)
        params.append(Param(pname, _type_name(p), default, required))
    return params, var_kwargs


def _type_name(p: inspect.Parameter) -> str:
    if p.annotation is not p.empty:
        text = (
            p.annotation if isinstance(p.annotation, str) else getattr(p.annotation, "__name__", "")
        )
        return str(text)
    if p.default is not p.empty and p.default is not None:
        return type(p.default).__name__
    return ""


def _json_safe(value: Any) -> Any:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)
    return value


def load(modules: Sequence[str] = ()) -> Registry:
    """Discover this process's plugins and install them for its request checks."""
    from service.plugins.registry import install

    registry = discover(modules)
    install(registry)
    return registry
