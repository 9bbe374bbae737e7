"""Built-in datasets read from the worker's cache exactly as ``keras.datasets`` reads
them, offline, without touching Keras's home; and the offline message.

Each dataset is faked with small files in the real formats. Keras's own loader is the
oracle: it is fed the same files by replacing the ``get_file`` its module calls (a test
seam only; the code under test uses no private Keras name). Guarded (pickle) files are
accepted here by giving the fake's sha256 to the catalogue.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import importlib
import io
import pickle
import socket
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest

from service.domain import keras_datasets
from service.domain.keras_datasets import BUILTINS, DatasetUnavailable, load_builtin

Fake = Callable[[Path], None]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _ragged(rng: np.random.Generator, n: int) -> np.ndarray:
    """Word-id sequences of different lengths, as imdb/reuters store them."""
    out = np.empty(n, dtype=object)
    for i in range(n):
        out[i] = [int(w) for w in rng.integers(1, 50, size=3 + i % 7)]
    return out


def _fake_imdb(path: Path) -> None:
    rng = np.random.default_rng(1)
    np.savez(
        path,
        x_train=_ragged(rng, 30),
        y_train=rng.integers(0, 2, 30),
        x_test=_ragged(rng, 20),
        y_test=rng.integers(0, 2, 20),
    )


def _fake_reuters(path: Path) -> None:
    rng = np.random.default_rng(2)
    np.savez(path, x=_ragged(rng, 41), y=rng.integers(0, 46, 41))


def _fake_boston(path: Path) -> None:
    rng = np.random.default_rng(3)
    np.savez(path, x=rng.random((23, 13)), y=rng.random(23))


def _cifar_pickle(n: int, labels: dict[str, list[int]], start: int) -> bytes:
    """A batch as CIFAR's python pickles hold it: bytes keys, rows of 3x32x32 uint8."""
    data = ((np.arange(n * 3072) * 7 + start) % 256).astype(np.uint8).reshape(n, 3072)
    batch = {b"data": data} | {k.encode(): v for k, v in labels.items()}
    return pickle.dumps(batch, protocol=3)  # arrays via _reconstruct, data as bytes: as theirs


def _tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))


def _fake_cifar10(path: Path) -> None:
    n = 10000  # Keras's loader fills fixed 10000-image batches
    members = {
        f"cifar-10-batches-py/data_batch_{i}": _cifar_pickle(
            n, {"labels": [(j + i) % 10 for j in range(n)]}, i
        )
        for i in range(1, 6)
    }
    labels = {"labels": [j % 10 for j in range(n)]}
    members["cifar-10-batches-py/test_batch"] = _cifar_pickle(n, labels, 9)
    _tar(path, members)


def _fake_cifar100(path: Path) -> None:
    def part(n: int, start: int) -> bytes:
        fine = [(j * 3 + start) % 100 for j in range(n)]
        return _cifar_pickle(
            n, {"fine_labels": fine, "coarse_labels": [f % 20 for f in fine]}, start
        )

    _tar(path, {"cifar-100-python/train": part(12, 0), "cifar-100-python/test": part(5, 1)})


def _fake_fashion(folder: Path) -> None:
    rng = np.random.default_rng(4)
    for split, n in (("train", 9), ("t10k", 4)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 256, (n, 28, 28)).astype(np.uint8)
        (folder / f"{split}-labels-idx1-ubyte.gz").write_bytes(
            gzip.compress(bytes(8) + labels.tobytes())
        )
        (folder / f"{split}-images-idx3-ubyte.gz").write_bytes(
            gzip.compress(bytes(16) + images.tobytes())
        )


FAKES: dict[str, Fake] = {
    "imdb": _fake_imdb,
    "reuters": _fake_reuters,
    "boston_housing": _fake_boston,
    "cifar10": _fake_cifar10,
    "cifar100": _fake_cifar100,
}


def _provide(cache: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Put fakes of ``name``'s files in the cache (accepting their hashes); what Keras's
    ``get_file`` would answer for each file name once they are there."""
    sources = BUILTINS[name].sources
    sources[0].path(cache).parent.mkdir(parents=True, exist_ok=True)
    if name == "fashion_mnist":
        _fake_fashion(cache / sources[0].subdir)
    else:
        FAKES[name](sources[0].path(cache))
    _accept_hashes(cache, name, monkeypatch)
    return {s.fname: str(cache / s.subdir / s.fname) for s in sources}


def _accept_hashes(cache: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the catalogue expect the sha256 of the files now in the cache."""
    builtin = BUILTINS[name]
    sources = tuple(dataclasses.replace(s, sha256=_sha256(s.path(cache))) for s in builtin.sources)
    monkeypatch.setitem(BUILTINS, name, dataclasses.replace(builtin, sources=sources))


def _keras_load(name: str, answers: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Any:
    module = importlib.import_module(f"keras.src.datasets.{name}")
    monkeypatch.setattr(module, "get_file", lambda fname, **_: answers[fname])
    return module.load_data()


@pytest.mark.parametrize(
    "name", ["imdb", "reuters", "boston_housing", "fashion_mnist", "cifar100", "cifar10"]
)
def test_each_builtin_reads_like_keras_datasets(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "keras_datasets"
    answers = _provide(cache, name, monkeypatch)

    ours = [load_builtin(cache, name, split) for split in ("train", "test")]
    theirs = _keras_load(name, answers, monkeypatch)

    for (x, y), (kx, ky) in zip(ours, theirs, strict=True):
        if name in ("imdb", "reuters"):
            kx = keras.utils.pad_sequences(kx, maxlen=keras_datasets.SEQUENCE_LENGTH)
        np.testing.assert_array_equal(x, kx)
        np.testing.assert_array_equal(y, ky)
        assert (x.dtype, y.dtype, y.shape) == (kx.dtype, ky.dtype, ky.shape)


def test_word_indices_are_shifted_with_a_start_mark_and_the_top_id_out_of_vocabulary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "keras_datasets"
    _provide(cache, "reuters", monkeypatch)
    raw = np.load(BUILTINS["reuters"].sources[0].path(cache), allow_pickle=True)["x"]
    top = max(max(seq) for seq in raw) + keras_datasets.INDEX_FROM

    x, _ = load_builtin(cache, "reuters", "train")

    assert x.shape[1] == keras_datasets.SEQUENCE_LENGTH
    first = x[0][x[0] != 0]  # left-padded
    assert first[0] == keras_datasets.START
    assert top not in x  # the highest id counts as out of vocabulary, as in Keras
    assert keras_datasets.OOV in x


def _unreachable_origin(name: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Point ``name``'s download at a closed local port: offline, whatever the network."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    builtin = BUILTINS[name]
    [source] = builtin.sources
    origin = f"http://127.0.0.1:{port}/{source.origin.rsplit('/', 1)[1]}"
    sources = (dataclasses.replace(source, origin=origin),)
    monkeypatch.setitem(BUILTINS, name, dataclasses.replace(builtin, sources=sources))
    return origin


def test_offline_names_the_archive_to_put_at_the_cache_path_with_its_hash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "keras_datasets"
    origin = _unreachable_origin("cifar10", monkeypatch)

    with pytest.raises(DatasetUnavailable) as info:
        load_builtin(cache, "cifar10", "train")

    target = cache / "datasets" / "cifar-10-batches-py-target_archive"
    sha = "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"
    assert info.value.reason == "DATASET_UNAVAILABLE"
    assert f"put {target.name} (from {origin}, sha256 {sha}) at {target}," in info.value.message
    assert "could not be downloaded (URL fetch failure" in info.value.message


def test_a_pickle_file_whose_hash_differs_is_never_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "keras_datasets"
    origin = _unreachable_origin("imdb", monkeypatch)
    path = BUILTINS["imdb"].sources[0].path(cache)
    path.parent.mkdir(parents=True)
    _fake_imdb(path)  # a file of the right shape, but not the published one

    with pytest.raises(DatasetUnavailable, match=f"put imdb.npz \\(from {origin}, sha256 "):
        load_builtin(cache, "imdb", "train")


class Gadget:
    """Stands for any object a tampered pickle could construct."""


def test_a_pickle_file_holding_anything_but_arrays_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "keras_datasets"
    _provide(cache, "imdb", monkeypatch)
    path = BUILTINS["imdb"].sources[0].path(cache)
    evil = np.empty(2, dtype=object)
    evil[0], evil[1] = Gadget(), [1, 2]
    np.savez(path, x_train=evil, y_train=np.zeros(2), x_test=evil, y_test=np.zeros(2))
    _accept_hashes(cache, "imdb", monkeypatch)

    with pytest.raises(pickle.UnpicklingError, match=r"refusing to unpickle .*Gadget"):
        load_builtin(cache, "imdb", "train")
