"""A stateful metric, as in the Keras guide "Training & evaluation with built-in methods"."""

from __future__ import annotations

from typing import Any

import keras
from keras import ops


class CategoricalTruePositives(keras.metrics.Metric):  # type: ignore[misc]
    """How many samples were classified correctly: the count of argmax(y_pred) == y_true
    (sparse integer labels), summed over the epoch."""

    def __init__(self, name: str = "categorical_true_positives", **kwargs: Any) -> None:
        super().__init__(name=name, **kwargs)
        self.true_positives = self.add_variable(shape=(), name="ctp", initializer="zeros")

    def update_state(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> None:
        y_pred = ops.reshape(ops.argmax(y_pred, axis=1), (-1, 1))
        values = ops.cast(ops.reshape(y_true, (-1, 1)), "int32") == ops.cast(y_pred, "int32")
        values = ops.cast(values, "float32")
        if sample_weight is not None:
            values = ops.multiply(values, ops.cast(ops.reshape(sample_weight, (-1, 1)), "float32"))
        self.true_positives.assign_add(ops.sum(values))

    def result(self) -> Any:
        return self.true_positives

    def reset_state(self) -> None:
        self.true_positives.assign(0.0)
