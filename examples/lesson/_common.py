"""What every lesson example shares: its command line, connecting to fitserve, and MNIST.

Not an example itself: the scripts import it (``from _common import ...``).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

import fitserve

SMALL_TRAIN, SMALL_TEST = 256, 64  # the stand-in's sizes: a lesson step in seconds


def parse_args(description: str) -> argparse.Namespace:
    """``--small``: the generated stand-in instead of MNIST, and fewer epochs."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--small",
        action="store_true",
        help="use a small generated stand-in for MNIST (offline, seconds) and 2 epochs",
    )
    args = parser.parse_args()
    args.epochs = 2 if args.small else 5  # the lesson trains for 5
    return args


def data_dir() -> Path:
    """The data folder of the stack (``make run``: ./data; else FITSERVE_DATA_DIR)."""
    return Path(os.environ.get("FITSERVE_DATA_DIR", "data")).resolve()


def connect() -> fitserve.Client:
    """A client of the stack at FITSERVE_TARGET (default localhost:50051, as for the CLI),
    with the token of FITSERVE_TOKEN, else the admin token ``make run`` wrote in the data
    folder."""
    token = os.environ.get("FITSERVE_TOKEN")
    if token is None and (data_dir() / "admin.token").exists():
        token = (data_dir() / "admin.token").read_text().strip()
    return fitserve.Client(token=token or "", timeout=300)


Split = tuple[np.ndarray, np.ndarray]


def load_mnist(small: bool) -> tuple[Split, Split]:
    """``keras.datasets.mnist.load_data()``: uint8 images (N, 28, 28) and integer labels,
    or, with ``small`` or where MNIST cannot be downloaded, a generated stand-in of the same
    shapes and types (each digit a bright vertical band at its own place)."""
    if not small:
        try:
            import keras

            return keras.datasets.mnist.load_data()  # type: ignore[no-any-return]
        except Exception as exc:  # no network: say so, and carry on with the stand-in
            print(f"MNIST could not be downloaded ({type(exc).__name__}); using a stand-in")
    rng = np.random.default_rng(0)

    def split(n: int) -> Split:
        y = rng.integers(0, 10, n).astype(np.uint8)
        x = rng.integers(0, 80, (n, 28, 28)).astype(np.uint8)
        for i, label in enumerate(y):
            x[i, 4:24, 2 * label + 4 : 2 * label + 7] = 255
        return x, y

    return split(SMALL_TRAIN), split(SMALL_TEST)


def print_history(history: dict[str, list[float]]) -> None:
    """What ``model.fit`` prints, one line per epoch."""
    epochs = len(next(iter(history.values()), []))
    for epoch in range(epochs):
        metrics = " - ".join(f"{k}: {v[epoch]:.4f}" for k, v in history.items())
        print(f"Epoch {epoch + 1}/{epochs} - {metrics}")
