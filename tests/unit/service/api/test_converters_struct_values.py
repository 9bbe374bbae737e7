"""Job requests whose Struct values JSON cannot hold (found by tests/integration/test_fuzz.py:
a NaN or an infinity in a layer argument or a parameter answered INTERNAL)."""

import math

import pytest

from fitserve.v1 import training_pb2
from service.api import converters
from service.errors import InvalidRequest

NON_FINITE = [math.nan, math.inf, -math.inf]


def _train(layer: dict[str, object] | None = None) -> training_pb2.TrainRequest:
    request = training_pb2.TrainRequest(model_name="m")
    request.model.layers.layers.add().update(layer or {"type": "Dense", "units": 1})
    return request


@pytest.mark.parametrize("value", NON_FINITE, ids=str)
def test_a_non_finite_layer_argument_is_refused_naming_it(value: float) -> None:
    request = _train({"type": "Dense", "units": 1, "input_shape": [4, {"deep": [value]}]})
    with pytest.raises(InvalidRequest) as info:
        converters.train_request_data(request)
    assert info.value.field == "model.layers[0].input_shape[1].deep[0]"
    assert f"is {value}" in info.value.message
    assert "finite numbers only" in info.value.message


@pytest.mark.parametrize(
    ("fill", "field"),
    [
        (
            lambda r: r.compile.optimizer.params.update({"learning_rate": math.nan}),
            "compile.optimizer.params.learning_rate",
        ),
        (
            lambda r: r.compile.output_losses["cls"].params.update({"delta": math.inf}),
            "compile.output_losses[cls].params.delta",
        ),
        (
            lambda r: r.compile.metrics.add(name="auc").params.update({"t": [-math.inf]}),
            "compile.metrics[0].params.t[0]",
        ),
        (
            lambda r: r.callbacks.plugins.add(name="p>Cb").params.update({"x": math.nan}),
            "callbacks.plugins[0].params.x",
        ),
    ],
    ids=["optimizer", "output-loss", "metric", "callback-plugin"],
)
def test_a_non_finite_parameter_is_refused_naming_it(fill, field: str) -> None:  # type: ignore[no-untyped-def]
    request = _train()
    fill(request)
    with pytest.raises(InvalidRequest) as info:
        converters.train_request_data(request)
    assert info.value.field == field


def test_a_fine_tune_head_with_a_non_finite_argument_is_refused() -> None:
    request = training_pb2.FineTuneRequest()
    request.freeze.head_layers.layers.add().update({"type": "Dropout", "rate": math.nan})
    with pytest.raises(InvalidRequest) as info:
        converters.fine_tune_request_data(request)
    assert info.value.field == "freeze.head_layers.layers[0].rate"


def test_finite_values_and_non_finite_plain_fields_still_convert() -> None:
    request = _train({"type": "Dense", "units": 1e300, "rate": -0.0})
    request.fit.validation_split = math.nan  # a double field: JSON "NaN", the spec refuses it
    data = converters.train_request_data(request)
    assert data["model"]["layers"] == [{"type": "Dense", "units": 1e300, "rate": -0.0}]
    assert data["fit"]["validation_split"] == "NaN"
