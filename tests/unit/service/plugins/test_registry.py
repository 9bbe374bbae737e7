"""The plugin registry without Keras: parameter checks against a plugin's signature,
and finding a plugin by kind and form."""

import pytest

from service.errors import InvalidRequest
from service.plugins.registry import (
    BASE_KWARGS,
    Failure,
    Form,
    Kind,
    Param,
    Plugin,
    Registry,
    install,
    installed,
)


def plugin(
    name: str = "pkg>scaled",
    kind: Kind = Kind.LOSS,
    form: Form = Form.CLASS,
    params: tuple[Param, ...] = (),
    var_kwargs: bool = False,
) -> Plugin:
    return Plugin(
        name=name,
        kind=kind,
        form=form,
        package=name.partition(">")[0],
        module="pkg.module",
        class_name=name.partition(">")[2],
        params=params,
        var_kwargs=var_kwargs,
    )


SCALED = plugin(
    params=(
        Param("k", "int", required=True),
        Param("factor", "float", 1.0),
        Param("mode", "str", "sum"),
        Param("strict", "bool", False),
        Param("anything", "str | None", None),
    ),
    var_kwargs=True,
)


def refused(p: Plugin, params: dict, field: str = "compile.loss") -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        p.check_params(params, field)
    return info.value


# -- Param and signature ------------------------------------------------------------


def test_a_param_describes_itself_as_in_a_signature():
    assert Param("k", "int", required=True).describe() == "k: int"
    assert Param("factor", "float", 1.0).describe() == "factor: float = 1.0"
    assert Param("mode", "str", "sum").describe() == "mode: str = 'sum'"
    assert Param("x").describe() == "x = None"


def test_the_signature_lists_params_then_the_base_class_kwargs():
    assert SCALED.signature() == (
        "pkg>scaled(k: int, factor: float = 1.0, mode: str = 'sum', strict: bool = False, "
        "anything: str | None = None, and the base class's dtype, name, reduction)"
    )


def test_the_signature_of_a_plugin_without_kwargs_has_no_base_class_part():
    p = plugin("pkg>marker", Kind.CALLBACK, params=(Param("every", "int", 1),))

    assert p.signature() == "pkg>marker(every: int = 1)"
    assert plugin("pkg>bare").signature() == "pkg>bare()"


def test_a_callback_with_kwargs_has_no_base_kwargs():
    p = plugin("pkg>cb", Kind.CALLBACK, params=(Param("every", "int", 1),), var_kwargs=True)

    assert p.base_kwargs == frozenset()
    assert p.signature() == "pkg>cb(every: int = 1)"


# -- base kwargs --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "form", "base"),
    [
        (Kind.LOSS, Form.CLASS, Kind.LOSS),
        (Kind.METRIC, Form.CLASS, Kind.METRIC),
        (Kind.LAYER, Form.CLASS, Kind.LAYER),
        (Kind.LOSS, Form.LOSS_LAYER, Kind.LAYER),  # a loss layer is a Layer
    ],
)
def test_base_kwargs_follow_the_keras_base_class(kind, form, base):
    p = plugin("pkg>x", kind, form, var_kwargs=True)

    assert p.base_kwargs == BASE_KWARGS[base]
    for key in BASE_KWARGS[base]:
        p.check_params({key: None}, "f")


def test_base_kwargs_are_accepted_only_with_var_kwargs():
    without = plugin(params=(Param("factor", "float", 1.0),))

    assert without.base_kwargs == frozenset()
    err = refused(without, {"name": "mine"})
    assert err.field == "compile.loss.name"
    assert "has no parameter 'name'" in err.message

    with_kwargs = plugin(params=(Param("factor", "float", 1.0),), var_kwargs=True)
    with_kwargs.check_params({"name": "mine", "reduction": "sum", "dtype": "float32"}, "f")


def test_a_base_kwarg_of_another_base_class_is_refused():
    loss_layer = plugin("pkg>endpoint", Kind.LOSS, Form.LOSS_LAYER, var_kwargs=True)
    metric = plugin("pkg>count", Kind.METRIC, var_kwargs=True)

    loss_layer.check_params({"trainable": False}, "f")
    assert "has no parameter 'reduction'" in refused(loss_layer, {"reduction": "sum"}).message
    assert "has no parameter 'reduction'" in refused(metric, {"reduction": "sum"}).message


def test_a_declared_param_named_like_a_base_kwarg_is_checked_as_the_param():
    p = plugin(params=(Param("name", "str", "scaled"),), var_kwargs=True)

    assert p.base_kwargs == frozenset({"reduction", "dtype"})
    assert (
        p.signature() == "pkg>scaled(name: str = 'scaled', and the base class's dtype, reduction)"
    )
    err = refused(p, {"name": 3})
    assert "parameter 'name' of loss 'pkg>scaled' must be str, got 3" in err.message


# -- unknown and missing parameters -------------------------------------------------


def test_an_unknown_parameter_names_it_and_the_signature():
    err = refused(SCALED, {"k": 1, "factr": 2.0})

    assert err.message == (
        "compile.loss: loss 'pkg>scaled' has no parameter 'factr'; it takes " + SCALED.signature()
    )
    assert err.field == "compile.loss.factr"


def test_without_a_field_the_message_has_no_prefix():
    err = refused(SCALED, {"k": 1, "factr": 2.0}, field="")

    assert err.message.startswith("loss 'pkg>scaled' has no parameter 'factr'; it takes pkg>")
    assert err.field == "factr"


def test_a_missing_required_parameter_is_named():
    err = refused(SCALED, {"factor": 2.0})

    assert err.message == (
        "compile.loss: loss 'pkg>scaled' needs parameter 'k'; it takes " + SCALED.signature()
    )
    assert err.field == "compile.loss.k"


def test_an_unknown_parameter_is_reported_before_a_missing_one():
    err = refused(SCALED, {"nope": 1})

    assert "has no parameter 'nope'" in err.message


def test_the_kind_is_named_in_the_message():
    p = plugin("pkg>marker", Kind.CALLBACK, params=(Param("every", "int", required=True),))

    err = refused(p, {}, field="plugins[0]")

    assert err.message.startswith("plugins[0]: callback 'pkg>marker' needs parameter 'every'")


def test_valid_parameters_pass():
    assert SCALED.check_params({"k": 3, "factor": 0.5, "mode": "mean", "strict": True}, "f") is None
    assert SCALED.check_params({"k": 3}, "f") is None


# -- types ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("factor", "big", "float"),
        ("factor", True, "float"),  # a bool is not a number here, though Python says so
        ("k", 2.5, "int"),
        ("k", float("inf"), "int"),
        ("k", "3", "int"),
        ("k", False, "int"),
        ("mode", 3, "str"),
        ("strict", 1, "bool"),
        ("strict", "yes", "bool"),
    ],
)
def test_a_value_of_the_wrong_type_is_refused(key, value, expected):
    params = {"k": 1, key: value}

    err = refused(SCALED, params)

    assert err.message == (
        f"compile.loss: parameter {key!r} of loss 'pkg>scaled' must be {expected}, "
        f"got {value!r}; it takes {SCALED.signature()}"
    )
    assert err.field == f"compile.loss.{key}"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("k", 2.0),  # JSON numbers arrive as floats: an integral one is an int
        ("k", 2),
        ("factor", 2),  # an int is a float
        ("factor", 0.25),
        ("strict", False),
        ("mode", "mean"),
        ("anything", 3),  # a type the checker does not know is not checked
        ("anything", {"nested": [1]}),
    ],
)
def test_a_value_of_a_fitting_type_is_accepted(key, value):
    assert SCALED.check_params({"k": 1, key: value}, "compile.loss") is None


# -- Registry -------------------------------------------------------------------------

HUBER = plugin("pkg>huber", Kind.LOSS, Form.CLASS)
HUBER_FN = plugin("pkg>huber_fn", Kind.LOSS, Form.FUNCTION)
ENDPOINT = plugin("pkg>Endpoint", Kind.LOSS, Form.LOSS_LAYER)
COUNT = plugin("pkg>Count", Kind.METRIC)
DENSE = plugin("pkg>Dense", Kind.LAYER)
MARKER = plugin("pkg>Marker", Kind.CALLBACK)
REGISTRY = Registry(
    (HUBER_FN, HUBER, ENDPOINT, COUNT, DENSE, MARKER),
    (Failure("module 'bad'", "ImportError: no"),),
)


def test_get_finds_by_registered_name():
    assert REGISTRY.get("pkg>huber") is HUBER
    assert REGISTRY.get("pkg>Marker") is MARKER
    assert REGISTRY.get("huber") is None
    assert REGISTRY.failures == (Failure("module 'bad'", "ImportError: no"),)


def test_of_and_names_filter_by_kind_and_form():
    assert REGISTRY.of(Kind.LOSS) == [HUBER_FN, HUBER, ENDPOINT]
    assert REGISTRY.of(Kind.LOSS, [Form.FUNCTION, Form.CLASS]) == [HUBER_FN, HUBER]
    assert REGISTRY.names(Kind.LOSS) == ["pkg>Endpoint", "pkg>huber", "pkg>huber_fn"]
    assert REGISTRY.names(Kind.LOSS, (Form.LOSS_LAYER,)) == ["pkg>Endpoint"]
    assert REGISTRY.names(Kind.METRIC) == ["pkg>Count"]
    assert REGISTRY.names(Kind.CALLBACK, (Form.FUNCTION,)) == []


def test_model_layers_are_layers_and_loss_layers():
    assert REGISTRY.model_layers() == [ENDPOINT, DENSE]


def test_find_returns_the_plugin_of_that_kind():
    assert REGISTRY.find(Kind.LOSS, "pkg>huber", "compile.loss") is HUBER
    assert REGISTRY.find(Kind.LOSS, "pkg>Endpoint", "model") is ENDPOINT  # all forms


def test_find_of_an_unknown_name_lists_the_installed_ones_of_that_kind():
    with pytest.raises(InvalidRequest) as info:
        REGISTRY.find(Kind.LOSS, "pkg>nope", "compile.loss")

    assert info.value.message == (
        "compile.loss: unknown loss plugin 'pkg>nope'; "
        "installed loss plugins: pkg>Endpoint, pkg>huber, pkg>huber_fn"
    )
    assert info.value.field == "compile.loss"


def test_find_of_a_plugin_of_another_kind_is_refused():
    with pytest.raises(InvalidRequest) as info:
        REGISTRY.find(Kind.METRIC, "pkg>huber", "compile.metrics")

    assert info.value.message == (
        "compile.metrics: unknown metric plugin 'pkg>huber'; installed metric plugins: pkg>Count"
    )


def test_find_with_nothing_installed_says_so():
    with pytest.raises(InvalidRequest) as info:
        REGISTRY.find(Kind.LAYER, "pkg>Nope", "")
    assert info.value.message == (
        "unknown layer plugin 'pkg>Nope'; installed layer plugins: pkg>Dense"
    )
    assert info.value.field is None

    with pytest.raises(InvalidRequest) as info:
        Registry().find(Kind.CALLBACK, "pkg>Marker", "plugins[0]")
    assert info.value.message == (
        "plugins[0]: unknown callback plugin 'pkg>Marker'; "
        "installed callback plugins: none is installed"
    )


def test_find_filters_by_form():
    compile_forms = (Form.FUNCTION, Form.CLASS)

    with pytest.raises(InvalidRequest) as info:
        REGISTRY.find(Kind.LOSS, "pkg>Endpoint", "compile.loss", compile_forms)

    assert info.value.message == (
        "compile.loss: unknown loss plugin 'pkg>Endpoint'; "
        "installed loss plugins: pkg>huber, pkg>huber_fn"
    )
    assert REGISTRY.find(Kind.LOSS, "pkg>huber_fn", "", iter(compile_forms)) is HUBER_FN


def test_a_form_filter_that_matches_nothing_says_none_is_installed():
    with pytest.raises(InvalidRequest) as info:
        REGISTRY.find(Kind.METRIC, "pkg>Count", "m", (Form.FUNCTION,))

    assert info.value.message.endswith("installed metric plugins: none is installed")


def test_install_makes_a_registry_the_installed_one():
    old = installed()
    try:
        install(REGISTRY)
        assert installed() is REGISTRY
        install(Registry())
        assert installed().plugins == ()
    finally:
        install(old)
    assert installed() is old


def test_a_version_records_the_plugins_its_config_names_with_their_package():
    from dataclasses import replace

    from service.plugins.registry import used_plugins

    dense = replace(DENSE, distribution="pkg-plugins", version="1.2.0")
    registry = Registry((HUBER, dense, COUNT))
    keras_json = '{"class_name": "Dense", "registered_name": "pkg>Dense", "config": {}}'
    metadata = '{"compile": {"loss": {"name": "pkg>huber"}, "metrics": ["accuracy"]}}'
    assert used_plugins(registry, keras_json, metadata) == [
        {"name": "pkg>huber", "kind": "loss", "distribution": "", "version": ""},
        {"name": "pkg>Dense", "kind": "layer", "distribution": "pkg-plugins", "version": "1.2.0"},
    ]
    # a name is matched whole: "pkg>Dense" does not make "pkg>DenseX" used, nor the reverse
    assert used_plugins(registry, '{"registered_name": "pkg>DenseX"}') == []


def test_a_version_using_a_plugin_this_server_lacks_is_a_failed_precondition():
    from service.errors import FailedPrecondition
    from service.plugins.registry import check_recorded

    recorded = [
        {"name": "pkg>huber", "kind": "loss", "distribution": "", "version": ""},
        {"name": "gone>Layer", "kind": "layer", "distribution": "gone-plugins", "version": "0.3"},
    ]
    with pytest.raises(FailedPrecondition) as refused:
        check_recorded(recorded, REGISTRY, "version 2 of 'm'")
    assert str(refused.value) == (
        "version 2 of 'm' uses plugins this server does not have: gone>Layer (install "
        "gone-plugins==0.3). Install them on every server and worker, then retry"
    )
    assert refused.value.code == "FAILED_PRECONDITION"
    # what the server has passes; so does a version stored before plugins were recorded
    check_recorded(recorded[:1], REGISTRY, "v")
    check_recorded(None, REGISTRY, "v")
    with pytest.raises(FailedPrecondition, match=r"install a module listed in FITSERVE_PLUGINS"):
        check_recorded([{"name": "x>y"}], REGISTRY, "v")
