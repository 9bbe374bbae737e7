"""The reference model of the benchmarks (bench/README.md), stored as fitserve versions."""

from __future__ import annotations

import time
from pathlib import Path

MODEL = "ref-mlp"


def build_reference(seed: int):  # type: ignore[no-untyped-def]
    """Flatten 28x28 -> Dense 128 relu -> Dropout 0.2 -> Dense 10 softmax."""
    import keras

    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((28, 28), name="x"),
            keras.layers.Flatten(),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dropout(0.2),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )


def publish_reference(models_dir: Path, versions: int = 2) -> Path:
    """Publish ``versions`` versions of the reference MLP; returns version 1's folder."""
    from service.domain.model_store import ModelStore
    from service.training.exporting import export_version

    store = ModelStore(models_dir)
    for v in range(1, versions + 1):
        model = build_reference(seed=v)
        export_version(model, store, MODEL, f"bench{v}", {"created_at": time.time(), "metrics": {}})
    return store.path(MODEL, 1)
