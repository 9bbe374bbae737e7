"""The training reference: a plain script doing what the service does, timed around fit.

python -m bench.plain_train --data digits.npz --epochs 5 --batch-size 32 --seed 0
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", required=True)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    import keras
    import numpy as np
    import tensorflow as tf

    from bench.models import build_reference

    with np.load(a.data) as npz:
        x, y = npz["x"], npz["y"]
    keras.utils.set_random_seed(a.seed)
    tf.config.experimental.enable_op_determinism()
    model = build_reference(a.seed)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    epoch_ends: list[float] = []

    class Clock(keras.callbacks.Callback):  # type: ignore[misc]
        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            epoch_ends.append(time.time())

    start = time.time()
    history = model.fit(
        x, y, epochs=a.epochs, batch_size=a.batch_size, shuffle=True, callbacks=[Clock()], verbose=0
    )
    end = time.time()
    print(
        json.dumps(
            {
                "fit_start": start,
                "fit_end": end,
                "epoch_ends": epoch_ends,
                "accuracy": float(history.history["accuracy"][-1]),
            }
        )
    )


if __name__ == "__main__":
    main()
