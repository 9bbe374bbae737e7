"""Write digits.npz beside this script (or to the path given): 2048 28x28 float images
whose label is the brightest of ten vertical bands, a stand-in for MNIST that trains
offline in seconds. Used by mnist-mlp.yaml:

    python examples/cli/make_digits.py [OUT.npz] [--samples N]
    fitserve train examples/cli/mnist-mlp.yaml
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def digits(samples: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`samples` images (N, 28, 28) float32 and their labels (N,) int64."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, size=samples)
    x = rng.random((samples, 28, 28), dtype=np.float32) * 0.3
    for i, label in enumerate(y):
        x[i, :, label * 2 : label * 2 + 3] += 0.7
    return x, y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default=str(Path(__file__).with_name("digits.npz")))
    parser.add_argument("--samples", type=int, default=2048)
    args = parser.parse_args()
    x, y = digits(args.samples)
    np.savez(args.out, x=x, y=y)
    print(f"wrote {args.out}: x {x.shape}, y {y.shape}")


if __name__ == "__main__":
    main()
