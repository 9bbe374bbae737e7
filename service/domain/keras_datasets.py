"""Built-in Keras datasets, cached under ``<data_dir>/keras_datasets`` (worker side).

The folder is laid out as a Keras home (``datasets/mnist.npz``, ...), so a file put there
by hand is found, and one downloaded by ``keras.datasets.<name>.load_data`` elsewhere can
be copied in. Files Keras reads with pickle (cifar, imdb, reuters) are only ever read by
Keras itself, which checks their hash; the plain array files (mnist, fashion_mnist,
boston_housing) are read directly when present, so an operator may provide any file with
the same arrays. A download that fails (no internet) fails the job as
DATASET_UNAVAILABLE with the exact path to put the file at.
"""

from __future__ import annotations

import contextlib
import gzip
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from service.errors import FailedPrecondition

ORIGIN = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/"
SEQUENCE_LENGTH = 200  # imdb/reuters reviews are ragged; padded as Keras's examples do
Split = tuple[Any, Any]


class DatasetUnavailable(FailedPrecondition):
    """A built-in dataset is neither cached nor downloadable."""

    reason = "DATASET_UNAVAILABLE"


@dataclass(frozen=True)
class _Files:
    """Plain array files read directly: (name in the cache, sha256 for a download)."""

    files: tuple[tuple[str, str | None], ...]
    read: Callable[[list[Path]], tuple[Split, Split]]


def _read_mnist(paths: list[Path]) -> tuple[Split, Split]:
    with np.load(paths[0], allow_pickle=False) as f:
        return (f["x_train"], f["y_train"]), (f["x_test"], f["y_test"])


def _read_fashion(paths: list[Path]) -> tuple[Split, Split]:
    def read(path: Path, offset: int) -> np.ndarray:
        with gzip.open(path, "rb") as f:
            return np.frombuffer(f.read(), np.uint8, offset=offset)

    y_train, y_test = read(paths[0], 8), read(paths[2], 8)
    x_train = read(paths[1], 16).reshape(len(y_train), 28, 28)
    return (x_train, y_train), (read(paths[3], 16).reshape(len(y_test), 28, 28), y_test)


def _read_boston(paths: list[Path]) -> tuple[Split, Split]:
    """Keras's split: shuffled with seed 113, the last 20 % for test."""
    with np.load(paths[0], allow_pickle=False) as f:
        x, y = f["x"], f["y"]
    order = np.arange(len(x))
    np.random.RandomState(113).shuffle(order)
    cut = int(len(x) * 0.8)
    return (x[order[:cut]], y[order[:cut]]), (x[order[cut:]], y[order[cut:]])


_FASHION = "datasets/fashion-mnist/"
_PLAIN = {
    "mnist": _Files(
        (
            (
                "datasets/mnist.npz",
                "731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1",
            ),
        ),
        _read_mnist,
    ),
    "fashion_mnist": _Files(
        tuple(
            (_FASHION + f, None)
            for f in (
                "train-labels-idx1-ubyte.gz",
                "train-images-idx3-ubyte.gz",
                "t10k-labels-idx1-ubyte.gz",
                "t10k-images-idx3-ubyte.gz",
            )
        ),
        _read_fashion,
    ),
    "boston_housing": _Files(
        (
            (
                "datasets/boston_housing.npz",
                "f553886a1f8d56431e820c5b82552d9d95cfcb96d1e678153f8839538947dff5",
            ),
        ),
        _read_boston,
    ),
}
# Where Keras's own loaders keep each file in its home, and where they download it from.
_KERAS_FILES = {
    "cifar10": (
        "datasets/cifar-10-batches-py-target_archive",
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    ),
    "cifar100": (
        "datasets/cifar-100-python-target_archive",
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    ),
    "imdb": ("datasets/imdb.npz", ORIGIN + "imdb.npz"),
    "reuters": ("datasets/reuters.npz", ORIGIN + "reuters.npz"),
}


def load_builtin(cache: Path, name: str, split: str) -> tuple[Any, Any]:
    """``(x, y)`` of one split of a built-in dataset, downloading it on first use."""
    train, test = _load_plain(cache, name) if name in _PLAIN else _load_by_keras(cache, name)
    x, y = test if split == "test" else train
    if name in ("imdb", "reuters"):
        x = keras.utils.pad_sequences(x, maxlen=SEQUENCE_LENGTH)
    return x, y


def _load_plain(cache: Path, name: str) -> tuple[Split, Split]:
    entry = _PLAIN[name]
    paths = [_fetch(cache, name, file, sha) for file, sha in entry.files]
    return entry.read(paths)


def _fetch(cache: Path, name: str, file: str, sha256: str | None) -> Path:
    """The cached file; downloaded (and its hash checked) only when it is missing."""
    path = cache / file
    if path.is_file():
        return path
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)  # get_file falls back to /tmp for a missing one
    try:
        keras.utils.get_file(
            path.name,
            origin=ORIGIN + path.name,
            file_hash=sha256,
            cache_dir=str(folder),
            cache_subdir="",
        )
    except Exception as exc:
        raise _unavailable(name, path, ORIGIN + path.name, exc) from None
    return path


def _load_by_keras(cache: Path, name: str) -> tuple[Split, Split]:
    """Keras's own loader, with its cache folder pointed at ours."""
    loader = getattr(keras.datasets, name).load_data
    try:
        with _keras_home(cache):
            result: tuple[Split, Split] = loader()
    except Exception as exc:
        file, origin = _KERAS_FILES[name]
        raise _unavailable(name, cache / file, origin, exc) from None
    return result


@contextlib.contextmanager
def _keras_home(cache: Path) -> Iterator[None]:
    """``load_data`` takes no cache folder: it reads Keras's home (``KERAS_HOME``, read
    once at import), so point that at ours while it runs (one job at a time per child)."""
    from keras.src.backend import config

    cache.mkdir(parents=True, exist_ok=True)
    previous = config._KERAS_DIR
    config._KERAS_DIR = str(cache)
    try:
        yield
    finally:
        config._KERAS_DIR = previous


def _unavailable(name: str, path: Path, origin: str, exc: Exception) -> DatasetUnavailable:
    reason = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
    return DatasetUnavailable(
        f"built-in dataset {name!r} is not cached on the worker and could not be downloaded "
        f"({reason}); provide it instead: put {path.name} (from {origin}) at "
        f"{path}, or upload the arrays with UploadDataset and use the dataset by name"
    )
