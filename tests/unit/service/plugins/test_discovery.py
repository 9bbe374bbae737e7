"""Plugin discovery: the example package's entry point, modules named as
FITSERVE_PLUGINS would, and the declarations that cannot be registered."""

import importlib.metadata
import logging
import sys
import types

import keras
import pytest

from service.plugins import discovery
from service.plugins.discovery import PluginError, describe, describe_module, discover, load
from service.plugins.registry import Form, Kind, Param, Registry, install, installed

EXAMPLES = {
    "examples>huber_fn": (Kind.LOSS, Form.FUNCTION, "huber_fn"),
    "examples>huber": (Kind.LOSS, Form.CLASS, "Huber"),
    "examples>LogisticEndpoint": (Kind.LOSS, Form.LOSS_LAYER, "LogisticEndpoint"),
    "examples>CategoricalTruePositives": (Kind.METRIC, Form.CLASS, "CategoricalTruePositives"),
    "examples>SimpleDense": (Kind.LAYER, Form.CLASS, "SimpleDense"),
    "examples>EpochMarker": (Kind.CALLBACK, Form.CLASS, "EpochMarker"),
}
FAULTS = {"faults>exploding_loss", "faults>ExplodingCallback", "faults>Hang", "faults>NeedsParam"}


@pytest.fixture(autouse=True)
def _keep_installed():
    old = installed()
    yield
    install(old)


def names(registry: Registry, package: str) -> set[str]:
    return {p.name for p in registry.plugins if p.package == package}


def module(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    for key, value in attrs.items():
        setattr(mod, key, value)
    return mod


def plugin_error(declaration: dict, package: str = "pkg") -> str:
    with pytest.raises(PluginError) as info:
        describe_module(module("mod", FITSERVE_PLUGIN=declaration), package)
    return str(info.value)


# Objects with the right and the wrong bases.
def good_loss(y_true, y_pred, scale: float = 1.0):
    return y_pred


def swapped_loss(y_pred, y_true):
    return y_pred


def wrong_args(a, b):
    return a


def one_arg(y_true):
    return y_true


class Plain:
    pass


class MyLoss(keras.losses.Loss):
    def call(self, y_true, y_pred):
        return y_pred


class MyLayer(keras.layers.Layer):
    def __init__(self, units: int, scale=0.5, *args, mode: str = "a", **kwargs):
        super().__init__(**kwargs)


SENTINEL = object()


class MyCallback(keras.callbacks.Callback):
    def __init__(self, every=2, marker=None, where=SENTINEL):
        super().__init__()


# A class that is only named like a Keras base: its MRO is not Keras's.
FakeLoss = type("Loss", (), {"__module__": "mylib.losses"})
Imposter = type("Imposter", (FakeLoss,), {})


# -- the example package and test modules ---------------------------------------------


def test_discover_finds_the_example_entry_point():
    registry = discover()

    found = {p.name: p for p in registry.plugins if p.package == "examples"}
    assert set(found) == set(EXAMPLES)
    version = importlib.metadata.version("fitserve-examples")
    for name, (kind, form, class_name) in EXAMPLES.items():
        p = found[name]
        assert (p.kind, p.form, p.class_name) == (kind, form, class_name), name
        assert p.distribution == "fitserve-examples"
        assert p.version == version
        assert p.module.startswith("fitserve_examples.")
        assert p.obj is not None
        assert p.doc
    assert registry.failures == ()


def test_the_example_parameters_come_from_the_signatures():
    registry = discover()

    huber = registry.get("examples>huber")
    assert huber.params[0] == Param("delta", "float", 1.0, required=False)
    assert huber.var_kwargs
    assert huber.base_kwargs == frozenset({"reduction", "dtype"})  # name is its own param

    huber_fn = registry.get("examples>huber_fn")
    assert huber_fn.params == (Param("threshold", "float", 1.0),)  # not y_true, y_pred
    assert not huber_fn.var_kwargs

    dense = registry.get("examples>SimpleDense")
    assert [p.name for p in dense.params] == ["units", "activation", "scale"]
    assert dense.params[0] == Param("units", "int", 32)

    marker = registry.get("examples>EpochMarker")
    assert marker.params == (Param("every", "int", 1), Param("key", "str", "epoch_seconds"))
    assert marker.signature() == "examples>EpochMarker(every: int = 1, key: str = 'epoch_seconds')"


def test_a_module_adds_its_objects_under_its_package():
    registry = discover(["tests.plugins.faults"])

    assert names(registry, "examples") == set(EXAMPLES)
    assert names(registry, "faults") == FAULTS
    needs = registry.get("faults>NeedsParam")
    assert (needs.kind, needs.form) == (Kind.CALLBACK, Form.CLASS)
    assert needs.params == (Param("every", "int", None, required=True),)
    assert needs.module == "tests.plugins.faults"
    assert (needs.distribution, needs.version) == ("", "")  # not packaged
    assert registry.get("faults>exploding_loss").form is Form.FUNCTION
    assert registry.failures == ()


def test_a_module_that_fails_to_import_is_a_failure_and_the_rest_load(caplog):
    with caplog.at_level(logging.ERROR, logger=discovery.__name__):
        registry = discover(["tests.plugins.broken", "tests.plugins.faults"])

    (failure,) = registry.failures
    assert failure.source == "module 'tests.plugins.broken' (FITSERVE_PLUGINS)"
    assert failure.error == "ImportError: broken plugin: a dependency it needs is not installed"
    assert names(registry, "examples") == set(EXAMPLES)
    assert names(registry, "faults") == FAULTS
    assert "tests.plugins.broken" in caplog.text
    assert "broken plugin" in caplog.text


def test_a_module_that_does_not_exist_is_a_failure():
    registry = discover(["tests.plugins.no_such_module"])

    (failure,) = registry.failures
    assert failure.error.startswith("ModuleNotFoundError: ")
    assert "tests.plugins.no_such_module" in failure.error
    assert names(registry, "examples") == set(EXAMPLES)


def test_the_same_module_twice_is_loaded_once():
    registry = discover(["tests.plugins.faults", "tests.plugins.faults"])

    assert [p.name for p in registry.plugins].count("faults>NeedsParam") == 1
    (failure,) = registry.failures
    assert failure.source == "module 'tests.plugins.faults' (FITSERVE_PLUGINS)"
    assert failure.error == "'faults>exploding_loss' is already registered by another"


def test_a_module_that_reuses_an_installed_name_is_a_failure(monkeypatch):
    clash = module("clash", FITSERVE_PLUGIN={"package": "examples", "losses": {"huber": MyLoss}})
    monkeypatch.setitem(sys.modules, "clash", clash)

    registry = discover(["clash"])

    (failure,) = registry.failures
    assert failure.source == "module 'clash' (FITSERVE_PLUGINS)"
    assert failure.error == "'examples>huber' is already registered by another"
    assert registry.get("examples>huber").class_name == "Huber"  # the first one stays


def test_a_bad_declaration_in_a_module_is_a_failure_and_the_rest_load(monkeypatch):
    bad = module("badplugin", FITSERVE_PLUGIN={"losses": [Plain]})
    monkeypatch.setitem(sys.modules, "badplugin", bad)

    registry = discover(["badplugin", "tests.plugins.faults"])

    (failure,) = registry.failures
    assert failure.source == "module 'badplugin' (FITSERVE_PLUGINS)"
    assert failure.error.startswith("PluginError: badplugin>Plain: a loss plugin class must")
    assert names(registry, "faults") == FAULTS
    assert not names(registry, "badplugin")


def test_an_empty_group_gives_an_empty_registry():
    registry = discover(group="fitserve.no-such-group")

    assert registry.plugins == ()
    assert registry.failures == ()


def test_load_installs_what_it_discovers():
    registry = load(["tests.plugins.faults"])

    assert installed() is registry
    assert installed().get("faults>NeedsParam") is not None


# -- describe_module: what a declaration may say ----------------------------------------


def test_a_declaration_is_registered_under_its_package():
    found = describe_module(
        module(
            "mod",
            FITSERVE_PLUGIN={
                "losses": [good_loss, MyLoss],
                "layers": {"Renamed": MyLayer},
                "callbacks": (MyCallback,),
            },
        ),
        "pkg",
        "pkg-dist",
        "1.2",
    )

    assert [(p.name, p.kind, p.form, p.class_name) for p in found] == [
        ("pkg>good_loss", Kind.LOSS, Form.FUNCTION, "good_loss"),
        ("pkg>MyLoss", Kind.LOSS, Form.CLASS, "MyLoss"),
        ("pkg>Renamed", Kind.LAYER, Form.CLASS, "MyLayer"),
        ("pkg>MyCallback", Kind.CALLBACK, Form.CLASS, "MyCallback"),
    ]
    assert {(p.package, p.distribution, p.version) for p in found} == {("pkg", "pkg-dist", "1.2")}


def test_the_declared_package_wins_over_the_entry_point_name():
    found = describe_module(
        module("mod", FITSERVE_PLUGIN={"package": "mine", "losses": [good_loss]}), "ep"
    )

    assert [p.name for p in found] == ["mine>good_loss"]


def test_a_module_without_a_declaration_is_refused():
    with pytest.raises(PluginError) as info:
        describe_module(module("empty"), "pkg")
    assert str(info.value) == "module 'empty' has no FITSERVE_PLUGIN dict"

    with pytest.raises(PluginError) as info:
        describe_module(module("listed", FITSERVE_PLUGIN=[good_loss]), "pkg")
    assert str(info.value) == "module 'listed' has no FITSERVE_PLUGIN dict"


def test_an_unknown_key_is_refused_naming_the_valid_ones():
    assert plugin_error({"losses": [good_loss], "lossses": [good_loss]}) == (
        "FITSERVE_PLUGIN has unknown key 'lossses'; "
        "valid: package, losses, metrics, layers, callbacks"
    )


@pytest.mark.parametrize("package", ["", "a>b"])
def test_a_bad_package_name_is_refused(package):
    message = plugin_error({"package": package, "losses": [good_loss]}, package="")

    assert message == f"package name {package!r} must be non-empty and have no '>'"


def test_a_section_that_is_not_a_list_or_dict_is_refused():
    assert plugin_error({"losses": good_loss}) == (
        "a FITSERVE_PLUGIN section must be a list or a dict, not function"
    )


@pytest.mark.parametrize(
    ("section", "obj", "message"),
    [
        (
            "losses",
            Plain,
            "pkg>Plain: a loss plugin class must subclass keras's Loss "
            "(or a Layer that calls add_loss)",
        ),
        (
            "losses",
            Imposter,
            "pkg>Imposter: a loss plugin class must subclass keras's Loss "
            "(or a Layer that calls add_loss)",
        ),
        ("metrics", MyLoss, "pkg>MyLoss: a metric plugin class must subclass keras's Metric"),
        ("layers", MyCallback, "pkg>MyCallback: a layer plugin class must subclass keras's Layer"),
        (
            "callbacks",
            MyLayer,
            "pkg>MyLayer: a callback plugin class must subclass keras's Callback",
        ),
        ("layers", good_loss, "pkg>good_loss: a layer plugin must be a Keras Layer subclass"),
        (
            "callbacks",
            good_loss,
            "pkg>good_loss: a callback plugin must be a Keras Callback subclass",
        ),
        (
            "metrics",
            {"Five": 5},
            "pkg>Five: a metric plugin must be a Keras Metric subclass "
            "or a function of (y_true, y_pred)",
        ),
    ],
)
def test_an_object_of_the_wrong_base_is_refused(section, obj, message):
    declaration = {section: obj if isinstance(obj, dict) else [obj]}

    assert plugin_error(declaration) == message


@pytest.mark.parametrize(
    ("fn", "args"),
    [(wrong_args, "a, b"), (swapped_loss, "y_pred, y_true"), (one_arg, "y_true")],
)
@pytest.mark.parametrize(("section", "kind"), [("losses", "loss"), ("metrics", "metric")])
def test_a_function_must_take_y_true_and_y_pred_first(fn, args, section, kind):
    assert plugin_error({section: [fn]}) == (
        f"pkg>{fn.__name__}: a {kind} function takes (y_true, y_pred, ...), not ({args})"
    )


def test_a_name_declared_twice_is_refused():
    assert plugin_error({"losses": [good_loss, good_loss]}) == (
        "FITSERVE_PLUGIN names 'pkg>good_loss' twice"
    )
    assert plugin_error({"losses": {"Same": MyLoss}, "layers": {"Same": MyLayer}}) == (
        "FITSERVE_PLUGIN names 'pkg>Same' twice"
    )


# -- describe: parameters -----------------------------------------------------------------


def test_describe_reads_parameters_from_the_signature():
    layer = describe(MyLayer, Kind.LAYER, "pkg>MyLayer", "pkg")

    assert layer.params == (
        Param("units", "int", None, required=True),
        Param("scale", "float", 0.5),  # no annotation: the default's type
        Param("mode", "str", "a"),  # keyword-only; *args is skipped
    )
    assert layer.var_kwargs
    assert layer.obj is MyLayer


def test_describe_keeps_defaults_json_safe():
    cb = describe(MyCallback, Kind.CALLBACK, "pkg>MyCallback", "pkg")

    every, marker, where = cb.params
    assert every == Param("every", "int", 2)
    assert marker == Param("marker", "", None)  # neither annotation nor typed default
    assert where.type == "object"
    assert isinstance(where.default, str)
    assert where.default.startswith("<object object at ")
    assert not cb.var_kwargs


def test_describe_skips_y_true_and_y_pred_of_a_function_only():
    fn = describe(good_loss, Kind.LOSS, "pkg>good_loss", "pkg")

    assert fn.form is Form.FUNCTION
    assert fn.params == (Param("scale", "float", 1.0),)
    assert fn.module == __name__
    assert fn.signature() == "pkg>good_loss(scale: float = 1.0)"
