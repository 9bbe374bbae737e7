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


# -- bounds: nesting, layer sizes, weights, shapes ------------------------------------


def test_nesting_is_measured_on_the_text_with_brackets_in_strings_left_out():
    from service.domain.config_check import nesting

    assert nesting('{"a": [1, {"b": "[[[[{{{"}], "c": "\\"]]]"}') == 3
    assert nesting("[" * 100_000) == 100_000
    assert nesting("1") == 0


def test_a_config_nested_past_the_limit_is_refused_before_it_is_parsed():
    from service.domain.config_check import MAX_CONFIG_DEPTH, output_names

    deep = '{"class_name": "Sequential", "config": {"layers": [' + "[" * 5000 + "]" * 5000 + "]}}"
    spec = ModelSpec(keras_json=deep)

    assert output_names(spec) is None  # the submission's other checks do not trip over it
    error = refused(spec)
    assert error.message.startswith(
        f"model.keras_json is nested 5003 levels deep; the limit is {MAX_CONFIG_DEPTH}"
    )
    assert error.field == "model.keras_json"


def test_a_real_config_of_nested_models_is_well_within_the_nesting_limit():
    from service.domain.config_check import MAX_CONFIG_DEPTH, nesting

    inner = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    outer = keras.Sequential([keras.Input((4,)), inner, keras.layers.Dense(2)])

    assert nesting(outer.to_json()) < MAX_CONFIG_DEPTH / 4
    assert check_model_spec(ModelSpec(keras_json=outer.to_json())) is None


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ('{"class_name": {"a": 1}, "config": {}}', "with class_name Sequential or Functional"),
        ('{"class_name": ["Sequential"], "config": {}}', "with class_name Sequential"),
        (
            '{"class_name": "Sequential", "config": {"layers": [{"class_name": {"x": 1}}]}}',
            "class {'x': 1} is not an allowed Keras class",
        ),
        (
            '{"class_name": "Sequential", "config": {"layers": [{"class_name": "Dense", '
            '"config": [1, 2]}]}}',
            "'config' must be a JSON object",
        ),
        ('{"class_name": "Sequential", "config": {"layers": [' + "9" * 5000 + "]}}", "not JSON"),
    ],
)
def test_configs_of_the_wrong_json_types_are_refused_naming_the_field(config, message):
    error = refused(ModelSpec(keras_json=config))
    assert message in error.message
    assert error.field == "model.keras_json"


def test_the_outputs_of_a_config_of_odd_types_are_unknown_not_a_crash():
    from service.domain.config_check import output_names, output_units

    config = (
        '{"class_name": "Functional", "config": {"layers": [{"class_name": "Dense", '
        '"config": [1]}, {"config": {"name": {"x": 1}}}], "output_layers": [["d", 0, 0]]}}'
    )
    spec = ModelSpec(keras_json=config)

    assert output_names(spec) == ["d"]
    assert output_units(spec) is None


@pytest.mark.parametrize(
    ("layers", "message"),
    [
        (
            [{"type": "Dense", "units": 10**12, "input_shape": [4]}],
            "model.layers[0] (Dense): units is 1000000000000; the limit is 1,000,000 for any "
            "one layer size",
        ),
        (
            [{"type": "Conv2D", "filters": 4, "kernel_size": [3, 1e300], "input_shape": [8, 8, 1]}],
            "kernel_size is 1e+300; the limit is 1,000,000",
        ),
        (
            [{"type": "Reshape", "target_shape": [-1, 10**7], "input_shape": [4]}],
            "target_shape is 10000000",
        ),
        ([{"type": "Dense", "units": 3, "input_shape": "abc"}], "got 'abc'"),
        ([{"type": "Dense", "units": 3, "input_shape": 784}], "got 784"),
        ([{"type": "Dense", "units": 3, "input_shape": [28.5]}], "got [28.5]"),
        ([{"type": "Dense", "units": 3, "input_shape": [0]}], "got [0]"),
        ([{"type": "Dense", "units": 3, "input_shape": [True]}], "got [True]"),
        ([{"type": "Dense", "units": 3, "input_shape": [2], "input_name": {"a": 1}}], "input_name"),
        (
            [{"type": "Flatten", "input_shape": [1000, 1000]}, {"type": "Dense", "units": 10_000}],
            "model.layers[1] (Dense): the model would hold about 10,000,010,000 weights; the "
            "limit is 1,000,000,000",
        ),
        (
            [
                {"type": "Embedding", "input_dim": 1_000_000, "output_dim": 2000},
                {"type": "Flatten"},
            ],
            "model.layers[0] (Embedding): the model would hold about 2,000,000,000 weights",
        ),
        (
            [
                {
                    "type": "Conv2D",
                    "filters": 1000,
                    "kernel_size": 100,
                    "input_shape": [8, 8, 1000],
                },
            ],
            "weights; the limit is 1,000,000,000",
        ),
    ],
)
def test_huge_or_malformed_layer_lists_are_refused_naming_the_layer(layers, message):
    error = refused(ModelSpec(layers=layers))
    assert message in error.message
    assert str(error.field).startswith("model.layers[")


def test_a_big_but_sensible_model_passes():
    layers = [
        {"type": "Conv2D", "filters": 64, "kernel_size": [3, 3], "input_shape": [224, 224, 3]},
        {"type": "MaxPooling2D", "pool_size": 2},
        {"type": "Flatten"},  # the shape is unknown from here: Dense counts 1 input
        {"type": "Dense", "units": 4096},
        {"type": "Dropout", "rate": 0.5},
        {"type": "Dense", "units": 1000, "activation": "softmax"},
    ]
    assert check_model_spec(ModelSpec(layers=layers)) is None
    wide = [{"type": "Flatten", "input_shape": [28, 28]}, {"type": "Dense", "units": 1_000_000}]
    assert check_model_spec(ModelSpec(layers=wide)) is None  # 785 million weights


def test_huge_layers_of_a_keras_config_are_refused_naming_the_layer():
    big = with_layer(sequential_json(), "hidden", lambda x: x["config"].update(units=10**12))
    error = refused(ModelSpec(keras_json=big))
    assert "layer 'hidden' (Dense): units is 1000000000000" in error.message
    assert error.field == "model.keras_json"


def test_a_keras_config_s_weights_are_counted_from_its_build_config():
    def wide(layer):
        layer["config"]["units"] = 900_000
        layer["build_config"] = {"input_shape": [None, 10_000]}

    error = refused(ModelSpec(keras_json=with_layer(sequential_json(), "hidden", wide)))
    assert "layer 'hidden' (Dense): the model would hold about 9,000,900,000 weights" in (
        error.message
    )
