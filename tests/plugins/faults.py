"""Plugins that misbehave, loaded by the test stack through FITSERVE_PLUGINS (code that
is not packaged): a loss that raises while a job traces it, a callback that raises
mid-fit, a callback that hangs, and a callback with a required parameter."""

from __future__ import annotations

import time
from typing import Any

import keras


def exploding_loss(y_true: Any, y_pred: Any) -> Any:
    """Raises as soon as Keras traces it."""
    raise ValueError("exploding_loss always fails: the plugin's own error")


class ExplodingCallback(keras.callbacks.Callback):  # type: ignore[misc]
    """Raises at the end of epoch ``at``."""

    def __init__(self, at: int = 1) -> None:
        super().__init__()
        self.at = at

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if epoch + 1 == self.at:
            raise RuntimeError(f"ExplodingCallback fails at epoch {self.at}")


class Hang(keras.callbacks.Callback):  # type: ignore[misc]
    """Does not return from the start of the fit for ``seconds``: a fit that its job's
    time limit cannot stop (it is never at a batch end)."""

    def __init__(self, seconds: float = 3600.0) -> None:
        super().__init__()
        self.seconds = seconds

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        time.sleep(self.seconds)


class NeedsParam(keras.callbacks.Callback):  # type: ignore[misc]
    """Takes a required parameter."""

    def __init__(self, every: int) -> None:
        super().__init__()
        self.every = every


FITSERVE_PLUGIN = {
    "package": "faults",
    "losses": [exploding_loss],
    "callbacks": [ExplodingCallback, Hang, NeedsParam],
}
