"""Checks a dataset's arrays against a model's inputs, outputs and loss before fit.

Keras reports these mismatches deep inside a traced graph ("logits and labels must have
the same first dimension", "Incompatible shapes"), or not at all when broadcasting
makes a wrong loss computable. Checking shapes first lets a job fail with what was wrong
and what to do. Pure functions of shapes and names: no Keras here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from service.errors import InvalidRequest

Shape = tuple[int | None, ...]
_SPARSE = "sparsecategoricalcrossentropy"
_CATEGORICAL = "categoricalcrossentropy"


class InvalidInputs(InvalidRequest):
    """The dataset's inputs do not fit the model's inputs."""

    reason = "INVALID_INPUTS"


class InvalidLabels(InvalidRequest):
    """The dataset's targets do not fit the model's outputs and loss."""

    reason = "INVALID_LABELS"


def check_inputs(expected: Mapping[str, Shape], x: Any) -> None:
    """Every model input has an array whose example shape matches; None matches any size."""
    arrays = x if isinstance(x, Mapping) else {next(iter(expected)): x}
    for name, shape in expected.items():
        if name not in arrays:
            have = ", ".join(sorted(arrays))
            raise InvalidInputs(f"the model has an input {name!r}; the dataset has only {have}")
        got = np.shape(arrays[name])
        if not _fits(got[1:], shape[1:]):
            raise InvalidInputs(
                f"dataset input {name!r} has shape {_show(got)}; the model's input {name!r} "
                f"expects {_show(shape)} — reshape the data or change the model's input shape"
            )


def check_targets(output: Shape, loss: str, y: Any) -> None:
    """The labels of a single-output model fit its output and its loss."""
    if isinstance(y, Mapping):
        return
    labels = np.asarray(y)
    kind = loss.replace("_", "").lower()
    if kind == _SPARSE:
        _check_sparse(output, loss, labels)
    elif kind == _CATEGORICAL:
        _check_one_hot(output, loss, labels)
    else:
        _check_same_shape(output, loss, labels.shape)


def _check_sparse(output: Shape, loss: str, y: np.ndarray) -> None:
    classes = output[-1]
    n = y.shape[0]
    if y.ndim == 2 and y.shape[1] == classes and classes != 1:
        raise InvalidLabels(
            f"loss {loss!r} got labels of shape {_show(y.shape)}; it expects integer class ids "
            f"of shape [{n}] — use 'categorical_crossentropy' for one-hot labels"
        )
    if y.ndim > 2 or (y.ndim == 2 and y.shape[1] != 1):
        raise InvalidLabels(
            f"loss {loss!r} got labels of shape {_show(y.shape)}; it expects integer class ids "
            f"of shape [{n}]"
        )
    _check_class_ids(y, loss, classes)


def _check_class_ids(y: np.ndarray, loss: str, classes: int | None) -> None:
    if y.size == 0 or classes is None:
        return
    if not np.issubdtype(y.dtype, np.integer) and not np.all(np.mod(y, 1) == 0):
        raise InvalidLabels(f"loss {loss!r} expects integer class ids; the labels have fractions")
    low, high = int(np.min(y)), int(np.max(y))
    if low < 0 or high >= classes:
        bad = low if low < 0 else high
        raise InvalidLabels(
            f"labels hold class id {bad}, but the model's output has {classes} units, so class "
            f"ids must be 0..{classes - 1} — give the last layer as many units as classes"
        )


def _check_one_hot(output: Shape, loss: str, y: np.ndarray) -> None:
    classes = output[-1]
    if classes not in (None, 1) and (y.ndim == 1 or (y.ndim == 2 and y.shape[1] == 1)):
        raise InvalidLabels(
            f"loss {loss!r} got labels of shape {_show(y.shape)}; it expects one-hot labels of "
            f"shape [{y.shape[0]}, {classes}] — use 'sparse_categorical_crossentropy' for "
            "integer class ids"
        )
    _check_same_shape(output, loss, y.shape)


def _check_same_shape(output: Shape, loss: str, shape: Sequence[int]) -> None:
    example = tuple(shape[1:]) or (1,)
    if not _fits(example, output[1:]):
        raise InvalidLabels(
            f"loss {loss!r} got labels of shape {_show(shape)}; the model's output has shape "
            f"{_show(output)} — the labels must have the output's shape"
        )


def _fits(got: Sequence[int | None], expected: Sequence[int | None]) -> bool:
    return len(got) == len(expected) and all(
        e is None or g == e for g, e in zip(got, expected, strict=True)
    )


def _show(shape: Sequence[int | None]) -> str:
    return "[" + ", ".join("-1" if d is None else str(d) for d in shape) + "]"
