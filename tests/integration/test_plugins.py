"""Plugins through the whole service: the example package (installed by ``make install``,
found by its entry point) and the test stack's faulty plugins (FITSERVE_PLUGINS).

Values are checked by hand: a loss or metric the worker computed (Evaluate, on one batch)
against the same formula applied in NumPy to what Predict returns for the published
model.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import fitserve_examples
import grpc
import keras
import numpy as np
import pytest

import fitserve
from fitserve.v1 import dataset_pb2, training_pb2, training_pb2_grpc
from service.config import Settings
from tests.conftest import RunningServer, private_stack

pytestmark = pytest.mark.integration

N = 64  # examples; every job below fits them in one batch, so a loss is exact
REGRESSION_LAYERS = [
    {"type": "Dense", "units": 8, "activation": "relu", "input_shape": [4]},
    {"type": "Dense", "units": 1},
]
CLASSIFIER_LAYERS = [
    {
        "type": "examples>SimpleDense",
        "units": 8,
        "activation": "relu",
        "scale": 0.5,
        "input_shape": [4],
    },
    {"type": "Dense", "units": 3, "activation": "softmax"},
]
SGD = {"name": "sgd", "learning_rate": 0.1}


@pytest.fixture(scope="module")
def tiny(server: RunningServer, worker: subprocess.Popen[bytes]) -> dict[str, Any]:
    """A regression target with outliers, a 3-class label and a binary label, uploaded."""
    rng = np.random.default_rng(11)
    x = rng.random((N, 4), dtype=np.float32)
    y_reg = (x @ np.array([1.0, -2.0, 3.0, 0.5], dtype=np.float32))[:, None]
    y_reg[::8] += 6.0  # outliers: where a Huber loss differs from the squared error
    y_cls = x[:, :3].argmax(axis=1)
    y_bin = (x.sum(axis=1, keepdims=True) > 2.0).astype(np.float32)
    with fitserve.Client(server.target, timeout=120) as c:
        return {
            "x": x,
            "y_reg": y_reg,
            "y_cls": y_cls,
            "y_bin": y_bin,
            "reg": c.upload_dataset("plugin-reg", x=x, y=y_reg),
            "cls": c.upload_dataset("plugin-cls", x=x, y=y_cls),
            "bin": c.upload_dataset("plugin-bin", x=x, targets=y_bin),
        }


@pytest.fixture
def stub(server: RunningServer) -> Any:
    with grpc.insecure_channel(server.target) as channel:
        yield training_pb2_grpc.TrainingServiceStub(channel)


def _huber(y: np.ndarray, p: np.ndarray, delta: float) -> float:
    err = np.abs(y - p)
    per = np.where(err <= delta, 0.5 * err**2, delta * (err - 0.5 * delta))
    return float(per.mean())


def _ref(dataset: dataset_pb2.Dataset, *inputs: str) -> training_pb2.DatasetRef:
    return training_pb2.DatasetRef(dataset=dataset.id, input_keys=list(inputs))


def _evaluate(client: fitserve.Client, name: str, version: int, dataset: Any) -> dict[str, float]:
    job = client.evaluate(name, version=version, dataset=dataset, batch_size=N).wait(timeout=180)
    return dict(job.metrics)


# --- ListPlugins -------------------------------------------------------------------------


def test_list_plugins_describes_every_object_with_its_parameters(stub: Any) -> None:
    reply = stub.ListPlugins(training_pb2.ListPluginsRequest())
    by_name = {p.name: p for p in reply.plugins}
    assert {
        "examples>huber_fn": "loss",
        "examples>huber": "loss",
        "examples>LogisticEndpoint": "loss",
        "examples>CategoricalTruePositives": "metric",
        "examples>SimpleDense": "layer",
        "examples>EpochMarker": "callback",
        "faults>exploding_loss": "loss",
    }.items() <= {n: p.kind for n, p in by_name.items()}.items()
    huber = by_name["examples>huber"]
    assert huber.form == "class"
    assert (huber.distribution, huber.version) == ("fitserve-examples", "0.1.0")
    assert huber.package == "examples"
    delta = next(p for p in huber.params if p.name == "delta")
    assert (delta.type, delta.required, delta.default.number_value) == ("float", False, 1.0)
    assert "Huber loss" in huber.doc
    assert by_name["examples>LogisticEndpoint"].form == "loss_layer"
    assert by_name["examples>huber_fn"].form == "function"
    needs = next(p for p in by_name["faults>NeedsParam"].params if p.name == "every")
    assert needs.required
    assert list(reply.failures) == []

    only = stub.ListPlugins(training_pb2.ListPluginsRequest(kind="layer"))
    assert {p.kind for p in only.plugins} == {"layer"}
    with pytest.raises(grpc.RpcError) as info:
        stub.ListPlugins(training_pb2.ListPluginsRequest(kind="optimizer"))
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "loss, metric, layer, callback" in str(info.value.details())


def test_a_plugin_that_fails_to_import_is_reported_and_the_server_serves(tmp_path: Path) -> None:
    with (
        private_stack(tmp_path, plugins=["tests.plugins.broken", "tests.plugins.faults"]) as (
            _,
            running,
        ),
        grpc.insecure_channel(running.target) as channel,
    ):
        reply = training_pb2_grpc.TrainingServiceStub(channel).ListPlugins(
            training_pb2.ListPluginsRequest()
        )
    [failure] = reply.failures
    assert "tests.plugins.broken" in failure.source
    assert "ImportError: broken plugin" in failure.error
    assert "faults>exploding_loss" in {p.name for p in reply.plugins}


# --- the three ways of a custom loss -------------------------------------------------------


@pytest.mark.parametrize(
    ("loss", "delta"),
    [
        ({"name": "examples>huber_fn", "threshold": 0.5}, 0.5),
        ({"name": "examples>huber", "delta": 2.0}, 2.0),
    ],
    ids=["function", "loss-subclass"],
)
def test_a_plugin_loss_is_the_loss_keras_computes_and_training_converges(
    client: fitserve.Client, tiny: dict[str, Any], loss: dict[str, Any], delta: float
) -> None:
    name = f"huber-{delta}"
    job = client.train(
        name,
        layers=REGRESSION_LAYERS,
        loss=loss,
        optimizer=SGD,
        dataset=tiny["reg"],
        epochs=20,
        batch_size=N,
        seed=1,
    ).wait(timeout=180)
    losses = [e.logs["loss"] for e in job.history]
    assert losses[-1] < 0.7 * losses[0]

    evaluated = _evaluate(client, name, job.model_version, tiny["reg"])
    predicted = np.asarray(client.predict(name, tiny["x"], version=job.model_version))
    by_hand = _huber(tiny["y_reg"], predicted, delta)
    assert evaluated["loss"] == pytest.approx(by_hand, rel=1e-4)
    assert by_hand != pytest.approx(_huber(tiny["y_reg"], predicted, 1e9), rel=1e-3)


def _endpoint_model() -> keras.Model:
    """The Keras guide's endpoint-layer model, built on the client from the plugin's
    classes: the targets are a model input, the loss is added by the last layer."""
    x = keras.Input((4,), name="x")
    targets = keras.Input((1,), name="targets")
    logits = keras.layers.Dense(1, name="logits")(keras.layers.Dense(8, activation="relu")(x))
    probabilities = fitserve_examples.LogisticEndpoint(name="endpoint")(targets, logits)
    return keras.Model({"x": x, "targets": targets}, probabilities)


def test_an_add_loss_layer_trains_without_compile_loss_and_serves_without_targets(
    client: fitserve.Client, tiny: dict[str, Any], settings: Settings
) -> None:
    job = client.train(
        "endpoint",
        model=_endpoint_model(),
        dataset=_ref(tiny["bin"], "x", "targets"),
        optimizer=SGD,
        epochs=20,
        batch_size=N,
        seed=2,
    ).wait(timeout=180)
    losses = [e.logs["loss"] for e in job.history]
    assert losses[-1] < losses[0]
    # Keras 3's add_metric: the layer's own Metric is reported with the model's.
    assert "endpoint_accuracy" in job.history[-1].logs

    model = client.get_model("endpoint")
    [version] = [v for v in model.versions if v.version == job.model_version]
    assert [s.name for s in version.signature.inputs] == ["x"]  # serving drops the targets
    p = np.asarray(client.predict("endpoint", tiny["x"], version=job.model_version))
    y = tiny["y_bin"]
    by_hand = float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())
    accuracy = float(((p > 0.5) == (y > 0.5)).mean())
    evaluated = _evaluate(client, "endpoint", job.model_version, _ref(tiny["bin"], "x", "targets"))
    assert evaluated["loss"] == pytest.approx(by_hand, rel=1e-3)
    assert evaluated["endpoint_accuracy"] == pytest.approx(accuracy)


# --- metrics, layers, callbacks ---------------------------------------------------------


def test_a_plugin_metric_and_layer_through_publish_predict_fine_tune_evaluate(
    client: fitserve.Client, tiny: dict[str, Any], settings: Settings
) -> None:
    trained = client.train(
        "custom-layer",
        layers=CLASSIFIER_LAYERS,
        loss="sparse_categorical_crossentropy",
        metrics=["examples>CategoricalTruePositives"],
        optimizer=SGD,
        dataset=tiny["cls"],
        epochs=5,
        batch_size=16,
        seed=4,
    ).wait(timeout=180)
    model = keras.models.load_model(
        settings.models_dir / "custom-layer" / str(trained.model_version) / "model.keras"
    )
    layer = model.layers[0]
    assert isinstance(layer, fitserve_examples.SimpleDense)
    assert float(layer.scale.numpy()) == 0.5  # non-trainable: unchanged by fit
    assert np.abs(layer.bias.numpy()).max() > 0  # trainable: moved from its zeros

    probabilities = np.asarray(client.predict("custom-layer", tiny["x"]))
    correct = float((probabilities.argmax(axis=1) == tiny["y_cls"]).sum())
    evaluated = _evaluate(client, "custom-layer", trained.model_version, tiny["cls"])
    assert evaluated["categorical_true_positives"] == correct

    with pytest.raises(fitserve.InvalidArgumentError, match=r"compile\.loss is required"):
        client.fine_tune("custom-layer", train_last_n_layers=1, dataset=tiny["cls"])
    tuned = client.fine_tune(
        "custom-layer",
        train_last_n_layers=1,
        dataset=tiny["cls"],
        loss="sparse_categorical_crossentropy",
        metrics=["examples>CategoricalTruePositives"],
        epochs=2,
        seed=5,
    ).wait(timeout=180)
    assert tuned.model_version == trained.model_version + 1
    after = _evaluate(client, "custom-layer", tuned.model_version, tiny["cls"])
    assert "categorical_true_positives" in after

    # fitserve.json records the plugins a version uses, with the package that provides them
    meta_file = settings.models_dir / "custom-layer" / str(tuned.model_version) / "fitserve.json"
    meta = json.loads(meta_file.read_text())
    recorded = {p["name"]: p for p in meta["plugins"]}
    assert set(recorded) == {"examples>SimpleDense", "examples>CategoricalTruePositives"}
    assert recorded["examples>SimpleDense"]["kind"] == "layer"
    assert recorded["examples>SimpleDense"]["distribution"] == "fitserve-examples"
    assert recorded["examples>SimpleDense"]["version"] == "0.1.0"
    # a version using a plugin this server lacks: FAILED_PRECONDITION naming what to install,
    # for FineTune and Evaluate, before any job is queued
    gone = {"name": "gone>Layer", "kind": "layer", "distribution": "gone-plugins", "version": "0.3"}
    meta_file.write_text(json.dumps(meta | {"plugins": [*meta["plugins"], gone]}))
    jobs_before = len(list(client.list_jobs()))
    with pytest.raises(
        fitserve.FailedPreconditionError, match=r"gone>Layer \(install gone-plugins==0\.3\)"
    ):
        client.fine_tune(
            "custom-layer",
            version=tuned.model_version,
            train_last_n_layers=1,
            dataset=tiny["cls"],
            loss="sparse_categorical_crossentropy",
        )
    with pytest.raises(fitserve.FailedPreconditionError, match=r"install gone-plugins==0\.3"):
        client.evaluate(
            "custom-layer", version=tuned.model_version, dataset=tiny["cls"], batch_size=N
        )
    assert len(list(client.list_jobs())) == jobs_before


def test_a_plugin_callback_runs_with_its_parameters(
    client: fitserve.Client, tiny: dict[str, Any]
) -> None:
    job = client.train(
        "marked",
        layers=REGRESSION_LAYERS,
        loss="mse",
        dataset=tiny["reg"],
        epochs=4,
        callbacks={"plugins": [{"name": "examples>EpochMarker", "every": 2, "key": "marker"}]},
    ).wait(timeout=180)
    assert ["marker" in e.logs for e in job.history] == [False, True, False, True]
    assert all(e.logs["marker"] > 0 for e in job.history if "marker" in e.logs)


def test_a_callback_that_raises_is_reported_and_training_finishes(
    client: fitserve.Client, tiny: dict[str, Any]
) -> None:
    submitted = client.train(
        "exploding-callback",
        layers=REGRESSION_LAYERS,
        loss="mse",
        dataset=tiny["reg"],
        epochs=3,
        callbacks={"plugins": [{"name": "faults>ExplodingCallback", "at": 1}]},
    )
    job = submitted.wait(timeout=180)
    assert len(job.history) == 3
    assert job.model_version > 0
    warnings = [e.log.message for e in submitted.events() if e.WhichOneof("payload") == "log"]
    assert any(
        "faults>ExplodingCallback raised RuntimeError" in m and "off for the rest" in m
        for m in warnings
    )


def test_a_plugin_that_raises_fails_the_job_with_its_name_and_the_worker_goes_on(
    client: fitserve.Client, tiny: dict[str, Any]
) -> None:
    with pytest.raises(fitserve.JobFailedError) as info:
        client.train(
            "exploding-loss",
            layers=REGRESSION_LAYERS,
            loss="faults>exploding_loss",
            dataset=tiny["reg"],
        ).wait(timeout=180)
    job = info.value.job
    assert job.error.reason == "PLUGIN_FAILED"
    assert "faults>exploding_loss" in job.error.message
    assert "the plugin's own error" in job.error.message
    after = client.train(
        "after-explosion", layers=REGRESSION_LAYERS, loss="mse", dataset=tiny["reg"]
    )
    assert after.wait(timeout=180).model_version > 0


# --- thresholds -------------------------------------------------------------------------


def test_stop_at_threshold_stops_at_the_epoch_that_reaches_it_and_publishes(
    client: fitserve.Client, tiny: dict[str, Any]
) -> None:
    submitted = client.train(
        "stop-at",
        layers=REGRESSION_LAYERS,
        loss="mse",
        optimizer=SGD,
        dataset=tiny["reg"],
        epochs=50,
        batch_size=N,
        seed=6,
        callbacks={"thresholds": [{"monitor": "loss", "value": 5.0, "stop": True}]},
    )
    job = submitted.wait(timeout=180)
    losses = [e.logs["loss"] for e in job.history]
    assert 1 < len(losses) < 50
    assert losses[-1] <= 5.0
    assert all(v > 5.0 for v in losses[:-1])
    assert job.state == training_pb2.JOB_STATE_SUCCEEDED
    assert job.model_version > 0
    [reached] = [e.threshold for e in submitted.events() if e.WhichOneof("payload") == "threshold"]
    assert (reached.monitor, reached.mode, reached.epoch, reached.stopped) == (
        "loss",
        "min",
        len(losses),
        True,
    )
    assert reached.observed == pytest.approx(losses[-1])


def test_a_threshold_without_stop_only_notifies(
    client: fitserve.Client, tiny: dict[str, Any]
) -> None:
    submitted = client.train(
        "notify-at",
        layers=CLASSIFIER_LAYERS,
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        optimizer=SGD,
        dataset=tiny["cls"],
        epochs=6,
        batch_size=8,
        seed=7,
        callbacks={"thresholds": [{"monitor": "accuracy", "value": 0.0}]},
    )
    job = submitted.wait(timeout=180)
    assert len(job.history) == 6
    [reached] = [e.threshold for e in submitted.events() if e.WhichOneof("payload") == "threshold"]
    assert (reached.mode, reached.epoch, reached.stopped) == ("max", 1, False)


# --- refused at submission ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "field", "says"),
    [
        (
            {"loss": "examples>nope"},
            "compile.loss",
            ["unknown loss 'examples>nope'", "examples>huber"],
        ),
        (
            {"loss": {"name": "examples>huber", "delat": 2.0}},
            "compile.loss",
            ["no parameter 'delat'", "delta: float = 1.0"],
        ),
        (
            {"loss": {"name": "examples>huber", "delta": "big"}},
            "compile.loss",
            ["parameter 'delta'", "must be float"],
        ),
        ({"loss": "examples>LogisticEndpoint"}, "compile.loss", ["unknown loss"]),
        (
            {"loss": {"name": "examples>huber", "dtype": {"class_name": "Popen", "config": {}}}},
            "compile.loss",
            ["'Popen' is not an allowed Keras class"],
        ),
        (
            {"metrics": ["examples>huber"]},
            "compile.metrics",
            ["unknown metric", "CategoricalTruePositives"],
        ),
        (
            {"callbacks": {"plugins": [{"name": "faults>NeedsParam"}]}},
            "callbacks.plugins",
            ["needs parameter 'every'", "faults>NeedsParam(every: int)"],
        ),
        (
            {"callbacks": {"plugins": ["examples>huber"]}},
            "callbacks.plugins",
            ["unknown callback plugin"],
        ),
        ({"loss": None}, "compile.loss", ["compile.loss is required", "add_loss"]),
    ],
    ids=[
        "unknown-loss",
        "unknown-param",
        "wrong-type",
        "loss-layer-as-loss",
        "nested-config",
        "wrong-kind",
        "missing-param",
        "unknown-callback",
        "no-loss",
    ],
)
def test_bad_plugin_use_is_refused_before_a_job_is_queued(
    client: fitserve.Client,
    tiny: dict[str, Any],
    options: dict[str, Any],
    field: str,
    says: list[str],
) -> None:
    args: dict[str, Any] = {"layers": REGRESSION_LAYERS, "loss": "mse", "dataset": tiny["reg"]}
    before = len(list(client.list_jobs()))
    with pytest.raises(fitserve.InvalidArgumentError) as info:
        client.train("refused", **(args | options))
    message = str(info.value)
    assert message.startswith(field)
    for text in says:
        assert text in message
    assert len(list(client.list_jobs())) == before


def test_unknown_plugin_layers_are_refused_in_layer_lists_and_keras_configs(
    client: fitserve.Client, tiny: dict[str, Any]
) -> None:
    layers = [{"type": "examples>Nope", "units": 3, "input_shape": [4]}]
    with pytest.raises(fitserve.InvalidArgumentError, match=r"examples>SimpleDense"):
        client.train("refused", layers=layers, loss="mse", dataset=tiny["reg"])
    layers = [{"type": "examples>SimpleDense", "unit": 3, "input_shape": [4]}]
    with pytest.raises(
        fitserve.InvalidArgumentError, match=r"no parameter 'unit'.*units: int = 32"
    ):
        client.train("refused", layers=layers, loss="mse", dataset=tiny["reg"])
    config = (
        _endpoint_model()
        .to_json()
        .replace("examples>LogisticEndpoint", "elsewhere>LogisticEndpoint")
    )
    with pytest.raises(
        fitserve.InvalidArgumentError, match=r"'elsewhere>LogisticEndpoint' is not a plugin"
    ):
        client.train("refused", model=config, loss="mse", dataset=_ref(tiny["bin"], "x", "targets"))


@pytest.mark.parametrize(
    ("threshold", "says"),
    [
        (training_pb2.Threshold(monitor="loss"), "callbacks.thresholds.0.value: is required"),
        (training_pb2.Threshold(value=1.0), "callbacks.thresholds.0.monitor"),
        (training_pb2.Threshold(monitor="loss", value=1.0, mode="up"), "'auto', 'min' or 'max'"),
    ],
    ids=["no-value", "no-monitor", "bad-mode"],
)
def test_bad_thresholds_are_refused_on_the_wire(
    stub: Any, tiny: dict[str, Any], threshold: training_pb2.Threshold, says: str
) -> None:
    request = training_pb2.TrainRequest(
        model_name="refused",
        model=training_pb2.ModelSpec(keras_json=_endpoint_model().to_json()),
        dataset=_ref(tiny["bin"], "x", "targets"),
        callbacks=training_pb2.CallbackOptions(thresholds=[threshold]),
    )
    with pytest.raises(grpc.RpcError) as info:
        stub.Train(request)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert says in str(info.value.details())
