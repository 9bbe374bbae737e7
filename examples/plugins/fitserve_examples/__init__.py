"""Example fitserve plugins, one of each kind, from the Keras lessons.

Installed on the servers and workers (``pip install examples/plugins``), they are found
through the ``fitserve.plugins`` entry point in ``pyproject.toml`` and used by name:
``loss="examples>huber"``, ``{"type": "examples>SimpleDense", "units": 32}``.

Every loss, metric and layer is also registered with Keras here
(``register_keras_serializable``), so a model built from these classes on a laptop
serializes with the same names
(``registered_name: "examples>SimpleDense"``) and can be sent with ``train(model=...)``.
"""

from __future__ import annotations

from typing import Any

import keras

from fitserve_examples.callbacks import EpochMarker
from fitserve_examples.layers import LogisticEndpoint, SimpleDense
from fitserve_examples.losses import Huber, huber_fn
from fitserve_examples.metrics import CategoricalTruePositives

PACKAGE = "examples"

FITSERVE_PLUGIN: dict[str, Any] = {
    "package": PACKAGE,
    "losses": {"huber_fn": huber_fn, "huber": Huber, "LogisticEndpoint": LogisticEndpoint},
    "metrics": [CategoricalTruePositives],
    "layers": [SimpleDense],
    "callbacks": [EpochMarker],
}


# Callbacks are not serialized with a model, so Keras has nothing to register for them.
def _register(section: str) -> None:
    objects = FITSERVE_PLUGIN[section]
    named = objects.items() if isinstance(objects, dict) else ((o.__name__, o) for o in objects)
    for name, obj in named:
        keras.saving.register_keras_serializable(package=PACKAGE, name=name)(obj)


for _section in ("losses", "metrics", "layers"):
    _register(_section)

__all__ = [
    "FITSERVE_PLUGIN",
    "CategoricalTruePositives",
    "EpochMarker",
    "Huber",
    "LogisticEndpoint",
    "SimpleDense",
    "huber_fn",
]
