"""Built-in datasets read from the worker's cache exactly as ``keras.datasets`` reads
them, offline, without touching Keras's home; and the offline message.

Each dataset is faked with small files in the real formats. Keras's own loader is the
oracle: it is fed the same files by replacing the ``get_file`` its module calls (a test
seam only; the code under test uses no private Keras name). Guarded (pickle) files are
accepted here by giving the fake's sha256 to the catalogue.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import gzip
import hashlib
import http.server
import importlib
import io
import pickle
import socket
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest

from service.training import builtin_datasets
from service.training.builtin_datasets import BUILTINS, DatasetUnavailable, load_builtin

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


def _fake_boston(path: Path, n: int = 23) -> None:
    rng = np.random.default_rng(3)
    np.savez(path, x=rng.random((n, 13)), y=rng.random(n))


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
    return {
        s.fname: str(s.extracted(cache) if s.archive else s.path(cache))
        for s in BUILTINS[name].sources
    }


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
            kx = keras.utils.pad_sequences(kx, maxlen=builtin_datasets.SEQUENCE_LENGTH)
        np.testing.assert_array_equal(x, kx)
        np.testing.assert_array_equal(y, ky)
        assert (x.dtype, y.dtype, y.shape) == (kx.dtype, ky.dtype, ky.shape)


def test_word_indices_are_shifted_with_a_start_mark_and_the_top_id_out_of_vocabulary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "keras_datasets"
    _provide(cache, "reuters", monkeypatch)
    raw = np.load(BUILTINS["reuters"].sources[0].path(cache), allow_pickle=True)["x"]
    top = max(max(seq) for seq in raw) + builtin_datasets.INDEX_FROM

    x, _ = load_builtin(cache, "reuters", "train")

    assert x.shape[1] == builtin_datasets.SEQUENCE_LENGTH
    first = x[0][x[0] != 0]  # left-padded
    assert first[0] == builtin_datasets.START
    assert top not in x  # the highest id counts as out of vocabulary, as in Keras
    assert builtin_datasets.OOV in x


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


def test_a_pickle_file_whose_hash_differs_is_never_read_nor_deleted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "keras_datasets"
    origin = _unreachable_origin("imdb", monkeypatch)
    path = BUILTINS["imdb"].sources[0].path(cache)
    path.parent.mkdir(parents=True)
    _fake_imdb(path)  # a file of the right shape, but not the published one
    provided = path.read_bytes()

    with pytest.raises(DatasetUnavailable) as info:
        load_builtin(cache, "imdb", "train")

    expected = BUILTINS["imdb"].sources[0].sha256
    assert (
        f"the file at {path} has the wrong sha256 (expected {expected}, got {_sha256(path)};"
    ) in info.value.message
    assert f"replace it with imdb.npz from {origin}, or remove it" in info.value.message
    assert "not cached on the worker" not in info.value.message
    assert path.read_bytes() == provided  # the operator's file stays


def test_a_file_cut_short_is_refused_with_both_hashes_though_it_holds_no_pickles(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A download an older worker was killed in, or a bad copy: never read as data."""
    cache = tmp_path / "keras_datasets"
    _unreachable_origin("boston_housing", monkeypatch)
    path = BUILTINS["boston_housing"].sources[0].path(cache)
    path.parent.mkdir(parents=True)
    _fake_boston(path)
    path.write_bytes(path.read_bytes()[:200])

    with pytest.raises(DatasetUnavailable) as info:
        load_builtin(cache, "boston_housing", "train")

    published = "f553886a1f8d56431e820c5b82552d9d95cfcb96d1e678153f8839538947dff5"
    assert f"has the wrong sha256 (expected {published}, got {_sha256(path)};" in (
        info.value.message
    )
    assert len(path.read_bytes()) == 200


def test_an_archive_is_extracted_once_and_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "keras_datasets"
    archive = BUILTINS["cifar100"].sources[0].path(cache)
    archive.parent.mkdir(parents=True)
    _fake_cifar100(archive)
    _accept_hashes(cache, "cifar100", monkeypatch)
    x, y = load_builtin(cache, "cifar100", "test")
    assert len(list(cache.glob("datasets/*/cifar-100-python"))) == 1
    assert not list(cache.glob("datasets/.*"))  # no temporary folder left

    archive.unlink()  # neither read nor fetched again
    _unreachable_origin("cifar100", monkeypatch)
    again_x, again_y = load_builtin(cache, "cifar100", "test")
    np.testing.assert_array_equal(again_x, x)
    np.testing.assert_array_equal(again_y, y)


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


SERVED_ROWS = 500


@dataclass
class Origin:
    """A local HTTP server that sends ``body`` in two halves, waiting between them until
    ``go_on`` is set."""

    url: str
    body: bytes = b""
    half_sent: threading.Event = field(default_factory=threading.Event)
    go_on: threading.Event = field(default_factory=threading.Event)


@pytest.fixture
def origin() -> Iterator[Origin]:
    served = Origin("")

    class Paused(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(served.body)))
            self.end_headers()
            half = len(served.body) // 2
            self.wfile.write(served.body[:half])
            self.wfile.flush()
            served.half_sent.set()
            served.go_on.wait(timeout=30)
            self.wfile.write(served.body[half:])

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Paused)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    served.url = f"http://127.0.0.1:{server.server_address[1]}/boston_housing.npz"
    try:
        yield served
    finally:
        served.go_on.set()
        server.shutdown()
        server.server_close()


def _serve_boston(
    origin: Origin, tmp_path: Path, sha256: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Serve a fake boston_housing from ``origin``; the catalogue expects ``sha256``
    (None: the fake's)."""
    fake = tmp_path / "served.npz"
    _fake_boston(fake, SERVED_ROWS)  # big enough to be written in several blocks
    origin.body = fake.read_bytes()
    builtin = BUILTINS["boston_housing"]
    [source] = builtin.sources
    served = dataclasses.replace(source, origin=origin.url, sha256=sha256 or _sha256(fake))
    monkeypatch.setitem(BUILTINS, "boston_housing", dataclasses.replace(builtin, sources=(served,)))


def _partial_download(cache: Path, at_least: int) -> Path:
    """The half-written download in its temporary folder, once that much is on disk."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for part in cache.glob("datasets/.boston_housing.npz-*/*"):
            if part.stat().st_size >= at_least:
                return part
        time.sleep(0.01)
    raise AssertionError("the download never reached its temporary folder")


def test_a_download_appears_at_its_path_only_once_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, origin: Origin
) -> None:
    """Another worker sharing the folder never reads a half-written file; a worker killed
    mid-download leaves none at the path."""
    cache = tmp_path / "keras_datasets"
    _serve_boston(origin, tmp_path, None, monkeypatch)
    path = BUILTINS["boston_housing"].sources[0].path(cache)

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        loading = pool.submit(load_builtin, cache, "boston_housing", "train")
        assert origin.half_sent.wait(timeout=30)
        _partial_download(cache, 8192)  # urlretrieve's block
        assert not path.exists()
        origin.go_on.set()
        x, _ = loading.result(timeout=60)

    assert path.read_bytes() == origin.body
    assert len(x) == int(SERVED_ROWS * 0.8)
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_a_download_with_the_wrong_hash_is_not_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, origin: Origin
) -> None:
    cache = tmp_path / "keras_datasets"
    _serve_boston(origin, tmp_path, "0" * 64, monkeypatch)
    origin.go_on.set()

    with pytest.raises(DatasetUnavailable) as info:
        load_builtin(cache, "boston_housing", "train")

    expected = f"the download from {origin.url} has the wrong sha256 (expected {'0' * 64}"
    assert expected in info.value.message
    assert list((cache / "datasets").iterdir()) == []
