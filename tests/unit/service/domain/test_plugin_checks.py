"""Request checks with plugins installed: plugin losses, metrics, callbacks and layers by
registered name with their parameters checked, thresholds, and a model that adds its own
loss. The registry is the example package's and tests/plugins/faults.py's."""

import copy
import json

import keras
import pytest
from fitserve_examples import LogisticEndpoint, SimpleDense

from service.domain.config_check import adds_loss, check_model_spec, registered_names
from service.domain.job_specs import (
    MISSING_LOSS,
    ModelSpec,
    NamedConfig,
    ThresholdSpec,
    parse_train,
)
from service.errors import InvalidRequest
from service.plugins.discovery import discover
from service.plugins.registry import EMPTY, Registry, install, installed
from service.training.building import build_model
from tests.unit.service.domain.test_job_specs import refused, request

COMPILE_LOSSES = ["examples>huber", "examples>huber_fn", "faults>exploding_loss"]
CALLBACKS = ["examples>EpochMarker", "faults>ExplodingCallback", "faults>Hang", "faults>NeedsParam"]
POPEN = {"class_name": "Popen", "config": {}}


@pytest.fixture(scope="module")
def registry() -> Registry:
    found = discover(["tests.plugins.faults"])
    assert found.failures == ()
    return found


@pytest.fixture(autouse=True)
def plugins(registry):
    old = installed()
    install(registry)
    yield registry
    install(old)


def model_refused(spec: ModelSpec) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        check_model_spec(spec)
    return info.value


def listed(message: str, after: str) -> list[str]:
    return message.split(after, 1)[1].split("; ")[0].split(", ")


def keras_json(*layers: dict) -> str:
    return json.dumps({"class_name": "Functional", "config": {"layers": list(layers)}})


def node(class_name: str, registered: str | None, name: str, module: str | None = None) -> dict:
    return {
        "class_name": class_name,
        "registered_name": registered,
        "module": module,
        "config": {"name": name},
    }


ENDPOINT = node("LogisticEndpoint", "examples>LogisticEndpoint", "endpoint")
DENSE_PLUGIN = node("SimpleDense", "examples>SimpleDense", "hidden", "fitserve_examples.layers")


# -- compile: losses -------------------------------------------------------------------


def test_a_plugin_loss_with_its_parameters_is_accepted():
    spec = parse_train(request(compile__loss={"name": "examples>huber", "params": {"delta": 2.0}}))

    assert spec.compile.loss == NamedConfig(name="examples>huber", params={"delta": 2.0})
    assert parse_train(spec.model_dump()) == spec


def test_a_plugin_loss_takes_the_base_class_kwargs():
    spec = parse_train(
        request(compile__loss={"name": "examples>huber", "params": {"reduction": "sum"}})
    )

    assert spec.compile.loss.params == {"reduction": "sum"}


def test_a_misspelt_parameter_of_a_plugin_loss_is_refused_with_the_signature():
    err = refused(request(compile__loss={"name": "examples>huber", "params": {"delat": 2.0}}))

    assert err.field == "compile.loss"
    assert err.message.startswith("compile.loss: ")
    assert "loss 'examples>huber' has no parameter 'delat'" in err.message
    assert err.message.endswith(
        "it takes examples>huber(delta: float = 1.0, name: str = 'huber', "
        "and the base class's dtype, reduction)"
    )


def test_a_parameter_of_the_wrong_type_is_refused():
    err = refused(
        request(compile__loss={"name": "examples>huber_fn", "params": {"threshold": "big"}})
    )

    assert err.field == "compile.loss"
    assert "parameter 'threshold' of loss 'examples>huber_fn' must be float, got 'big'" in (
        err.message
    )


def test_an_unknown_plugin_loss_is_refused_listing_the_installed_ones():
    err = refused(request(compile__loss={"name": "examples>nope"}))

    assert err.field == "compile.loss"
    assert "unknown loss 'examples>nope'" in err.message
    assert "sparse_categorical_crossentropy" in listed(err.message, "valid: ")
    assert listed(err.message, "plugins: ") == COMPILE_LOSSES


def test_a_loss_layer_is_not_a_compile_loss():
    err = refused(request(compile__loss={"name": "examples>LogisticEndpoint"}))

    assert err.field == "compile.loss"
    assert err.message == (
        "compile.loss: unknown loss plugin 'examples>LogisticEndpoint'; "
        "installed loss plugins: " + ", ".join(COMPILE_LOSSES)
    )


def test_a_plugin_loss_of_an_output_is_checked():
    spec = parse_train(
        request(
            compile={
                "output_losses": {"y": {"name": "examples>huber_fn", "params": {"threshold": 2}}}
            }
        )
    )
    assert spec.compile.output_losses["y"].name == "examples>huber_fn"

    err = refused(
        request(compile={"output_losses": {"y": {"name": "examples>huber", "params": {"x": 1}}}})
    )
    assert err.field == "compile.output_losses"
    assert "loss 'examples>huber' has no parameter 'x'" in err.message


# -- compile: metrics ------------------------------------------------------------------


def test_a_plugin_metric_is_accepted():
    spec = parse_train(
        request(
            compile__metrics=[
                {"name": "accuracy"},
                {"name": "examples>CategoricalTruePositives", "params": {"name": "ctp"}},
            ]
        )
    )

    assert [m.name for m in spec.compile.metrics] == [
        "accuracy",
        "examples>CategoricalTruePositives",
    ]


def test_a_loss_plugin_is_not_a_metric():
    err = refused(request(compile__metrics=[{"name": "examples>huber"}]))

    assert err.field == "compile.metrics"
    assert err.message == (
        "compile.metrics: unknown metric plugin 'examples>huber'; "
        "installed metric plugins: examples>CategoricalTruePositives"
    )


def test_an_unknown_metric_lists_the_metric_plugins():
    err = refused(request(compile__weighted_metrics=[{"name": "examples>Nope"}]))

    assert err.field == "compile.weighted_metrics"
    assert "unknown metric 'examples>Nope'" in err.message
    assert listed(err.message, "plugins: ") == ["examples>CategoricalTruePositives"]


# -- params are walked like a model config ---------------------------------------------


@pytest.mark.parametrize("loss", ["examples>huber", "mse"])
def test_a_nested_object_that_is_not_allowed_is_refused(loss):
    err = refused(request(compile__loss={"name": loss, "params": {"dtype": POPEN}}))

    assert err.field == "compile.loss"
    assert "class 'Popen' is not an allowed Keras class" in err.message


@pytest.mark.parametrize("key", ["function", "module_path", "__lambda__"])
def test_a_code_key_in_params_is_refused(key):
    err = refused(
        request(compile__loss={"name": "examples>huber", "params": {"dtype": {key: "os.system"}}})
    )

    assert err.message == f"compile.loss: params: {key!r} is not allowed (no code in specs)"


def test_an_allowed_nested_keras_object_is_accepted():
    policy = {"class_name": "DTypePolicy", "module": "keras", "config": {"name": "float32"}}

    spec = parse_train(
        request(compile__loss={"name": "examples>huber", "params": {"dtype": policy}})
    )

    assert spec.compile.loss.params["dtype"] == policy


def test_nested_objects_in_callback_params_are_refused():
    err = refused(
        request(callbacks__plugins=[{"name": "examples>EpochMarker", "params": {"key": POPEN}}])
    )

    assert err.field == "callbacks.plugins"
    assert "class 'Popen' is not an allowed Keras class" in err.message


# -- callbacks -------------------------------------------------------------------------


def test_plugin_callbacks_with_their_parameters_are_accepted():
    spec = parse_train(
        request(
            callbacks__plugins=[
                {"name": "examples>EpochMarker", "params": {"every": 2, "key": "t"}},
                {"name": "faults>NeedsParam", "params": {"every": 3}},
            ]
        )
    )

    assert [(c.name, c.params) for c in spec.callbacks.plugins] == [
        ("examples>EpochMarker", {"every": 2, "key": "t"}),
        ("faults>NeedsParam", {"every": 3}),
    ]


def test_an_unknown_callback_plugin_is_refused_listing_the_installed_ones():
    err = refused(
        request(callbacks__plugins=[{"name": "examples>EpochMarker"}, {"name": "examples>Nope"}])
    )

    assert err.field == "callbacks.plugins"
    assert err.message == (
        "callbacks.plugins: plugins[1]: unknown callback plugin 'examples>Nope'; "
        "installed callback plugins: " + ", ".join(CALLBACKS)
    )


def test_a_loss_plugin_is_not_a_callback():
    err = refused(request(callbacks__plugins=[{"name": "examples>huber"}]))

    assert "unknown callback plugin 'examples>huber'" in err.message


def test_a_missing_required_callback_parameter_is_refused():
    err = refused(request(callbacks__plugins=[{"name": "faults>NeedsParam"}]))

    assert err.field == "callbacks.plugins"
    assert err.message == (
        "callbacks.plugins: plugins[0]: callback 'faults>NeedsParam' needs parameter 'every'; "
        "it takes faults>NeedsParam(every: int)"
    )


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"evry": 2}, "callback 'examples>EpochMarker' has no parameter 'evry'"),
        ({"every": 2.5}, "parameter 'every' of callback 'examples>EpochMarker' must be int"),
        ({"name": "x"}, "has no parameter 'name'"),  # no **kwargs: no base kwargs
    ],
)
def test_a_bad_callback_parameter_is_refused(params, expected):
    err = refused(request(callbacks__plugins=[{"name": "examples>EpochMarker", "params": params}]))

    assert err.field == "callbacks.plugins"
    assert expected in err.message


def test_callback_plugins_are_refused_when_none_is_installed():
    install(EMPTY)

    err = refused(request(callbacks__plugins=[{"name": "examples>EpochMarker"}]))

    assert err.message.endswith("installed callback plugins: none is installed")


# -- thresholds ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("monitor", "direction"),
    [
        ("accuracy", "max"),
        ("val_accuracy", "max"),
        ("sparse_categorical_accuracy", "max"),
        ("acc", "max"),
        ("auc", "max"),
        ("val_auc", "max"),
        ("precision", "max"),
        ("val_recall", "max"),
        ("f1_score", "max"),
        ("r2_score", "max"),
        ("loss", "min"),
        ("val_loss", "min"),
        ("mae", "min"),
        ("val_mean_squared_error", "min"),
    ],
)
def test_auto_direction_follows_the_metric_name(monitor, direction):
    assert ThresholdSpec(monitor=monitor, value=0.5).direction == direction


@pytest.mark.parametrize(
    ("monitor", "mode"),
    [("accuracy", "min"), ("val_accuracy", "min"), ("val_loss", "max"), ("loss", "max")],
)
def test_an_explicit_mode_wins(monitor, mode):
    assert ThresholdSpec(monitor=monitor, value=0.5, mode=mode).direction == mode


def test_thresholds_are_parsed_with_the_request():
    spec = parse_train(
        request(
            fit__validation_split=0.2,
            callbacks__thresholds=[
                {"monitor": "val_accuracy", "value": 0.9, "stop": True},
                {"monitor": "val_loss", "value": 0.1},
            ],
        )
    )

    first, second = spec.callbacks.thresholds
    assert (first.monitor, first.value, first.stop, first.direction) == (
        "val_accuracy",
        0.9,
        True,
        "max",
    )
    assert (second.stop, second.direction) == (False, "min")


@pytest.mark.parametrize(
    ("threshold", "field"),
    [
        ({"monitor": "loss", "value": float("nan")}, "callbacks.thresholds.0.value"),
        ({"monitor": "loss", "value": float("inf")}, "callbacks.thresholds.0.value"),
        ({"monitor": "", "value": 1.0}, "callbacks.thresholds.0.monitor"),
        ({"monitor": "loss", "value": 1.0, "mode": "up"}, "callbacks.thresholds.0.mode"),
        ({"value": 1.0}, "callbacks.thresholds.0.monitor"),
    ],
)
def test_a_bad_threshold_is_refused(threshold, field):
    err = refused(request(callbacks__thresholds=[threshold]))

    assert err.field == field
    assert err.message.startswith(f"{field}: ")


# -- a model that adds its own loss ----------------------------------------------------


def test_without_a_loss_a_layer_list_is_refused():
    err = refused(request(compile__loss=None))

    assert err.field == "compile.loss"
    assert err.message == MISSING_LOSS


def test_without_a_loss_a_model_with_a_loss_layer_plugin_is_accepted():
    spec = parse_train(request(model={"keras_json": keras_json(ENDPOINT)}, compile__loss=None))

    assert spec.compile.loss is None
    assert not spec.compile.has_loss
    assert adds_loss(spec.model)


def test_without_a_loss_a_model_with_only_a_plain_plugin_layer_is_refused():
    err = refused(request(model={"keras_json": keras_json(DENSE_PLUGIN)}, compile__loss=None))

    assert err.field == "compile.loss"
    assert err.message == MISSING_LOSS


def test_without_a_loss_a_loss_layer_needs_the_plugin_installed():
    install(EMPTY)

    err = refused(request(model={"keras_json": keras_json(ENDPOINT)}, compile__loss=None))

    assert err.message == MISSING_LOSS


def test_adds_loss_finds_the_loss_layer_anywhere_in_the_config():
    nested = {
        "class_name": "Functional",
        "config": {
            "layers": [{"class_name": "Functional", "config": {"layers": [DENSE_PLUGIN, ENDPOINT]}}]
        },
    }

    assert registered_names(nested) == {"examples>SimpleDense", "examples>LogisticEndpoint"}
    assert adds_loss(ModelSpec(keras_json=json.dumps(nested)))


def test_adds_loss_is_false_for_a_layer_list_and_for_bad_json():
    assert not adds_loss(ModelSpec(layers=[{"type": "examples>LogisticEndpoint"}]))
    assert not adds_loss(ModelSpec(keras_json="{not json"))
    assert not adds_loss(ModelSpec(keras_json=keras_json(DENSE_PLUGIN)))


# -- model specs: plugin nodes in a Keras config ---------------------------------------


@pytest.mark.parametrize(
    "layer",
    [
        ENDPOINT,
        DENSE_PLUGIN,
        node("LogisticEndpoint", ENDPOINT["registered_name"], "e", "fitserve_examples.layers"),
    ],
    ids=["endpoint", "dense-with-module", "endpoint-with-module"],
)
def test_a_plugin_node_in_a_keras_config_is_accepted(layer):
    assert check_model_spec(ModelSpec(keras_json=keras_json(layer))) is None


def test_a_real_model_with_plugin_layers_is_accepted():
    x = keras.Input((4,), name="x")
    targets = keras.Input((1,), name="targets")
    logits = keras.layers.Dense(1, name="logits")(SimpleDense(3, name="hidden")(x))
    outputs = LogisticEndpoint(name="endpoint")(targets, logits)
    spec = ModelSpec(keras_json=keras.Model([x, targets], outputs).to_json())

    assert check_model_spec(spec) is None
    assert adds_loss(spec)


def test_a_registered_name_that_is_not_installed_is_refused():
    err = model_refused(ModelSpec(keras_json=keras_json(node("X", "elsewhere>X", "x"))))

    assert err.message.startswith(
        "layer 'x' (X): registered_name 'elsewhere>X' is not a plugin installed on the server; "
        "plugin layers: "
    )
    assert set(err.message.rsplit("plugin layers: ", 1)[1].split(", ")) == {
        "examples>LogisticEndpoint",
        "examples>SimpleDense",
    }


def test_a_registered_name_of_a_compile_loss_is_not_a_layer():
    err = model_refused(ModelSpec(keras_json=keras_json(node("Huber", "examples>huber", "h"))))

    assert "registered_name 'examples>huber' is not a plugin installed" in err.message


def test_plugin_nodes_are_refused_when_none_is_installed():
    install(EMPTY)

    err = model_refused(ModelSpec(keras_json=keras_json(ENDPOINT)))

    assert err.message.endswith("plugin layers: none")


@pytest.mark.parametrize(
    ("layer", "not_what"),
    [
        (node("Dense", "examples>SimpleDense", "d"), "None.Dense"),
        (node("Popen", "examples>LogisticEndpoint", "p", "subprocess"), "subprocess.Popen"),
        (node("SimpleDense", "examples>SimpleDense", "d", "os"), "os.SimpleDense"),
    ],
)
def test_a_node_that_does_not_match_its_plugin_class_is_refused(layer, not_what):
    err = model_refused(ModelSpec(keras_json=keras_json(layer)))

    plugin = installed().get(layer["registered_name"])
    assert err.message == (
        f"layer {layer['config']['name']!r} ({layer['class_name']}): "
        f"{layer['registered_name']!r} is the plugin class "
        f"{plugin.module}.{plugin.class_name}, not {not_what}"
    )


def test_the_config_inside_a_plugin_node_is_still_walked():
    layer = copy.deepcopy(DENSE_PLUGIN)
    layer["config"]["activation"] = {"class_name": "Popen", "config": {}}

    err = model_refused(ModelSpec(keras_json=keras_json(layer)))

    assert "class 'Popen' is not an allowed Keras class" in err.message


# -- model specs: plugin layers in a layer list ----------------------------------------


def test_a_plugin_layer_in_a_layer_list_is_accepted():
    layers = [
        {"type": "examples>SimpleDense", "units": 4, "input_shape": [3], "input_name": "features"},
        {"type": "examples>SimpleDense", "units": 4.0, "scale": 2, "name": "hidden"},
        {"type": "Dense", "units": 2},
    ]

    assert check_model_spec(ModelSpec(layers=layers)) is None


def test_what_the_check_accepts_in_a_layer_list_the_worker_builds():
    """The worker reads input_name from the first layer only and passes a later layer's
    keys to its constructor: the check must refuse input_name there, or the build must
    ignore it, not fail the job as an error of the plugin."""
    spec = ModelSpec(
        layers=[
            {"type": "Dense", "units": 3, "input_shape": [4]},
            {"type": "examples>SimpleDense", "units": 2, "input_name": "x"},
        ]
    )

    refusal = None
    try:
        check_model_spec(spec)
    except InvalidRequest as exc:
        refusal = exc
    if refusal is not None:
        assert refusal.field == "model.layers[1].input_name"
    else:
        assert build_model(spec).output_shape == (None, 2)


def test_a_misspelt_parameter_of_a_plugin_layer_is_refused_naming_it():
    layers = [
        {"type": "Dense", "units": 4, "input_shape": [3]},
        {"type": "examples>SimpleDense", "unit": 4},
    ]

    err = model_refused(ModelSpec(layers=layers))

    assert err.field == "model.layers[1].unit"
    assert err.message.startswith(
        "model.layers[1]: layer 'examples>SimpleDense' has no parameter 'unit'; "
        "it takes examples>SimpleDense(units: int = 32, "
    )


def test_a_plugin_layer_parameter_of_the_wrong_type_is_refused():
    err = model_refused(ModelSpec(layers=[{"type": "examples>SimpleDense", "units": 2.5}]))

    assert err.field == "model.layers[0].units"
    assert "parameter 'units' of layer 'examples>SimpleDense' must be int, got 2.5" in err.message


@pytest.mark.parametrize("kind", ["examples>Nope", "examples>LogisticEndpoint", "examples>huber"])
def test_an_unknown_plugin_layer_is_refused_listing_the_installed_ones(kind):
    err = model_refused(ModelSpec(layers=[{"type": kind, "input_shape": [3]}]))

    assert err.field == "model.layers[0]"
    assert err.message == (
        f"model.layers[0]: {kind!r} is neither a Keras layer class nor a plugin layer; "
        "plugin layers installed: examples>SimpleDense"
    )


def test_a_nested_object_in_a_plugin_layer_is_refused():
    layers = [{"type": "examples>SimpleDense", "activation": POPEN, "input_shape": [3]}]

    err = model_refused(ModelSpec(layers=layers))

    assert err.message.startswith("model.layers[0]: class 'Popen' is not an allowed Keras class")


def test_lambda_is_still_refused_as_a_layer_type():
    err = model_refused(ModelSpec(layers=[{"type": "Lambda", "input_shape": [3]}]))

    assert "Lambda layers are not allowed" in err.message
