import json

import keras
import pytest

from service.domain.config_check import MAX_LAYERS, check_model_spec
from service.domain.job_specs import ModelSpec
from service.errors import InvalidRequest


def functional_json() -> str:
    inputs = keras.Input((4,), name="x")
    a = keras.layers.Dense(3, activation="relu", kernel_regularizer="l2", name="left")(inputs)
    b = keras.layers.Dense(3, kernel_constraint="max_norm", name="right")(inputs)
    merged = keras.layers.Concatenate(name="merge")([a, b])
    outputs = keras.layers.Dense(2, activation="softmax", name="out")(merged)
    return keras.Model(inputs, outputs).to_json()


def sequential_json() -> str:
    model = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(4, name="hidden"), keras.layers.Dropout(0.5)]
    )
    return model.to_json()


def with_layer(text: str, name: str, change) -> str:
    """``text`` with ``change`` applied to the config of the layer called ``name``."""
    config = json.loads(text)
    layer = next(x for x in config["config"]["layers"] if x["config"].get("name") == name)
    change(layer)
    return json.dumps(config)


def refused(spec: ModelSpec) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        check_model_spec(spec)
    return info.value


def test_a_sequential_layer_list_passes():
    layers = [
        {"type": "Flatten", "input_shape": [28, 28]},
        {"type": "Dense", "units": 16, "activation": "relu"},
        {"type": "Dropout", "rate": 0.2},
        {"type": "Dense", "units": 10, "kernel_initializer": {"class_name": "HeNormal"}},
    ]

    assert check_model_spec(ModelSpec(layers=layers)) is None


def test_a_real_functional_model_config_passes():
    assert check_model_spec(ModelSpec(keras_json=functional_json())) is None


def test_a_real_sequential_model_config_passes():
    assert check_model_spec(ModelSpec(keras_json=sequential_json())) is None


def test_lambda_in_a_layer_list_is_refused_naming_the_layer():
    layers = [{"type": "Dense", "units": 2, "input_shape": [3]}, {"type": "Lambda"}]

    err = refused(ModelSpec(layers=layers))

    assert "model.layers[1]" in err.message
    assert "Lambda layers are not allowed" in err.message


def test_lambda_in_a_keras_config_is_refused_naming_the_layer():
    config = json.loads(sequential_json())
    config["config"]["layers"].append(
        {
            "module": "keras.layers",
            "class_name": "Lambda",
            "config": {"name": "sneaky", "function": {"class_name": "__lambda__"}},
            "registered_name": None,
        }
    )

    err = refused(ModelSpec(keras_json=json.dumps(config)))

    assert "'sneaky'" in err.message
    assert "Lambda" in err.message


def test_an_unknown_layer_class_is_refused_naming_it():
    err = refused(ModelSpec(layers=[{"type": "EvilLayer", "input_shape": [2]}]))

    assert "model.layers[0]" in err.message
    assert "'EvilLayer'" in err.message


def test_a_layer_list_entry_without_type_is_refused_with_its_field():
    err = refused(ModelSpec(layers=[{"units": 2}]))

    assert err.field == "model.layers[0]"
    assert "no 'type'" in err.message


@pytest.mark.parametrize("kind", ["Sequential", "GlorotUniform", "__tuple__"])
def test_a_layer_list_type_must_be_a_layer(kind):
    # These are allowed inside a Keras config but are not layers; building would fail
    # with AttributeError (an internal error) if the check let them through.
    err = refused(ModelSpec(layers=[{"type": kind, "input_shape": [2]}]))

    assert "model.layers[0]" in err.message
    assert repr(kind) in err.message


def test_an_unknown_class_nested_in_a_config_is_refused_naming_layer_and_class():
    def evil_initializer(layer):
        layer["config"]["kernel_initializer"] = {
            "module": "keras.initializers",
            "class_name": "EvilInit",
            "config": {},
            "registered_name": None,
        }

    err = refused(ModelSpec(keras_json=with_layer(functional_json(), "left", evil_initializer)))

    assert "layer 'left' (Dense)" in err.message
    assert "'EvilInit'" in err.message


@pytest.mark.parametrize("module", ["os", "builtins", "subprocess", "kerasx.layers"])
def test_a_module_outside_keras_is_refused_naming_layer_and_module(module):
    def set_module(layer):
        layer["module"] = module

    err = refused(ModelSpec(keras_json=with_layer(functional_json(), "right", set_module)))

    assert "layer 'right' (Dense)" in err.message
    assert f"module {module!r} is not allowed" in err.message


def test_a_module_outside_keras_in_a_layer_list_is_refused():
    layers = [
        {
            "type": "Dense",
            "units": 2,
            "input_shape": [3],
            "kernel_initializer": {"class_name": "Zeros", "module": "os", "config": {}},
        }
    ]

    err = refused(ModelSpec(layers=layers))

    assert "model.layers[0]" in err.message
    assert "module 'os'" in err.message


def test_a_registered_name_other_than_the_class_name_is_refused():
    def register(layer):
        layer["registered_name"] = "Custom>Dense"

    err = refused(ModelSpec(keras_json=with_layer(functional_json(), "out", register)))

    assert "layer 'out' (Dense)" in err.message
    assert "registered_name 'Custom>Dense'" in err.message


def test_a_registered_name_equal_to_the_class_name_passes():
    def register(layer):
        layer["registered_name"] = "Dense"

    check_model_spec(ModelSpec(keras_json=with_layer(functional_json(), "out", register)))


@pytest.mark.parametrize("key", ["function", "function_type", "module_path", "__lambda__"])
def test_code_keys_nested_in_a_config_are_refused(key):
    def add_code(layer):
        layer["config"]["activation"] = {"deep": [{key: "os.system"}]}

    err = refused(ModelSpec(keras_json=with_layer(functional_json(), "left", add_code)))

    assert "layer 'left' (Dense)" in err.message
    assert repr(key) in err.message


def test_a_function_key_in_a_layer_list_entry_is_refused():
    layers = [{"type": "Dense", "units": 2, "input_shape": [3], "function": "print"}]

    err = refused(ModelSpec(layers=layers))

    assert "model.layers[0]" in err.message
    assert "'function' is not allowed" in err.message


def test_too_many_layers_in_a_list_are_refused():
    layers = [{"type": "Dense", "units": 1}] * (MAX_LAYERS + 1)

    err = refused(ModelSpec(layers=layers))

    assert f"{MAX_LAYERS + 1} layers" in err.message
    assert f"limit is {MAX_LAYERS}" in err.message


def test_the_layer_limit_itself_is_allowed():
    check_model_spec(ModelSpec(layers=[{"type": "Dense", "units": 1}] * MAX_LAYERS))


def test_too_many_layers_in_a_keras_config_are_refused():
    config = json.loads(sequential_json())
    dense = config["config"]["layers"][1]
    config["config"]["layers"] = [dense] * (MAX_LAYERS + 1)

    err = refused(ModelSpec(keras_json=json.dumps(config)))

    assert f"{MAX_LAYERS + 1} layers" in err.message


def test_non_json_is_refused_with_the_field():
    err = refused(ModelSpec(keras_json="{not json"))

    assert err.field == "model.keras_json"
    assert "is not JSON" in err.message


@pytest.mark.parametrize(
    "text",
    [
        "[1, 2]",
        '"Sequential"',
        '{"class_name": "Dense", "config": {"units": 2}}',
        '{"config": {"layers": []}}',
    ],
)
def test_json_that_is_not_a_model_config_is_refused(text):
    err = refused(ModelSpec(keras_json=text))

    assert err.field == "model.keras_json"
    assert "Keras model config" in err.message


@pytest.mark.parametrize("inner", ["null", "[]", '"layers"'])
def test_a_model_config_whose_config_is_not_an_object_is_refused(inner):
    err = refused(ModelSpec(keras_json=f'{{"class_name": "Sequential", "config": {inner}}}'))

    assert err.field == "model.keras_json"
