import copy
import json

import pytest

from service.domain import allowed_keras
from service.domain.job_specs import parse_train
from service.errors import InvalidRequest

BASE = {
    "model_name": "mnist",
    "model": {"layers": [{"type": "Dense", "units": 2, "input_shape": [4]}]},
    "compile": {"loss": {"name": "sparse_categorical_crossentropy"}},
    "dataset": {"builtin": "mnist"},
}


def request(**changes):
    """BASE with `a__b` paths set; a value of None deletes the key."""
    data = copy.deepcopy(BASE)
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        node = data
        for key in parents:
            node = node.setdefault(key, {})
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    return data


def refused(data) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        parse_train(data)
    return info.value


def test_defaults_are_filled_in():
    spec = parse_train(request())

    assert spec.fit.epochs == 1
    assert spec.fit.batch_size == 32
    assert spec.fit.initial_epoch == 0
    assert spec.compile.optimizer.name == "adam"
    assert spec.compile.optimizer.params == {}
    assert spec.compile.loss.name == "sparse_categorical_crossentropy"
    assert spec.run.queue == "train"


def test_optimizer_names_are_case_insensitive():
    spec = parse_train(request(compile__optimizer={"name": "RMSprop"}))

    assert spec.compile.optimizer.name == "rmsprop"


def test_a_round_trip_through_json_gives_the_same_spec():
    spec = parse_train(request(fit={"epochs": 3, "validation_split": 0.25}))

    assert parse_train(spec.model_dump()) == spec


@pytest.mark.parametrize(
    ("changes", "field", "what", "valid"),
    [
        ({"compile__optimizer": {"name": "adamx"}}, "compile.optimizer", "optimizer", "OPTIMIZERS"),
        ({"compile__loss": {"name": "l7"}}, "compile.loss", "loss", "LOSSES"),
        ({"compile__metrics": [{"name": "acuracy"}]}, "compile.metrics", "metric", "METRICS"),
    ],
)
def test_unknown_names_are_refused_listing_the_valid_ones(changes, field, what, valid):
    err = refused(request(**changes))

    assert err.field == field
    assert f"unknown {what}" in err.message
    listed = err.message.split("valid: ", 1)[1].split(", ")
    assert set(listed) == getattr(allowed_keras, valid)


def test_an_unknown_loss_of_an_output_is_refused():
    err = refused(request(compile={"output_losses": {"y": {"name": "nope"}}}))

    assert err.field == "compile.output_losses"
    assert "unknown loss 'nope'" in err.message


def test_per_output_losses_replace_the_loss():
    spec = parse_train(request(compile={"output_losses": {"y": {"name": "mse"}}}))

    assert spec.compile.loss is None
    assert spec.compile.output_losses["y"].name == "mse"


def test_a_missing_loss_is_refused():
    err = refused(request(compile__loss=None))

    assert err.field == "compile.loss"
    assert "compile.loss is required" in err.message


def test_validation_split_and_validation_data_together_are_refused():
    err = refused(request(fit={"validation_split": 0.2, "validation_data": {"builtin": "mnist"}}))

    assert err.field == "fit"
    assert "validation_split or validation_data, not both" in err.message


@pytest.mark.parametrize(("initial", "epochs"), [(3, 3), (5, 2)])
def test_initial_epoch_must_be_below_epochs(initial, epochs):
    err = refused(request(fit={"initial_epoch": initial, "epochs": epochs}))

    assert err.field == "fit"
    assert f"initial_epoch {initial} must be below epochs {epochs}" in err.message


@pytest.mark.parametrize("name", ["Bad", "../x", "a/b", ""])
def test_a_bad_model_name_is_refused(name):
    err = refused(request(model_name=name))

    assert err.field == "model_name"
    assert repr(name) in err.message


def test_a_missing_model_name_is_required():
    err = refused(request(model_name=None))

    assert err.field == "model_name"
    assert err.message == "model_name: is required"


@pytest.mark.parametrize(
    "model",
    [
        {"keras_json": '{"class_name": "Sequential"}', "layers": [{"type": "Dense"}]},
        {},
    ],
    ids=["both", "neither"],
)
def test_exactly_one_of_keras_json_and_layers(model):
    err = refused(request(model=model))

    assert err.field == "model"
    assert "exactly one of keras_json" in err.message


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"colour": "red"}, "colour"),
        ({"fit__learning_rate": 0.1}, "fit.learning_rate"),
        ({"compile__optimizer": {"name": "adam", "lr": 0.1}}, "compile.optimizer.lr"),
    ],
)
def test_unknown_fields_are_refused_by_name(changes, field):
    err = refused(request(**changes))

    assert err.field == field
    assert err.message == f"{field}: is not a known field"


def test_several_errors_report_the_first_and_count_the_rest():
    err = refused(request(colour="red", size="xl"))

    assert err.message.endswith("(and 1 more)")


@pytest.mark.parametrize(
    ("fit", "field"),
    [({"epochs": 0}, "fit.epochs"), ({"batch_size": 0}, "fit.batch_size")],
)
def test_out_of_range_numbers_are_refused(fit, field):
    assert refused(request(fit=fit)).field == field


def test_a_dataset_needs_exactly_one_source():
    err = refused(request(dataset={"builtin": "mnist", "dataset": "d"}))

    assert err.field == "dataset"
    assert "exactly one of dataset, uri or builtin" in err.message


@pytest.mark.parametrize(
    ("changes", "field", "says"),
    [
        (
            {"callbacks__early_stopping": {"enabled": True}},
            "callbacks.early_stopping.monitor",
            "'val_loss' is a validation metric, but the fit has no validation data",
        ),
        (
            {"callbacks__thresholds": [{"monitor": "val_accuracy", "value": 0.9}]},
            "callbacks.thresholds.0.monitor",
            "or monitor 'accuracy'",
        ),
        (
            {"fit__class_weight": {0: -1.0}},
            "fit.class_weight",
            "a class weight is a finite number >= 0",
        ),
        ({"fit__class_weight": {2: 1.0}}, "fit.class_weight", "class 2 cannot occur"),
    ],
    ids=["early-stopping-val", "threshold-val", "negative-weight", "class-beyond-output"],
)
def test_requests_that_would_fail_or_do_nothing_on_a_worker_are_refused(changes, field, says):
    err = refused(request(**changes))

    assert err.field == field
    assert says in err.message


def test_val_monitors_are_fine_with_validation_data():
    spec = parse_train(
        request(fit__validation_split=0.25, callbacks__early_stopping={"enabled": True})
    )
    assert spec.callbacks.early_stopping.monitor == "val_loss"


FUNCTIONAL_TWO_OUTPUTS = json.dumps(
    {
        "class_name": "Functional",
        "config": {"layers": [], "output_layers": [["cls", 0, 0], ["reg", 0, 0]]},
    }
)


def test_a_two_output_model_takes_its_metrics_per_output():
    two = {"keras_json": FUNCTIONAL_TWO_OUTPUTS}
    err = refused(request(model=two, compile__metrics=[{"name": "accuracy"}]))
    assert err.field == "compile.metrics"
    assert "2 outputs ('cls', 'reg')" in err.message
    err = refused(request(model=two, compile__output_metrics={"clss": [{"name": "accuracy"}]}))
    assert (err.field, "no output 'clss'" in err.message) == ("compile.output_metrics", True)
    spec = parse_train(
        request(
            model=two,
            compile__output_metrics={"cls": [{"name": "accuracy"}], "reg": [{"name": "mae"}]},
        )
    )
    assert [m.name for m in spec.compile.output_metrics["reg"]] == ["mae"]


def test_layer_list_numbers_keep_their_json_types():
    spec = parse_train(
        request(model={"layers": [{"type": "Dense", "units": 2.0, "input_shape": [4.0]}]})
    )
    assert spec.model.layers[0] == {"type": "Dense", "units": 2, "input_shape": [4]}
    assert type(spec.model.layers[0]["units"]) is int


def test_class_ids_are_checked_against_a_functional_models_dense_output():
    config = {
        "class_name": "Functional",
        "config": {
            "layers": [
                {"class_name": "InputLayer", "config": {"name": "x"}},
                {"class_name": "Dense", "config": {"name": "probs", "units": 3}},
            ],
            "output_layers": [["probs", 0, 0]],
        },
    }
    err = refused(request(model={"keras_json": json.dumps(config)}, fit__class_weight={3: 1.0}))
    assert err.field == "fit.class_weight"
    assert "class 3 cannot occur" in err.message


# ---- caps on free-form fields (they are stored in the job record and fitserve.json) ----


@pytest.mark.parametrize(
    ("changes", "field", "limit"),
    [
        ({"run__labels": {"team": "x" * 257}}, "run.labels.team", "at most 256 characters"),
        ({"run__labels": {"t" * 64: "x"}}, "run.labels", "at most 63 characters"),
        ({"run__labels": {"": "x"}}, "run.labels", "at least 1 character"),
        ({"run__labels": {f"k{i}": "v" for i in range(65)}}, "run.labels", "at most 64 items"),
        ({"dataset": {"uri": "/d/" + "x" * 4094}}, "dataset.uri", "at most 4096 characters"),
        ({"dataset": {"dataset": "x" * 257}}, "dataset.dataset", "at most 256 characters"),
        ({"dataset": {"builtin": "x" * 257}}, "dataset.builtin", "at most 256 characters"),
        (
            {"dataset": {"builtin": "mnist", "input_keys": ["x" * 257]}},
            "dataset.input_keys.0",
            "at most 256 characters",
        ),
        ({"compile__loss": {"name": "x" * 257}}, "compile.loss.name", "at most 256 characters"),
        (
            {"compile__loss_weights": {"o" * 257: 1.0}},
            "compile.loss_weights",
            "at most 256 characters",
        ),
        ({"fit__sample_weight_key": "w" * 257}, "fit.sample_weight_key", "at most 256"),
        (
            {"callbacks__early_stopping": {"enabled": True, "monitor": "m" * 257}},
            "callbacks.early_stopping.monitor",
            "at most 256 characters",
        ),
        ({"run__time_limit_seconds": 0}, "run.time_limit_seconds", "greater than or equal to 1"),
    ],
)
def test_free_form_fields_are_capped_naming_the_field_and_the_limit(changes, field, limit):
    err = refused(request(**changes))

    assert err.field == field
    assert err.message.startswith(f"{field}: ")
    assert limit in err.message


def test_a_refused_map_key_is_shown_cut_short():
    err = refused(request(run__labels={"k" * 10_000: "v"}))

    assert (
        err.message == f"run.labels: key '{'k' * 64}...': String should have at most 63 characters"
    )


def test_fields_at_their_caps_are_accepted():
    labels = {f"{i:02d}" + "k" * 61: "v" * 256 for i in range(64)}
    spec = parse_train(request(run__labels=labels, fit__sample_weight_key="w" * 256))

    assert spec.run.labels == labels
    assert spec.run.time_limit_seconds is None  # the api pins the server's default
