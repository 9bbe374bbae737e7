"""Shape checks before fit: each mismatch names both shapes and what to do."""

from __future__ import annotations

import numpy as np
import pytest

from service.domain.shapes import InvalidInputs, InvalidLabels, check_inputs, check_targets


def test_matching_inputs_pass_and_none_matches_any_size() -> None:
    check_inputs({"x": (None, 28, 28)}, np.zeros((4, 28, 28)))
    check_inputs({"x": (None, None, 3)}, np.zeros((4, 7, 3)))
    check_inputs({"a": (None, 2), "b": (None, 3)}, {"a": np.zeros((4, 2)), "b": np.zeros((4, 3))})


def test_an_input_of_the_wrong_shape_names_both_shapes() -> None:
    with pytest.raises(InvalidInputs, match=r"has shape \[4, 27, 28\]; .* expects \[-1, 28, 28\]"):
        check_inputs({"x": (None, 28, 28)}, np.zeros((4, 27, 28)))
    with pytest.raises(InvalidInputs, match=r"has shape \[4\]; .* expects \[-1, 1\]"):
        check_inputs({"x": (None, 1)}, np.zeros(4))


def test_a_missing_named_input_is_named() -> None:
    with pytest.raises(InvalidInputs, match="the model has an input 'b'; the dataset has only a"):
        check_inputs({"a": (None, 2), "b": (None, 3)}, {"a": np.zeros((4, 2))})


@pytest.mark.parametrize(
    ("output", "loss", "y"),
    [
        ((None, 10), "sparse_categorical_crossentropy", np.arange(10)),
        ((None, 10), "SparseCategoricalCrossentropy", np.arange(10).reshape(-1, 1)),
        ((None, 10), "categorical_crossentropy", np.eye(10)),
        ((None, 1), "binary_crossentropy", np.array([0, 1, 1])),
        ((None, 1), "mse", np.array([[0.5], [1.5]])),
        ((None, 3), "mse", np.zeros((2, 3))),
    ],
)
def test_labels_that_fit_pass(output: tuple[int | None, ...], loss: str, y: np.ndarray) -> None:
    check_targets(output, loss, y)


@pytest.mark.parametrize(
    ("output", "loss", "y", "message"),
    [
        (
            (None, 10),
            "sparse_categorical_crossentropy",
            np.eye(10),
            "got labels of shape [10, 10]; it expects integer class ids of shape [10] — use "
            "'categorical_crossentropy' for one-hot labels",
        ),
        (
            (None, 10),
            "categorical_crossentropy",
            np.arange(10),
            "expects one-hot labels of shape [10, 10] — use 'sparse_categorical_crossentropy'",
        ),
        ((None, 3), "sparse_categorical_crossentropy", np.array([0, 3]), "class id 3"),
        ((None, 3), "sparse_categorical_crossentropy", np.array([0, -1]), "class id -1"),
        ((None, 3), "sparse_categorical_crossentropy", np.array([0.5, 1.0]), "have fractions"),
        ((None, 3), "categorical_crossentropy", np.zeros((2, 4)), "output has shape [-1, 3]"),
        ((None, 10), "mse", np.zeros(4), "got labels of shape [4]; the model's output has shape"),
    ],
)
def test_labels_that_do_not_fit_say_why(
    output: tuple[int | None, ...], loss: str, y: np.ndarray, message: str
) -> None:
    with pytest.raises(InvalidLabels) as exc:
        check_targets(output, loss, y)
    assert message in exc.value.message
    assert exc.value.reason == "INVALID_LABELS"
