"""The registry of server-side plugins: what each object is, and the checks a request's
use of one must pass before a job is queued.

TF-free, so the api role checks plugin names and parameters without Keras: the objects
are described once, at discovery (``service.plugins.discovery``), by their signatures.
Every process installs its registry once at start-up (``install``); the request checks
in ``service.domain`` read it through ``installed``.
"""

from __future__ import annotations

import enum
import functools
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from service.errors import FailedPrecondition, InvalidRequest

SEPARATOR = ">"  # Keras's registered names are "package>name"


class Kind(enum.StrEnum):
    LOSS = "loss"
    METRIC = "metric"
    LAYER = "layer"
    CALLBACK = "callback"


class Form(enum.StrEnum):
    FUNCTION = "function"  # a loss or metric function of (y_true, y_pred)
    CLASS = "class"  # a Loss, Metric, Layer or Callback subclass
    LOSS_LAYER = "loss_layer"  # a layer that calls add_loss: used in a model, not in compile


# Keyword arguments a subclass's ``**kwargs`` passes on to its Keras base class.
BASE_KWARGS: Mapping[Kind, frozenset[str]] = {
    Kind.LOSS: frozenset({"name", "reduction", "dtype"}),
    Kind.METRIC: frozenset({"name", "dtype"}),
    Kind.LAYER: frozenset({"name", "trainable", "dtype", "autocast", "activity_regularizer"}),
    Kind.CALLBACK: frozenset(),
}


@dataclass(frozen=True)
class Param:
    """One constructor (or function) parameter, from its signature."""

    name: str
    type: str = ""  # the annotation, or the default's type; "" when neither says
    default: Any = None  # JSON-safe; meaningful only when not required
    required: bool = False

    def describe(self) -> str:
        text = self.name + (f": {self.type}" if self.type else "")
        return text if self.required else f"{text} = {self.default!r}"


@dataclass(frozen=True)
class Plugin:
    """One registered object; ``obj`` is the Python object itself (None in a registry
    rebuilt from descriptions)."""

    name: str  # the registered name, "package>Name"
    kind: Kind
    form: Form
    package: str
    module: str
    class_name: str  # the object's ``__name__``, as Keras configs name it
    doc: str = ""
    distribution: str = ""
    version: str = ""
    params: tuple[Param, ...] = ()
    var_kwargs: bool = False  # takes **kwargs (passed to the Keras base class)
    obj: Any = field(default=None, compare=False, repr=False)

    @property
    def base_kwargs(self) -> frozenset[str]:
        """What ``**kwargs`` may carry to the Keras base class (nothing without it)."""
        if not self.var_kwargs:
            return frozenset()
        base = Kind.LAYER if self.form is Form.LOSS_LAYER else self.kind
        return BASE_KWARGS[base] - {p.name for p in self.params}

    def signature(self) -> str:
        parts = [p.describe() for p in self.params]
        if base := sorted(self.base_kwargs):
            parts.append("and the base class's " + ", ".join(base))
        return f"{self.name}({', '.join(parts)})"

    def check_params(self, params: Mapping[str, Any], field: str) -> None:
        """Raise InvalidRequest naming the parameter and the signature when ``params``
        cannot be passed to this object; its message starts with ``field`` if given."""
        at = f"{field}: " if field else ""
        allowed = {p.name for p in self.params} | self.base_kwargs
        for key in params:
            if key not in allowed:
                raise InvalidRequest(
                    f"{at}{self.kind} {self.name!r} has no parameter {key!r}; "
                    f"it takes {self.signature()}",
                    field=f"{field}.{key}" if field else key,
                )
        for param in self.params:
            if param.required and param.name not in params:
                raise InvalidRequest(
                    f"{at}{self.kind} {self.name!r} needs parameter {param.name!r}; "
                    f"it takes {self.signature()}",
                    field=f"{field}.{param.name}" if field else param.name,
                )
            if param.required and param.name in params and params[param.name] is None:
                raise InvalidRequest(
                    f"{at}{self.kind} {self.name!r} needs a value for parameter "
                    f"{param.name!r}, not null; it takes {self.signature()}",
                    field=f"{field}.{param.name}" if field else param.name,
                )
            if param.name in params and not fits_json_type(param.type, params[param.name]):
                raise InvalidRequest(
                    f"{at}parameter {param.name!r} of {self.kind} {self.name!r} must be "
                    f"{param.type}, got {params[param.name]!r}; it takes {self.signature()}",
                    field=f"{field}.{param.name}" if field else param.name,
                )


CHECKED_TYPES = frozenset({"float", "int", "bool", "str"})


def fits_json_type(type_name: str, value: object) -> bool:
    """Whether a JSON value can be a parameter of a plain type a signature names
    ("float", "int", "bool", "str"; any other, and null, are not checked). JSON numbers
    may arrive as floats, so an int must be a whole one; a bool is not a number. The
    Keras signature check (``service.domain.keras_signatures``) uses it too."""
    if type_name not in CHECKED_TYPES or value is None:
        return True
    if type_name == "bool":
        return isinstance(value, bool)
    if type_name == "str":
        return isinstance(value, str)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    if type_name == "int" and isinstance(value, float):
        return math.isfinite(value) and value.is_integer()
    return True


@dataclass(frozen=True)
class Failure:
    """A plugin source that could not be loaded: its entry point or module, and why."""

    source: str
    error: str


@dataclass(frozen=True)
class Registry:
    """Every plugin object of this process, keyed by registered name."""

    plugins: tuple[Plugin, ...] = ()
    failures: tuple[Failure, ...] = ()

    @functools.cached_property
    def _by_name(self) -> dict[str, Plugin]:
        return {p.name: p for p in self.plugins}

    def get(self, name: str) -> Plugin | None:
        return self._by_name.get(name)

    def of(self, kind: Kind, forms: Iterable[Form] = tuple(Form)) -> list[Plugin]:
        wanted = set(forms)
        return [p for p in self.plugins if p.kind is kind and p.form in wanted]

    def names(self, kind: Kind, forms: Iterable[Form] = tuple(Form)) -> list[str]:
        return sorted(p.name for p in self.of(kind, forms))

    def model_layers(self) -> list[Plugin]:
        """Objects a model config may contain: layers, and layers that add a loss."""
        return [p for p in self.plugins if p.form is Form.LOSS_LAYER or p.kind is Kind.LAYER]

    def find(
        self, kind: Kind, name: str, field: str, forms: Iterable[Form] = tuple(Form)
    ) -> Plugin:
        """The plugin ``name`` of ``kind``, or InvalidRequest listing what is installed."""
        plugin = self.get(name)
        forms = tuple(forms)
        if plugin is not None and plugin.kind is kind and plugin.form in forms:
            return plugin
        available = self.names(kind, forms)
        listing = ", ".join(available) if available else "none is installed"
        at = f"{field}: " if field else ""
        raise InvalidRequest(
            f"{at}unknown {kind} plugin {name!r}; installed {kind} plugins: {listing}",
            field=field or None,
        )


def used_plugins(registry: Registry, *texts: str) -> list[dict[str, str]]:
    """The plugins whose registered name occurs, quoted, in any of ``texts`` (a model's
    Keras JSON, a version's metadata): what its fitserve.json records under ``plugins``,
    with the distribution and version that provided each."""
    blob = "\n".join(texts)
    return [
        {"name": p.name, "kind": str(p.kind), "distribution": p.distribution, "version": p.version}
        for p in registry.plugins
        if json.dumps(p.name) in blob
    ]


def check_recorded(recorded: object, registry: Registry, what: str) -> None:
    """FAILED_PRECONDITION naming the packages and versions to install when ``what`` (a
    stored version) uses plugins ``registry`` lacks; versions stored before plugins were
    recorded (no list) pass, and the worker reports an unknown name if one is missing."""
    if not isinstance(recorded, list):
        return
    missing = [
        r
        for r in recorded
        if isinstance(r, dict)
        and isinstance(r.get("name"), str)
        and registry.get(r["name"]) is None
    ]
    if not missing:
        return

    def _source(r: dict[str, Any]) -> str:
        dist, version = r.get("distribution") or "", r.get("version") or ""
        if not dist:
            return "a module listed in FITSERVE_PLUGINS"
        return f"{dist}=={version}" if version else str(dist)

    need = "; ".join(f"{r['name']} (install {_source(r)})" for r in missing)
    raise FailedPrecondition(
        f"{what} uses plugins this server does not have: {need}. Install them on every "
        "server and worker, then retry"
    )


EMPTY = Registry()
_installed: Registry = EMPTY


def install(registry: Registry) -> None:
    """Make ``registry`` the one this process's request checks use (at start-up)."""
    global _installed
    _installed = registry


def installed() -> Registry:
    """The registry this process installed (empty until one is)."""
    return _installed
