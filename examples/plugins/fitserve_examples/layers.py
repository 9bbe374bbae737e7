"""Custom layers: one with its own weights, and an endpoint layer that adds a loss."""

from __future__ import annotations

from typing import Any

import keras
from keras import ops


class SimpleDense(keras.layers.Layer):  # type: ignore[misc]
    """A Dense-like layer built with ``add_weight``: trainable ``kernel`` and ``bias``,
    and a non-trainable ``scale`` (fixed at ``scale``) the output is multiplied by."""

    def __init__(
        self, units: int = 32, activation: str | None = None, scale: float = 1.0, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.units = units
        self.activation = keras.activations.get(activation)
        self.scale_value = scale

    def build(self, input_shape: Any) -> None:
        self.kernel = self.add_weight(
            shape=(input_shape[-1], self.units), initializer="glorot_uniform", name="kernel"
        )
        self.bias = self.add_weight(shape=(self.units,), initializer="zeros", name="bias")
        self.scale = self.add_weight(
            shape=(),
            initializer=keras.initializers.Constant(self.scale_value),
            trainable=False,
            name="scale",
        )

    def call(self, inputs: Any) -> Any:
        return self.activation((ops.matmul(inputs, self.kernel) + self.bias) * self.scale)

    def compute_output_shape(self, input_shape: Any) -> Any:
        return (*input_shape[:-1], self.units)

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "units": self.units,
            "activation": keras.activations.serialize(self.activation),
            "scale": self.scale_value,
        }


class LogisticEndpoint(keras.layers.Layer):  # type: ignore[misc]
    """The endpoint-layer pattern: called on ``(targets, logits)``, it adds the binary
    cross-entropy of the logits to the model's loss (``add_loss``), tracks its accuracy
    as a metric (Keras 3's replacement for ``add_metric``: a Metric held by the layer is
    reported with the model's metrics), and returns the predicted probabilities."""

    def __init__(self, name: str | None = None, **kwargs: Any) -> None:
        super().__init__(name=name, **kwargs)
        self.loss_fn = keras.losses.BinaryCrossentropy(from_logits=True)
        self.accuracy_fn = keras.metrics.BinaryAccuracy(name="endpoint_accuracy")

    def call(self, targets: Any, logits: Any, sample_weights: Any = None) -> Any:
        probabilities = ops.sigmoid(logits)
        self.add_loss(self.loss_fn(targets, logits, sample_weights))
        self.accuracy_fn.update_state(targets, probabilities, sample_weights)
        return probabilities
