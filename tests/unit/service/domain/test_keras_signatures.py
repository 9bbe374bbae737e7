"""The api-side signature table matches the installed Keras, and check() refuses at submission
what the worker's constructor would refuse."""

import subprocess
import sys
from pathlib import Path

import keras
import pytest

from service.domain import allowed_keras, keras_signatures
from service.domain.job_specs import NamedConfig
from service.domain.keras_signatures import SIGNATURES, check
from service.errors import InvalidRequest
from service.training.building import _classes, _construct
from tools import gen_keras_signatures

ROOT = Path(__file__).resolve().parents[4]
KINDS = {
    "optimizer": (keras.optimizers, keras.optimizers.Optimizer),
    "loss": (keras.losses, keras.losses.Loss),
    "metric": (keras.metrics, keras.metrics.Metric),
}


def build_on_worker(kind, name, params):
    """What service.training.building does with the same compile argument."""
    module, base = KINDS[kind]
    return _construct(_classes(module, base), NamedConfig(name=name, params=params), kind)


# --- the table is the installed Keras -------------------------------------------------------


def test_committed_table_matches_installed_keras():
    assert gen_keras_signatures.signatures() == SIGNATURES, (
        "service/domain/keras_signatures.py is stale: run 'make keras-signatures' and commit"
    )


def test_table_was_generated_from_the_installed_keras_version():
    assert keras.__version__ == keras_signatures.KERAS_VERSION


def test_committed_text_is_what_the_generator_writes():
    text = (ROOT / "service" / "domain" / "keras_signatures.py").read_text()
    start = text.index(gen_keras_signatures.BEGIN)
    end = text.index(gen_keras_signatures.END) + len(gen_keras_signatures.END)

    assert text[start:end] == gen_keras_signatures.render(
        keras.__version__, gen_keras_signatures.signatures()
    )


@pytest.mark.parametrize(
    ("kind", "names"),
    [
        ("optimizer", allowed_keras.OPTIMIZERS),
        ("loss", allowed_keras.LOSSES),
        ("metric", allowed_keras.METRICS),
    ],
)
def test_every_allowlisted_identifier_has_an_entry(kind, names):
    assert set(SIGNATURES[kind]) == names


def test_entries_name_the_class_building_resolves():
    assert SIGNATURES["optimizer"]["adam"]["class"] == "Adam"
    assert SIGNATURES["loss"]["huber"]["class"] == "Huber"
    assert SIGNATURES["loss"]["mean_squared_error"]["class"] == "MeanSquaredError"
    assert SIGNATURES["metric"]["accuracy"]["class"] == "Accuracy"


@pytest.mark.parametrize(("kind", "name"), [("loss", "mse"), ("metric", "mse"), ("metric", "acc")])
def test_aliases_resolve_to_no_class(kind, name):
    assert SIGNATURES[kind][name] is None
    with pytest.raises(InvalidRequest, match="takes no parameters here"):
        build_on_worker(kind, name, {"x": 1})


def test_module_imports_no_keras_or_tensorflow():
    code = (
        "import sys, service.domain.keras_signatures; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('keras', 'tensorflow')); "
        "sys.exit(f'imported {bad}' if bad else 0)"
    )

    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
    )

    assert result.returncode == 0, result.stderr


# --- check() accepts ------------------------------------------------------------------------

ACCEPTED = [
    ("optimizer", "adam", {"learning_rate": 0.01}),
    ("optimizer", "adam", {"learning_rate": 1}),  # an int where the default is a float
    ("optimizer", "adam", {"name": "x"}),
    ("optimizer", "sgd", {"momentum": 0.9, "nesterov": True, "clipnorm": 1.0}),
    ("optimizer", "adam", {"weight_decay": None}),  # None is always allowed
    ("loss", "huber", {"delta": 2.0}),
    ("loss", "sparse_categorical_crossentropy", {"from_logits": True}),
    ("loss", "categorical_crossentropy", {"axis": [1]}),  # axis may be a list
    ("metric", "auc", {"num_thresholds": 50.0}),  # JSON numbers may arrive as floats
    ("metric", "binary_crossentropy", {"label_smoothing": 0.1}),  # default 0, a float really
    ("metric", "accuracy", {"name": "acc"}),
    ("metric", "f1_score", {"average": "macro", "threshold": 0.5}),
]


@pytest.mark.parametrize(("kind", "name", "params"), ACCEPTED)
def test_accepts_what_the_worker_builds(kind, name, params):
    check(kind, name, params)

    build_on_worker(kind, name, params)


@pytest.mark.parametrize(
    ("kind", "name"),
    [("optimizer", "no_such_optimizer"), ("loss", "pkg>custom"), ("metric", "Accuracy")],
)
def test_names_not_in_the_table_are_not_checked(kind, name):
    check(kind, name, {"anything": "goes"})


@pytest.mark.parametrize(("kind", "name"), [("loss", "mse"), ("optimizer", "adam")])
def test_no_params_is_never_refused(kind, name):
    check(kind, name, {})


# --- check() refuses ------------------------------------------------------------------------


def test_refuses_an_unknown_parameter_naming_it_and_what_the_class_takes():
    with pytest.raises(InvalidRequest) as err:
        check("optimizer", "adam", {"learning_rate": 0.01, "bogus": 1})

    message = err.value.message
    assert message.startswith("optimizer 'adam' has no parameter 'bogus'; it takes ")
    assert "learning_rate: float = 0.001, beta_1: float = 0.9" in message
    assert "amsgrad: bool = False" in message
    assert "name = None" in message
    assert err.value.field is None


@pytest.mark.parametrize(
    ("kind", "name", "params"),
    [
        ("optimizer", "adam", {"bogus": 1}),
        ("optimizer", "sgd", {"beta_1": 0.9}),
        ("loss", "huber", {"huber_delta": 1.0}),
        ("metric", "auc", {"thresholds_count": 10}),
    ],
)
def test_unknown_parameters_are_refused_by_the_worker_too(kind, name, params):
    with pytest.raises(InvalidRequest, match="has no parameter"):
        check(kind, name, params)
    with pytest.raises(InvalidRequest):
        build_on_worker(kind, name, params)


@pytest.mark.parametrize(
    ("kind", "name", "params", "message"),
    [
        (
            "loss",
            "huber",
            {"delta": "x"},
            """loss 'huber' parameter 'delta' must be a number (default 1.0), got the string "x\"""",
        ),
        (
            "optimizer",
            "adam",
            {"learning_rate": True},
            "optimizer 'adam' parameter 'learning_rate' must be a number (default 0.001), "
            "got the boolean true",
        ),
        (
            "metric",
            "auc",
            {"num_thresholds": 2.5},
            "metric 'auc' parameter 'num_thresholds' must be a whole number (default 200), "
            "got the number 2.5",
        ),
        (
            "optimizer",
            "adam",
            {"amsgrad": 1},
            "optimizer 'adam' parameter 'amsgrad' must be true or false (default False), "
            "got the number 1",
        ),
        (
            "metric",
            "auc",
            {"curve": 1.0},
            "metric 'auc' parameter 'curve' must be a string (default 'ROC'), got the number 1.0",
        ),
        (
            "optimizer",
            "sgd",
            {"momentum": [0.9]},
            "optimizer 'sgd' parameter 'momentum' must be a number (default 0.0), "
            "got the list [0.9]",
        ),
    ],
)
def test_refuses_a_value_of_the_wrong_json_type(kind, name, params, message):
    with pytest.raises(InvalidRequest) as err:
        check(kind, name, params)

    assert err.value.message == message


@pytest.mark.parametrize(
    ("kind", "name"), [("loss", "mse"), ("loss", "mae"), ("metric", "mse"), ("metric", "acc")]
)
def test_refuses_params_for_a_name_that_resolves_to_no_class_as_the_worker_does(kind, name):
    with pytest.raises(InvalidRequest) as api:
        check(kind, name, {"name": "x"})
    with pytest.raises(InvalidRequest) as worker:
        build_on_worker(kind, name, {"name": "x"})

    assert api.value.message == worker.value.message
    assert (
        api.value.message
        == f"{kind} {name!r} takes no parameters here; to pass some, use its full name (e.g. 'mean_squared_error' for 'mse', 'accuracy' for 'acc')"
    )


def test_an_unknown_kind_is_a_programming_error():
    with pytest.raises(ValueError, match="kind must be one of"):
        check("layer", "Dense", {"units": 1})
