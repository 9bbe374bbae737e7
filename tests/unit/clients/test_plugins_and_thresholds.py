"""Plugins and thresholds in the SDK and CLI, with no server: request building, the
errors for client code, and how the CLI prints plugins and threshold events."""

import dataclasses
import functools
from typing import Any

import pytest
from google.protobuf import json_format, struct_pb2

import fitserve
from fitserve import _specs, cli
from fitserve.v1 import training_pb2

# -- thresholds ------------------------------------------------------------------------


def test_thresholds_become_threshold_messages() -> None:
    options = _specs.callback_options(
        {
            "thresholds": [
                {"monitor": "accuracy", "value": 0.98, "stop": True},
                {"monitor": "val_loss", "value": 1, "mode": "min"},
            ]
        }
    )

    first, second = options.thresholds
    assert (first.monitor, first.value, first.mode, first.stop) == ("accuracy", 0.98, "auto", True)
    assert first.HasField("value")
    assert (second.monitor, second.value, second.mode, second.stop) == (
        "val_loss",
        1.0,
        "min",
        False,
    )


def test_a_single_threshold_dict_counts_as_a_list_of_one() -> None:
    options = _specs.callback_options({"thresholds": {"monitor": "auc", "value": 0.9}})

    assert [(t.monitor, t.value) for t in options.thresholds] == [("auc", 0.9)]


def test_a_threshold_of_value_zero_is_sent_as_set() -> None:
    (threshold,) = _specs.callback_options(
        {"thresholds": {"monitor": "loss", "value": 0}}
    ).thresholds

    assert threshold.HasField("value")
    assert threshold.value == 0.0


@pytest.mark.parametrize(
    "threshold",
    [{"monitor": "accuracy", "stop": True}, {"value": 0.98}, {"monitor": "", "value": 0.5}],
)
def test_a_threshold_without_monitor_or_value_is_refused(threshold: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r'needs "monitor" .* and "value"') as caught:
        _specs.callback_options({"thresholds": [threshold]})

    assert "callbacks['thresholds'][0]" in str(caught.value)


def test_an_unknown_threshold_key_is_refused_with_the_valid_keys() -> None:
    with pytest.raises(ValueError, match="unknown key 'patience'") as caught:
        _specs.callback_options(
            {"thresholds": [{"monitor": "accuracy", "value": 0.9, "patience": 2}]}
        )

    assert "valid keys: monitor, value, mode, stop" in str(caught.value)


@pytest.mark.parametrize(
    ("threshold", "error", "match"),
    [
        ({"monitor": "accuracy", "value": 0.9, "mode": "up"}, ValueError, "auto, min, max"),
        ({"monitor": "accuracy", "value": "0.9"}, TypeError, "must be a number"),
        ({"monitor": "accuracy", "value": 0.9, "stop": "yes"}, TypeError, "True or False"),
        ("accuracy", TypeError, "list of dicts"),
    ],
)
def test_malformed_thresholds_are_refused(
    threshold: object, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        _specs.callback_options({"thresholds": threshold})


def test_train_sends_thresholds_and_plugin_callbacks() -> None:
    from fitserve import _options

    fields = _options.request_fields(
        "train",
        {
            "loss": "mse",
            "callbacks": {
                "thresholds": [{"monitor": "val_accuracy", "value": 0.95, "stop": True}],
                "plugins": [fitserve.plugin("examples>log_lr", every=2), "examples>noop"],
            },
        },
    )

    callbacks = fields["callbacks"]
    assert [(t.monitor, t.value, t.stop) for t in callbacks.thresholds] == [
        ("val_accuracy", 0.95, True)
    ]
    assert [p.name for p in callbacks.plugins] == ["examples>log_lr", "examples>noop"]
    assert dict(callbacks.plugins[0].params) == {"every": 2.0}


# -- fitserve.plugin ---------------------------------------------------------------------


def test_plugin_is_the_same_as_the_dict_form() -> None:
    helper = _specs.named_config(fitserve.plugin("examples>huber", delta=2.0))
    mapping = _specs.named_config({"name": "examples>huber", "delta": 2.0})

    assert helper == mapping
    assert (helper.name, dict(helper.params)) == ("examples>huber", {"delta": 2.0})


def test_plugin_is_a_frozen_value() -> None:
    ref = fitserve.plugin("examples>huber", delta=2.0)

    assert isinstance(ref, fitserve.PluginRef)
    assert (ref.name, dict(ref.params)) == ("examples>huber", {"delta": 2.0})
    assert ref == fitserve.plugin("examples>huber", delta=2.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ref.name = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        ref.params["delta"] = 3.0  # type: ignore[index]


def test_plugin_can_pass_a_parameter_called_name() -> None:
    config = _specs.named_config(fitserve.plugin("examples>F1", name="f1_macro"))

    assert (config.name, dict(config.params)) == ("examples>F1", {"name": "f1_macro"})


def test_plugin_needs_a_name() -> None:
    with pytest.raises(TypeError, match="registered name"):
        fitserve.plugin("")


def test_plugins_work_for_a_loss_per_output_and_as_metrics() -> None:
    options = _specs.compile_options(
        optimizer="adam",
        loss={"box": fitserve.plugin("examples>huber", delta=2.0), "digit": "mse"},
        metrics=fitserve.plugin("examples>F1", average="macro"),
        weighted_metrics=[fitserve.plugin("examples>F1"), "accuracy"],
        loss_weights=None,
    )

    box = options.output_losses["box"]
    assert (box.name, dict(box.params)) == ("examples>huber", {"delta": 2.0})
    assert options.output_losses["digit"].name == "mse"
    assert [(m.name, dict(m.params)) for m in options.metrics] == [
        ("examples>F1", {"average": "macro"})
    ]
    assert [m.name for m in options.weighted_metrics] == ["examples>F1", "accuracy"]


def test_a_plugin_loss_is_a_single_loss_not_per_output() -> None:
    options = _specs.compile_options(
        optimizer="adam",
        loss=fitserve.plugin("examples>huber", delta=1.5),
        metrics=(),
        weighted_metrics=(),
        loss_weights=None,
    )

    assert options.loss.name == "examples>huber"
    assert options.loss.params["delta"] == 1.5
    assert not options.output_losses


# -- client code is refused --------------------------------------------------------------


def my_loss(y_true: float, y_pred: float) -> float:
    return y_pred - y_true


class CustomMSE:
    """Looks like a keras.losses.Loss subclass."""

    def __init__(self, factor: float = 1.0) -> None:
        self.factor = factor

    def __call__(self, y_true: float, y_pred: float) -> float:
        return y_pred - y_true

    def get_config(self) -> dict[str, Any]:
        return {"factor": self.factor}


class KerasLikeMetric:
    """Not callable; only its get_config says it is a Keras object."""

    def get_config(self) -> dict[str, Any]:
        return {}


class KerasLikeCallback:
    def set_model(self, model: object) -> None:
        self.model = model

    def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
        pass


def _compile(**arguments: Any) -> training_pb2.CompileOptions:
    defaults = {
        "optimizer": "adam",
        "loss": "mse",
        "metrics": (),
        "weighted_metrics": (),
        "loss_weights": None,
    }
    return _specs.compile_options(**{**defaults, **arguments})


def _assert_plugin_advice(message: str) -> None:
    assert "no client code runs on the server" in message
    assert 'loss="examples>huber"' in message
    assert 'fitserve.plugin("examples>huber", delta=2.0)' in message
    assert "docs/plugins.md" in message
    assert "client.list_plugins()" in message
    assert "`fitserve plugins`" in message


def test_a_function_as_loss_is_refused_with_how_to_make_it_a_plugin() -> None:
    with pytest.raises(TypeError) as caught:
        _compile(loss=my_loss)

    message = str(caught.value)
    assert message.startswith("loss= got the function my_loss, ")
    _assert_plugin_advice(message)


def test_a_class_as_loss_is_refused_by_name() -> None:
    with pytest.raises(TypeError) as caught:
        _compile(loss=CustomMSE)

    message = str(caught.value)
    assert message.startswith("loss= got the class CustomMSE, ")
    _assert_plugin_advice(message)


def test_an_object_with_get_config_is_refused_by_its_type_name() -> None:
    with pytest.raises(TypeError) as caught:
        _compile(metrics=[KerasLikeMetric()])

    message = str(caught.value)
    assert message.startswith("metrics= got a KerasLikeMetric object, ")
    _assert_plugin_advice(message)


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ({"loss": {"box": CustomMSE(2.0)}}, "loss['box'] got a CustomMSE object"),
        ({"metrics": my_loss}, "metrics= got the function my_loss"),
        ({"weighted_metrics": CustomMSE}, "weighted_metrics= got the class CustomMSE"),
        ({"optimizer": functools.partial(my_loss)}, "optimizer= got a partial object"),
        ({"loss": lambda y_true, y_pred: y_pred}, "loss= got the function <lambda>"),
    ],
)
def test_client_code_anywhere_in_compile_is_refused(
    arguments: dict[str, Any], expected: str
) -> None:
    with pytest.raises(TypeError, match="no client code runs on the server") as caught:
        _compile(**arguments)

    assert str(caught.value).startswith(expected)


def test_a_callback_object_as_plugin_is_refused() -> None:
    with pytest.raises(TypeError) as caught:
        _specs.callback_options({"plugins": [KerasLikeCallback()]})

    message = str(caught.value)
    assert message.startswith("callbacks['plugins'] got a KerasLikeCallback object, ")
    _assert_plugin_advice(message)


def test_other_values_get_the_plain_type_error() -> None:
    with pytest.raises(TypeError, match='expected a name, a dict with a "name" key') as caught:
        _compile(loss=5)

    assert "no client code" not in str(caught.value)


# -- the command line --------------------------------------------------------------------


def threshold_event(**fields: Any) -> training_pb2.JobEvent:
    return training_pb2.JobEvent(
        event_id="7", job_id="job-1", threshold=training_pb2.ThresholdReached(**fields)
    )


def test_a_threshold_that_stops_the_fit_is_described() -> None:
    event = threshold_event(
        monitor="accuracy", value=0.98, observed=0.98123, epoch=3, mode="max", stopped=True
    )

    assert cli._describe_event(event) == (
        "threshold accuracy >= 0.98 reached at epoch 3 (0.9812); stopping"
    )


def test_a_min_threshold_that_only_reports_is_described() -> None:
    event = threshold_event(monitor="val_loss", value=0.2, observed=0.1875, epoch=5, mode="min")

    assert cli._describe_event(event) == "threshold val_loss <= 0.2 reached at epoch 5 (0.1875)"


def _default(value: Any) -> struct_pb2.Value:
    message = struct_pb2.Value()
    json_format.ParseDict(value, message)
    return message


PLUGINS = training_pb2.ListPluginsResponse(
    plugins=[
        training_pb2.Plugin(
            name="examples>huber",
            kind="loss",
            form="function",
            signature="(y_true, y_pred, delta: float = 1.0)",
            params=[training_pb2.PluginParam(name="delta", type="float", default=_default(1.0))],
            package="examples",
            distribution="fitserve-examples",
            version="0.1.0",
            module="fitserve_examples.losses",
        ),
        training_pb2.Plugin(
            name="examples>Scale",
            kind="layer",
            form="class",
            params=[
                training_pb2.PluginParam(name="factor", type="float", required=True),
                training_pb2.PluginParam(name="label", default=_default("x")),
            ],
            package="examples",
            module="fitserve_examples.layers",
        ),
    ],
    failures=[training_pb2.PluginFailure(source="broken_pkg", error="ImportError: no keras_nlp")],
)


def test_plugins_print_as_a_table_and_failures_on_stderr(
    capsys: pytest.CaptureFixture[str],
) -> None:
    cli._print_plugins(PLUGINS)

    out, err = capsys.readouterr()
    assert [line.rstrip() for line in out.splitlines()] == [
        "NAME            KIND   FORM      SIGNATURE                             PROVIDED BY",
        "examples>huber  loss   function  (y_true, y_pred, delta: float = 1.0)  "
        "fitserve-examples 0.1.0",
        'examples>Scale  layer  class     (factor: float, label = "x")          examples',
    ]
    assert err == "failed to load: broken_pkg: ImportError: no keras_nlp\n"


def test_no_plugins_print_only_the_header(capsys: pytest.CaptureFixture[str]) -> None:
    cli._print_plugins(training_pb2.ListPluginsResponse())

    out, err = capsys.readouterr()
    assert out.split() == ["NAME", "KIND", "FORM", "SIGNATURE", "PROVIDED", "BY"]
    assert err == ""


def test_the_plugins_command_parses_kind_and_json() -> None:
    args = cli._parser().parse_args(["plugins", "--kind", "loss", "--json"])

    assert (args.kind, args.json, args.run) == ("loss", True, cli._list_plugins)
    assert cli._parser().parse_args(["plugins"]).kind is None


def test_job_history_is_shaped_like_keras_history():
    import math

    from fitserve import Job
    from fitserve.v1 import training_pb2 as pb

    info = pb.Job(
        id="j",
        history=[
            pb.EpochRecord(epoch=1, logs={"loss": 0.9, "accuracy": 0.5}),
            pb.EpochRecord(epoch=2, logs={"loss": 0.7, "accuracy": 0.6, "marker": 1.5}),
        ],
    )
    job = Job(None, info)  # type: ignore[arg-type]  # no calls: the record is given
    history = job.history
    assert history["loss"] == pytest.approx([0.9, 0.7])
    assert history["accuracy"] == pytest.approx([0.5, 0.6])
    assert math.isnan(history["marker"][0])
    assert history["marker"][1] == 1.5
    assert job.epochs == [1, 2]


def test_metrics_per_output_like_keras():
    from fitserve._specs import compile_options

    options = compile_options(
        optimizer="adam",
        loss={"cls": "sparse_categorical_crossentropy", "reg": "mse"},
        metrics={"cls": ["accuracy"], "reg": ["mae", {"name": "mse"}]},
        weighted_metrics=[],
        loss_weights=None,
    )
    assert list(options.metrics) == []
    assert [m.name for m in options.output_metrics["cls"].metrics] == ["accuracy"]
    assert [m.name for m in options.output_metrics["reg"].metrics] == ["mae", "mse"]
    single = compile_options(
        optimizer="adam",
        loss="mse",
        metrics={"name": "auc", "num_thresholds": 50},
        weighted_metrics=[],
        loss_weights=None,
    )
    assert [m.name for m in single.metrics] == ["auc"]
    assert not single.output_metrics
