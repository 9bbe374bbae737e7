import json

import keras
import numpy as np
import pytest

from service.domain.job_specs import CompileSpec, ModelSpec, NamedConfig
from service.errors import InvalidRequest
from service.training.building import build_model, compile_model


def layers_spec(*layers) -> ModelSpec:
    return ModelSpec(layers=list(layers))


def refused(spec: ModelSpec) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        build_model(spec)
    return info.value


def tiny_model() -> keras.Model:
    return build_model(layers_spec({"type": "Dense", "units": 3, "input_shape": [4]}))


def test_a_layer_list_builds_a_model_with_input_x_and_the_right_output_shape():
    model = build_model(
        layers_spec(
            {"type": "Flatten", "input_shape": [2, 3]},
            {"type": "Dense", "units": 5, "activation": "relu"},
            {"type": "Dense", "units": 2, "activation": "softmax"},
        )
    )

    assert [t.name for t in model.inputs] == ["x"]
    assert tuple(model.inputs[0].shape) == (None, 2, 3)
    assert tuple(model.outputs[0].shape) == (None, 2)
    assert [type(layer).__name__ for layer in model.layers] == ["Flatten", "Dense", "Dense"]
    out = model.predict(np.ones((4, 2, 3), np.float32), verbose=0)
    assert out.shape == (4, 2)
    np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=1e-5)


def test_the_input_name_can_be_chosen():
    model = build_model(
        layers_spec({"type": "Dense", "units": 1, "input_shape": [3], "input_name": "features"})
    )

    assert [t.name for t in model.inputs] == ["features"]


def test_integral_floats_become_ints():
    # google.protobuf.Struct sends every number as a double: units arrives as 4.0.
    model = build_model(
        layers_spec(
            {"type": "Reshape", "target_shape": [2.0, 3.0], "input_shape": [6.0]},
            {"type": "Conv1D", "filters": 4.0, "kernel_size": 2.0},
            {"type": "Dropout", "rate": 0.5},
        )
    )

    reshape, conv, dropout = model.layers
    assert reshape.target_shape == (2, 3)
    assert conv.filters == 4
    assert type(conv.filters) is int
    assert conv.kernel_size == (2,)
    assert dropout.rate == 0.5
    assert tuple(model.outputs[0].shape) == (None, 1, 4)


def test_a_keras_config_builds_the_same_architecture():
    inputs = keras.Input((4,), name="x")
    hidden = keras.layers.Dense(3, activation="relu", name="hidden")(inputs)
    original = keras.Model(inputs, keras.layers.Dense(2, name="out")(hidden))

    model = build_model(ModelSpec(keras_json=original.to_json()))

    assert [layer.name for layer in model.layers] == ["x", "hidden", "out"]
    assert tuple(model.outputs[0].shape) == (None, 2)


def test_a_spec_is_checked_before_anything_is_built():
    err = refused(layers_spec({"type": "Lambda", "input_shape": [2]}))

    assert "Lambda layers are not allowed" in err.message


def test_the_first_layer_needs_an_input_shape():
    err = refused(layers_spec({"type": "Dense", "units": 2}))

    assert err.field == "model.layers[0]"
    assert "needs 'input_shape'" in err.message


@pytest.mark.parametrize(
    "bad",
    [
        {"type": "Dense", "units": 2, "colour": "red"},
        {"type": "Dense"},
        {"type": "Dense", "units": 2, "activation": "no_such_activation"},
    ],
    ids=["unknown-argument", "missing-argument", "bad-value"],
)
def test_a_bad_layer_argument_names_the_layer(bad):
    err = refused(layers_spec({"type": "Dense", "units": 2, "input_shape": [3]}, bad))

    assert err.field == "model.layers[1]"
    assert err.message.startswith("model.layers[1] (Dense): ")


def test_a_layer_that_does_not_fit_its_input_names_the_layer():
    # Conv2D needs an image; this input is flat. Keras raises while the Sequential is built.
    err = refused(
        layers_spec(
            {"type": "Dense", "units": 4, "input_shape": [3]},
            {"type": "Conv2D", "filters": 2, "kernel_size": 3},
        )
    )

    assert "model.layers[1]" in err.message


def test_a_keras_config_keras_cannot_build_is_invalid():
    config = json.loads(tiny_model().to_json())
    config["config"]["layers"][1]["config"]["units"] = "three"

    err = refused(ModelSpec(keras_json=json.dumps(config)))

    assert "model.keras_json could not be built" in err.message


def test_compile_with_optimizer_params():
    model = tiny_model()

    compile_model(
        model,
        CompileSpec(
            optimizer=NamedConfig(name="adam", params={"learning_rate": 0.01}),
            loss=NamedConfig(name="mse"),
        ),
    )

    assert isinstance(model.optimizer, keras.optimizers.Adam)
    assert float(model.optimizer.learning_rate) == pytest.approx(0.01)


def test_compile_with_integral_float_params():
    model = tiny_model()

    compile_model(
        model,
        CompileSpec(
            optimizer=NamedConfig(name="adamw", params={"learning_rate": 0.5, "weight_decay": 0}),
            loss=NamedConfig(name="mse"),
        ),
    )

    assert isinstance(model.optimizer, keras.optimizers.AdamW)
    assert float(model.optimizer.learning_rate) == pytest.approx(0.5)


def test_compile_with_a_loss_taking_from_logits():
    model = tiny_model()

    compile_model(
        model,
        CompileSpec(
            loss=NamedConfig(name="sparse_categorical_crossentropy", params={"from_logits": True}),
            metrics=[NamedConfig(name="accuracy")],
        ),
    )

    assert isinstance(model.loss, keras.losses.SparseCategoricalCrossentropy)
    assert model.loss.get_config()["from_logits"] is True
    logits = np.array([[10.0, -10.0, -10.0]], np.float32)
    assert float(model.loss(np.array([0]), logits)) == pytest.approx(0.0, abs=1e-4)


def test_compile_with_plain_names_passes_them_through():
    model = tiny_model()

    compile_model(
        model, CompileSpec(loss=NamedConfig(name="mse"), metrics=[NamedConfig(name="mae")])
    )

    assert isinstance(model.optimizer, keras.optimizers.Adam)
    assert model.loss == "mse"


def test_compile_with_a_metric_taking_params():
    model = tiny_model()

    compile_model(
        model,
        CompileSpec(
            loss=NamedConfig(name="mse"),
            metrics=[NamedConfig(name="top_k_categorical_accuracy", params={"k": 2.0})],
        ),
    )
    model.evaluate(np.zeros((2, 4), np.float32), np.eye(3, dtype=np.float32)[:2], verbose=0)

    (metric,) = model.metrics[1].metrics  # [loss tracker, compiled metrics]
    assert isinstance(metric, keras.metrics.TopKCategoricalAccuracy)
    assert metric.get_config()["k"] == 2


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        # Specs the api would refuse (built unvalidated): the worker refuses them too,
        # should a worker's Keras differ from the api's table.
        (
            CompileSpec.model_construct(
                optimizer=NamedConfig(name="sgd", params={"speed": 1}),
                loss=NamedConfig(name="mse"),
                output_losses={},
                metrics=[],
                weighted_metrics=[],
                loss_weights={},
            ),
            "optimizer 'sgd': ",
        ),
        (
            CompileSpec.model_construct(
                optimizer=NamedConfig(name="adam"),
                loss=NamedConfig(name="mse", params={"reduction": "sum"}),
                output_losses={},
                metrics=[],
                weighted_metrics=[],
                loss_weights={},
            ),
            "loss 'mse' takes no parameters here",
        ),
    ],
    ids=["bad-optimizer-param", "alias-with-params"],
)
def test_compile_errors_are_invalid_requests(spec, message):
    with pytest.raises(InvalidRequest, match=message):
        compile_model(tiny_model(), spec)


def test_a_float_parameter_given_as_an_integral_number_stays_a_float():
    # JSON 0.0 arrives as 0; Keras refuses learning_rate=0 (an int) but takes 0.0.
    model = tiny_model()
    spec = CompileSpec(
        optimizer=NamedConfig(name="sgd", params={"learning_rate": 0.0}),
        loss=NamedConfig(name="mse"),
    )
    compile_model(model, spec)
    assert float(model.optimizer.learning_rate) == 0.0
