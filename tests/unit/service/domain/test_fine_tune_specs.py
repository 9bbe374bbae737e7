"""FineTune requests and dataset references: what the api refuses before a job exists."""

import pytest

from service.domain.job_specs import parse_feature, parse_fine_tune, parse_train
from service.errors import InvalidRequest

BASE = {
    "base": {"name": "mnist", "version": 2},
    "freeze": {"train_last_n_layers": 1},
    "compile": {"loss": {"name": "sparse_categorical_crossentropy"}},
    "dataset": {"dataset": "digits"},
}


def refused(data: dict) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        parse_fine_tune(data)
    return info.value


def test_the_result_is_published_under_the_base_name_by_default():
    assert parse_fine_tune(BASE).model_name == "mnist"
    assert parse_fine_tune(BASE | {"model_name": "mnist-ft"}).model_name == "mnist-ft"


def test_both_phases_count_epochs_in_one_sequence():
    freeze = {"new_head": {"num_classes": 3}, "unfreeze_top_k": 2, "unfreeze_epochs": 4}
    spec = parse_fine_tune(BASE | {"freeze": freeze, "fit": {"epochs": 3}})
    assert spec.total_epochs == 7
    assert spec.freeze.second_phase
    assert spec.freeze.new_head is not None
    assert spec.freeze.new_head.activation == "softmax"


@pytest.mark.parametrize(
    ("freeze", "field", "message"),
    [
        ({}, "freeze", "set exactly one of train_last_n_layers"),
        (
            {"train_last_n_layers": 1, "new_head": {"num_classes": 2}},
            "freeze",
            "set exactly one of train_last_n_layers",
        ),
        ({"train_last_n_layers": 0}, "freeze.train_last_n_layers", "greater than or equal to 1"),
        ({"new_head": {}}, "freeze.new_head.num_classes", "is required"),
        ({"new_head": {"num_classes": 0}}, "freeze.new_head.num_classes", "greater than or equal"),
        (
            {"new_head": {"num_classes": 2, "activation": "exec"}},
            "freeze.new_head.activation",
            "unknown activation 'exec'",
        ),
        (
            {"new_head": {"num_classes": 2, "dropout": 1.0}},
            "freeze.new_head.dropout",
            "less than 1",
        ),
        (
            {"train_last_n_layers": 1, "unfreeze_top_k": 2},
            "freeze",
            "both unfreeze_top_k and unfreeze_epochs",
        ),
    ],
)
def test_bad_freeze_options_name_the_field(freeze: dict, field: str, message: str):
    err = refused(BASE | {"freeze": freeze})
    assert err.field == field
    assert message in err.message


def test_streamed_data_cannot_be_split_for_validation():
    for parse, base in ((parse_fine_tune, BASE), (parse_train, _train())):
        with pytest.raises(InvalidRequest) as info:
            parse(base | {"dataset": {"uri": "/d"}, "fit": {"validation_split": 0.1}})
        assert info.value.field == "fit.validation_split"
        assert "give fit.validation_data instead" in info.value.message


def test_unknown_builtin_lists_the_valid_names():
    err = refused(BASE | {"dataset": {"builtin": "svhn"}})
    assert err.field == "dataset"
    assert "unknown built-in dataset 'svhn'; valid: mnist, fashion_mnist, cifar10" in err.message


@pytest.mark.parametrize(
    ("dataset", "message"),
    [
        ({"dataset": "d", "split": "test"}, "split is only for built-in datasets"),
        ({"dataset": "d", "feature_spec": {"x": "float32:2"}}, "feature_spec is only for TFRecord"),
        ({"uri": "/d", "feature_spec": {"x": "float16:2"}}, "dtype one of float32, int64, string"),
    ],
)
def test_dataset_options_that_do_not_fit_the_source(dataset: dict, message: str):
    assert message in refused(BASE | {"dataset": dataset}).message


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("float32:28,28", ("float32", (28, 28))),
        ("int64:", ("int64", ())),
        ("string:1", ("string", (1,))),
    ],
)
def test_feature_specs(text: str, parsed: tuple):
    assert parse_feature(text) == parsed


@pytest.mark.parametrize("text", ["float32", "float32:a", "float32:0", "int8:3"])
def test_bad_feature_specs(text: str):
    with pytest.raises(ValueError, match=repr(text).replace("[", r"\[")):
        parse_feature(text)


def _train() -> dict:
    return {
        "model_name": "m",
        "model": {"layers": [{"type": "Dense", "units": 2, "input_shape": [4]}]},
        "compile": BASE["compile"],
        "dataset": BASE["dataset"],
    }
