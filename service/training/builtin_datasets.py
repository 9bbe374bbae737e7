"""Built-in Keras datasets, cached under ``<data_dir>/keras_datasets`` (worker side).

The folder is laid out as a Keras home (``datasets/mnist.npz``, ...), so a file put there
by hand is found, and one that ``keras.datasets.<name>.load_data`` downloaded into
``~/.keras`` can be copied in. Files are read here as ``keras.datasets`` reads them (same
shuffles, splits and word indices), so no Keras global state is touched.

A missing file is fetched with ``keras.utils.get_file`` into a private temporary folder,
checked, and renamed into place, so workers sharing the folder never read a half-written
file and a worker killed mid-download leaves none. Every file with a published sha256
(all but fashion_mnist's) is used only while it matches it, whoever put it there: a file
that does not match is reported with both hashes and left alone, never deleted. Pickles
(cifar, imdb, reuters) are unpickled as numpy arrays only. A cifar archive is extracted
once, into a folder named by its hash, and reused. A download that fails (no internet)
fails the job as DATASET_UNAVAILABLE with the exact path to put the file at. Hashing
is cheap next to loading (the largest file read on every use, imdb's, is 17 MB), so it is
done on every use rather than remembered.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import shutil
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import keras
import numpy as np

from service.errors import FailedPrecondition

ORIGIN = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/"
SEQUENCE_LENGTH = 200  # imdb/reuters reviews are ragged; padded as Keras's examples do
SEED = 113  # the shuffle seed of Keras's loaders
START, OOV, INDEX_FROM = 1, 2, 3  # Keras's word-index defaults: 0 stays padding
Split = tuple[Any, Any]


class DatasetUnavailable(FailedPrecondition):
    """A built-in dataset is neither cached nor downloadable."""

    reason = "DATASET_UNAVAILABLE"


@dataclass(frozen=True)
class Source:
    """One file of a built-in dataset, where ``keras.datasets`` keeps it in a Keras home.

    A file with a ``sha256`` is used only while it matches. An ``archive`` is a tar.gz,
    extracted once next to it.
    """

    fname: str
    origin: str
    sha256: str | None = None
    subdir: str = "datasets"
    archive: bool = False

    def path(self, cache: Path) -> Path:
        """Where the downloaded file lives in ``cache`` (get_file's naming)."""
        return cache / self.subdir / (f"{self.fname}_archive" if self.archive else self.fname)

    def extracted(self, cache: Path) -> Path:
        """Where an archive is extracted: named by its hash, so a folder of that name
        holds all of this very archive (Keras's own name may hold a half extraction)."""
        return cache / self.subdir / f"{self.fname}.{(self.sha256 or 'unchecked')[:16]}"


@dataclass(frozen=True)
class Builtin:
    """A dataset's files and the reader that turns them into Keras's train/test split."""

    sources: tuple[Source, ...]
    read: Callable[[list[Path]], tuple[Split, Split]]


def load_builtin(cache: Path, name: str, split: str) -> tuple[Any, Any]:
    """``(x, y)`` of one split of a built-in dataset, downloading it on first use."""
    builtin = BUILTINS[name]
    train, test = builtin.read([fetch(cache, name, source) for source in builtin.sources])
    x, y = test if split == "test" else train
    if name in ("imdb", "reuters"):
        x = keras.utils.pad_sequences(x, maxlen=SEQUENCE_LENGTH)
    return x, y


def fetch(cache: Path, name: str, source: Source) -> Path:
    """The file (or an archive's extracted folder) in the cache, downloaded when missing;
    a file with a published hash only while it matches."""
    if source.archive:
        return _extracted(cache, name, source)
    return _checked(name, source, source.path(cache))


def _checked(name: str, source: Source, path: Path) -> Path:
    if not path.is_file():
        _download(name, source, path)
    _check_hash(name, source, path)
    return path


def _download(name: str, source: Source, path: Path) -> None:
    """Fetch into a private temporary folder, check, then rename into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{path.name}-", dir=path.parent) as tmp:
        try:
            got = keras.utils.get_file(
                path.name, origin=source.origin, cache_dir=tmp, cache_subdir=tmp
            )
        except Exception as exc:
            raise _unavailable(name, path, source, exc) from None
        digest = _sha256(Path(got))
        if source.sha256 is not None and digest != source.sha256:
            raise DatasetUnavailable(
                f"built-in dataset {name!r}: the download from {source.origin} has the wrong "
                f"sha256 (expected {source.sha256}, got {digest}); nothing was cached, retry "
                f"the job or put the published file at {path}"
            )
        os.replace(got, path)


def _check_hash(name: str, source: Source, path: Path) -> None:
    if source.sha256 is None:
        return
    digest = _sha256(path)
    if digest != source.sha256:
        raise DatasetUnavailable(
            f"built-in dataset {name!r}: the file at {path} has the wrong sha256 (expected "
            f"{source.sha256}, got {digest}; cut short, or not the published file); it was "
            f"left in place: replace it with {path.name} from {source.origin}, or remove it "
            "and the worker downloads it again"
        )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def _extracted(cache: Path, name: str, source: Source) -> Path:
    """An archive's folder: extracted once into a temporary folder, renamed into place."""
    folder = source.extracted(cache)
    if folder.is_dir():
        return folder
    archive = _checked(name, source, source.path(cache))
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")  # nothing outside tmp, no links out
        tmp.rename(folder)
    except (OSError, tarfile.TarError) as exc:
        if not folder.is_dir():  # else another worker renamed its extraction in first
            raise DatasetUnavailable(
                f"built-in dataset {name!r}: {archive} could not be extracted into "
                f"{folder.parent} ({type(exc).__name__}: {exc}); free space there, or "
                "replace the archive with the published one"
            ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _unavailable(name: str, path: Path, source: Source, exc: Exception) -> DatasetUnavailable:
    reason = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
    digest = f", sha256 {source.sha256}" if source.sha256 else ""
    return DatasetUnavailable(
        f"built-in dataset {name!r} is not cached on the worker and could not be downloaded "
        f"({reason}); provide it instead: put {path.name} (from {source.origin}{digest}) "
        f"at {path}, or upload the arrays with UploadDataset and use the dataset by name"
    )


# -- readers: each returns what keras.datasets.<name>.load_data() returns ---------------


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
    """Shuffled with the seed, the last 20 % for test."""
    with np.load(paths[0], allow_pickle=False) as f:
        x, y = f["x"], f["y"]
    order = np.arange(len(x))
    np.random.RandomState(SEED).shuffle(order)
    cut = int(len(x) * (1 - 0.2))
    return (x[order[:cut]], y[order[:cut]]), (x[order[cut:]], y[order[cut:]])


def _read_cifar10(paths: list[Path]) -> tuple[Split, Split]:
    """Five training batches and a test batch; uint8 images and (n, 1) uint8 labels."""
    folder = paths[0] / "cifar-10-batches-py"
    batches = [_cifar_batch(folder / f"data_batch_{i}", "labels") for i in range(1, 6)]
    x_train = np.concatenate([x for x, _ in batches]).astype(np.uint8)
    y_train = np.concatenate([np.asarray(y) for _, y in batches]).astype(np.uint8)
    x_test, y_test = _cifar_batch(folder / "test_batch", "labels")
    return _cifar(x_train, y_train), _cifar(x_test.astype(np.uint8), np.asarray(y_test, np.uint8))


def _read_cifar100(paths: list[Path]) -> tuple[Split, Split]:
    """The 100 fine labels (Keras's default label_mode), as (n, 1) arrays."""
    folder = paths[0] / "cifar-100-python"
    x_train, y_train = _cifar_batch(folder / "train", "fine_labels")
    x_test, y_test = _cifar_batch(folder / "test", "fine_labels")
    return _cifar(x_train, np.asarray(y_train)), _cifar(x_test, np.asarray(y_test))


def _cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, Any]:
    with path.open("rb") as f:
        batch = {
            k.decode("utf8"): v for k, v in _NumpyUnpickler(f, encoding="bytes").load().items()
        }
    data = batch["data"]
    return data.reshape(data.shape[0], 3, 32, 32), batch[label_key]


def _cifar(x: np.ndarray, y: np.ndarray) -> Split:
    if keras.config.image_data_format() == "channels_last":
        x = x.transpose(0, 2, 3, 1)
    return x, y.reshape(len(y), 1)


def _read_imdb(paths: list[Path]) -> tuple[Split, Split]:
    """Train and test each shuffled (one generator, train first), words re-indexed."""
    arrays = _load_npz(paths[0])
    rng = np.random.RandomState(SEED)
    shuffled = []
    for part in ("train", "test"):
        x, y = arrays[f"x_{part}"], arrays[f"y_{part}"]
        order = np.arange(len(x))
        rng.shuffle(order)
        shuffled.append((x[order], y[order]))
    (x_train, y_train), (x_test, y_test) = shuffled
    words_train, words_test = _index_words([x_train, x_test])
    return (_ragged(words_train), y_train), (_ragged(words_test), y_test)


def _read_reuters(paths: list[Path]) -> tuple[Split, Split]:
    """Shuffled, words re-indexed, the last 20 % for test."""
    arrays = _load_npz(paths[0])
    order = np.arange(len(arrays["x"]))
    np.random.RandomState(SEED).shuffle(order)
    [words] = _index_words([arrays["x"][order]])
    labels = arrays["y"][order]
    cut = int(len(words) * (1 - 0.2))
    return (
        (_ragged(words[:cut]), np.array(labels[:cut])),
        (_ragged(words[cut:]), np.array(labels[cut:])),
    )


def _index_words(parts: Sequence[Any]) -> list[list[list[int]]]:
    """Keras's defaults: each sequence starts with START and every word id moves up by
    INDEX_FROM; ``num_words=None`` makes the vocabulary the highest id over all parts,
    exclusive, so that one id becomes OOV (as in Keras)."""
    shifted = [[[START] + [w + INDEX_FROM for w in x] for x in part] for part in parts]
    top = max(max(x) for part in shifted for x in part)
    return [[[w if 0 <= w < top else OOV for w in x] for x in part] for part in shifted]


def _ragged(sequences: list[list[int]]) -> np.ndarray:
    return np.array(sequences, dtype="object")


# -- pickles: numpy arrays only -----------------------------------------------------------


class _NumpyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and plain containers, refusing every other global, so a
    tampered file cannot run code through ``__reduce__`` (Keras's own loaders unpickle
    these files unrestricted; here the hash check comes first, and this on top)."""

    ALLOWED = frozenset(
        {
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} from a dataset file")


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` whose ragged (object) arrays are pickled."""
    arrays = {}
    with zipfile.ZipFile(path) as archive:
        for member in archive.namelist():
            if member.endswith(".npy"):
                with archive.open(member) as raw:
                    arrays[member.removesuffix(".npy")] = _read_npy(io.BytesIO(raw.read()))
    return arrays


def _read_npy(f: BinaryIO) -> np.ndarray:
    try:
        return np.lib.format.read_array(f, allow_pickle=False)
    except ValueError:  # an object array: a pickle after the header
        f.seek(0)
        major, _ = np.lib.format.read_magic(f)
        if major == 1:
            np.lib.format.read_array_header_1_0(f)
        else:  # 2.0 and 3.0 lay the header out alike
            np.lib.format.read_array_header_2_0(f)
        array: np.ndarray = _NumpyUnpickler(f).load()
        return array


_FASHION = (
    "train-labels-idx1-ubyte.gz",
    "train-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
)
_TORONTO = "https://www.cs.toronto.edu/~kriz/"

BUILTINS: dict[str, Builtin] = {
    "mnist": Builtin(
        (
            Source(
                "mnist.npz",
                ORIGIN + "mnist.npz",
                "731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1",
            ),
        ),
        _read_mnist,
    ),
    "fashion_mnist": Builtin(
        tuple(Source(f, ORIGIN + f, subdir="datasets/fashion-mnist") for f in _FASHION),
        _read_fashion,
    ),
    "cifar10": Builtin(
        (
            Source(
                "cifar-10-batches-py-target",
                _TORONTO + "cifar-10-python.tar.gz",
                "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
                archive=True,
            ),
        ),
        _read_cifar10,
    ),
    "cifar100": Builtin(
        (
            Source(
                "cifar-100-python-target",
                _TORONTO + "cifar-100-python.tar.gz",
                "85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7",
                archive=True,
            ),
        ),
        _read_cifar100,
    ),
    "imdb": Builtin(
        (
            Source(
                "imdb.npz",
                ORIGIN + "imdb.npz",
                "69664113be75683a8fe16e3ed0ab59fda8886cb3cd7ada244f7d9544e4676b9f",
            ),
        ),
        _read_imdb,
    ),
    "reuters": Builtin(
        (
            Source(
                "reuters.npz",
                ORIGIN + "reuters.npz",
                "d6586e694ee56d7a4e65172e12b3e987c03096cb01eab99753921ef915959916",
            ),
        ),
        _read_reuters,
    ),
    "boston_housing": Builtin(
        (
            Source(
                "boston_housing.npz",
                ORIGIN + "boston_housing.npz",
                "f553886a1f8d56431e820c5b82552d9d95cfcb96d1e678153f8839538947dff5",
            ),
        ),
        _read_boston,
    ),
}
"""Every built-in, by the name a request gives (``builtin:<name>[:test]``)."""
