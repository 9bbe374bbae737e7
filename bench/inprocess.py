"""The in-process ceiling: the SavedModel's serving function in a loop, no RPC.

python -m bench.inprocess --model-dir models/mlp/1 --seconds 2
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model-dir", required=True)
    p.add_argument("--seconds", type=float, default=2.0)
    a = p.parse_args()
    import tensorflow as tf

    fn = tf.saved_model.load(a.model_dir).signatures["serving_default"]
    (name,) = fn.structured_input_signature[1]
    results = []
    for batch in (1, 32, 512):
        x = tf.constant(np.random.default_rng(0).random((batch, 28, 28), dtype=np.float32))
        for _ in range(20):  # warm-up and tracing
            fn(**{name: x})
        calls, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < a.seconds:
            fn(**{name: x})["output_0"].numpy()
            calls += 1
        results.append(
            {
                "batch": batch,
                "calls_per_s": calls / elapsed,
                "samples_per_s": calls * batch / elapsed,
            }
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
