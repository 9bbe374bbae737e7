"""Two of the three ways Keras allows a custom loss (the third, a layer that calls
``add_loss``, is ``layers.LogisticEndpoint``)."""

from __future__ import annotations

from typing import Any

import keras
from keras import ops


def huber_fn(y_true: Any, y_pred: Any, threshold: float = 1.0) -> Any:
    """Huber loss as a function of (y_true, y_pred): squared error below ``threshold``,
    linear above it, so outliers pull less than with mean squared error."""
    y_true = ops.cast(y_true, y_pred.dtype)
    error = y_true - y_pred
    small = ops.abs(error) <= threshold
    squared = 0.5 * ops.square(error)
    linear = threshold * (ops.abs(error) - 0.5 * threshold)
    return ops.mean(ops.where(small, squared, linear), axis=-1)


class Huber(keras.losses.Loss):  # type: ignore[misc]
    """Huber loss as a ``keras.losses.Loss`` subclass with a parameter: squared error
    below ``delta``, linear above it."""

    def __init__(self, delta: float = 1.0, name: str = "huber", **kwargs: Any) -> None:
        super().__init__(name=name, **kwargs)
        self.delta = delta

    def call(self, y_true: Any, y_pred: Any) -> Any:
        return huber_fn(y_true, y_pred, self.delta)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "delta": self.delta}
