"""Datasets by fsspec URL, end to end: TFRecord files and a tf.data.Dataset.save folder
served over http on loopback train like the same files read locally; refused and
unreadable URLs say why; "cache when it fits" spares later epochs the reads.

A stack of its own (Redis, server, worker) that allows http:// (off by default) and s3://,
and a real HTTP server (python's http.server, whose directory listings fsspec's
HTTPFileSystem reads) serving the stack's dataset root.
"""

from __future__ import annotations

import functools
import http.server
import importlib.util
import re
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tensorflow as tf

import fitserve
from fitserve.v1 import training_pb2
from service.config import Settings
from tests.conftest import private_stack, refused_port, start_worker, stop_process

pytestmark = pytest.mark.integration

LAYERS = [
    {"type": "Dense", "units": 8, "activation": "relu", "input_shape": [4]},
    {"type": "Dense", "units": 3, "activation": "softmax"},
]
LOSS = "sparse_categorical_crossentropy"
SPEC = {"x": "float32:4", "y": "int64:"}
RNG = np.random.default_rng(5)
X = RNG.random((96, 4), dtype=np.float32)
Y = X[:, :3].argmax(axis=1).astype(np.int64)
SCHEMES = '["http", "s3"]'


class Served:
    """What the HTTP server was asked for: GETs per TFRecord file, and how many more of
    them it answers (then 404, as if the files were deleted)."""

    def __init__(self) -> None:
        self.gets: Counter[str] = Counter()
        self.limit: dict[str, int] | None = None
        self.lock = threading.Lock()

    def reset(self, limit: dict[str, int] | None = None) -> None:
        with self.lock:
            self.gets.clear()
            self.limit = limit

    def allow(self, path: str) -> bool:
        if not path.endswith(".tfrecord"):
            return True
        with self.lock:
            self.gets[path] += 1
            return self.limit is None or self.gets[path] <= self.limit.get(path, 0)


class Handler(http.server.SimpleHTTPRequestHandler):
    served: Served

    def do_GET(self) -> None:
        if self.served.allow(self.path):
            super().do_GET()
        else:
            self.send_error(404, "gone")

    def log_message(self, format: str, *args: Any) -> None:
        pass


@dataclass
class Stack:
    settings: Settings
    target: str
    root: Path  # the dataset root, served at base
    base: str
    served: Served


def _write_records(folder: Path, parts: int) -> None:
    folder.mkdir(parents=True)
    for part, rows in enumerate(np.array_split(np.arange(len(X)), parts)):
        with tf.io.TFRecordWriter(str(folder / f"part-{part}.tfrecord")) as writer:
            for i in rows:
                feature = {
                    "x": tf.train.Feature(float_list=tf.train.FloatList(value=X[i])),
                    "y": tf.train.Feature(int64_list=tf.train.Int64List(value=[Y[i]])),
                }
                example = tf.train.Example(features=tf.train.Features(feature=feature))
                writer.write(example.SerializeToString())


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("url")
    with private_stack(tmp, dataset_url_schemes=["http", "s3"]) as (settings, running):
        root = settings.data_dir / "external"
        _write_records(root / "records", parts=2)
        tf.data.Dataset.from_tensor_slices({"x": X, "y": Y}).save(str(root / "saved"))
        whole = (root / "records" / "part-0.tfrecord").read_bytes()
        for name, cut in (("corrupt-head", 30), ("corrupt-middle", len(whole) // 2 + 5)):
            (root / name).mkdir()
            (root / name / "part-0.tfrecord").write_bytes(whole[:cut])

        served = Served()
        handler = type("Bound", (Handler,), {"served": served})
        httpd = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(handler, directory=str(root))
        )
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        worker = start_worker(settings, tmp / "worker.log", FITSERVE_DATASET_URL_SCHEMES=SCHEMES)
        try:
            base = f"http://127.0.0.1:{httpd.server_address[1]}"
            yield Stack(settings, running.target, root, base, served)
        finally:
            stop_process(worker)
            httpd.shutdown()
            httpd.server_close()


@pytest.fixture
def client(stack: Stack) -> Iterator[fitserve.Client]:
    stack.served.reset()
    with fitserve.Client(stack.target, timeout=120) as c:
        yield c


def _ref(uri: str, spec: dict[str, str] | None = None) -> training_pb2.DatasetRef:
    ref = training_pb2.DatasetRef(uri=uri)
    ref.feature_spec.update(spec or {})
    return ref


def _train(client: fitserve.Client, name: str, dataset: Any, **kwargs: Any) -> training_pb2.Job:
    args: dict[str, Any] = {"layers": LAYERS, "loss": LOSS, "dataset": dataset, "seed": 7}
    args |= {"epochs": 3, "batch_size": 16, "shuffle": True, "metrics": ["accuracy"]} | kwargs
    return client.train(name, **args).wait(timeout=180)


def _history(job: training_pb2.Job) -> list[float]:
    """Every logged value of every epoch, in a fixed order."""
    return [e.logs[key] for e in job.history for key in sorted(e.logs)]


def test_tfrecord_folder_over_http_trains_like_the_same_local_files(
    client: fitserve.Client, stack: Stack
) -> None:
    by_url = _train(client, "url-records", _ref(f"{stack.base}/records", SPEC))
    by_path = _train(client, "path-records", _ref(str(stack.root / "records"), SPEC))

    assert by_url.state == training_pb2.JOB_STATE_SUCCEEDED
    assert len(by_url.history) == 3
    assert _history(by_url) == pytest.approx(_history(by_path), rel=1e-6)
    assert dict(by_url.metrics) == pytest.approx(dict(by_path.metrics), rel=1e-6)
    assert set(stack.served.gets) == {"/records/part-0.tfrecord", "/records/part-1.tfrecord"}

    one_file = _ref(f"{stack.base}/records/part-1.tfrecord", SPEC)
    evaluated = client.evaluate("url-records", dataset=one_file).wait(timeout=120)
    local = client.evaluate(
        "url-records", dataset=_ref(str(stack.root / "records/part-1.tfrecord"), SPEC)
    )
    assert evaluated.metrics["loss"] == pytest.approx(
        local.wait(timeout=120).metrics["loss"], rel=1e-6
    )


def test_saved_folder_over_http_is_copied_once_and_trains_like_the_local_folder(
    client: fitserve.Client, stack: Stack
) -> None:
    url = f"{stack.base}/saved"
    ref = training_pb2.DatasetRef(uri=url, input_keys=["x"], target_keys=["y"])
    by_url = _train(client, "url-saved", ref, validation_data=ref)
    local = training_pb2.DatasetRef(uri=str(stack.root / "saved"), input_keys=["x"])
    local.target_keys.append("y")
    by_path = _train(client, "path-saved", local, validation_data=local)

    assert _history(by_url) == pytest.approx(_history(by_path), rel=1e-6)
    assert "val_loss" in by_url.history[-1].logs
    cache = stack.settings.data_dir / "dataset_cache"
    [of_url] = cache.iterdir()
    [copy] = of_url.iterdir()  # training and validation data share one copy
    assert (copy / "dataset_spec.pb").read_bytes() == (
        stack.root / "saved/dataset_spec.pb"
    ).read_bytes()
    assert client.get_model("url-saved").versions[-1].dataset == url


def test_a_missing_url_fails_the_job_naming_it(client: fitserve.Client, stack: Stack) -> None:
    for uri in (f"{stack.base}/nowhere", f"{stack.base}/nowhere/part-0.tfrecord"):
        with pytest.raises(fitserve.JobFailedError) as exc:
            _train(client, "url-missing", _ref(uri, SPEC))
        assert exc.value.reason == "NOTFOUND"
        assert f"dataset.uri {uri!r} does not exist" in str(exc.value)


def test_an_unreachable_host_fails_the_job_naming_the_url(client: fitserve.Client) -> None:
    with refused_port() as port:
        uri = f"http://127.0.0.1:{port}/records"  # nothing listens there
        with pytest.raises(fitserve.JobFailedError) as exc:
            _train(client, "url-unreachable", _ref(uri, SPEC))
    assert exc.value.reason == "UNAVAILABLE"
    assert f"dataset.uri {uri!r} could not be read from its storage" in str(exc.value)
    assert "check that the workers can reach it" in str(exc.value)


@pytest.mark.parametrize(
    ("folder", "at"),
    [
        ("corrupt-head", "0: the file ends inside a record of"),
        ("corrupt-middle", "1368: the file ends"),
    ],
)
def test_a_corrupt_tfrecord_file_fails_the_job_naming_the_file(
    client: fitserve.Client, stack: Stack, folder: str, at: str
) -> None:
    """Found by the first batch read before fit, or during fit: the same error either way."""
    with pytest.raises(fitserve.JobFailedError) as exc:
        _train(client, "url-corrupt", _ref(f"{stack.base}/{folder}", SPEC))
    assert exc.value.reason == "INVALIDREQUEST"
    assert str(exc.value).startswith(
        f"dataset.uri '{stack.base}/{folder}' could not be read: TFRecord file "
        f"'{stack.base}/{folder}/part-0.tfrecord' is corrupt at byte {at}"
    )
    assert "Traceback" not in str(exc.value)


def test_a_scheme_outside_the_allowlist_is_refused_at_train(client: fitserve.Client) -> None:
    with pytest.raises(fitserve.InvalidArgumentError) as exc:
        client.train("url-ftp", layers=LAYERS, loss=LOSS, dataset=_ref("ftp://host/data", SPEC))
    assert "ftp:// URLs are not allowed here (allowed: http://, s3://)" in str(exc.value)
    assert "FITSERVE_DATASET_URL_SCHEMES" in str(exc.value)


@pytest.mark.skipif(importlib.util.find_spec("s3fs") is not None, reason="s3fs is installed")
def test_an_allowed_scheme_without_its_package_is_a_failed_precondition(
    client: fitserve.Client,
) -> None:
    with pytest.raises(fitserve.FailedPreconditionError) as exc:
        client.train("url-s3", layers=LAYERS, loss=LOSS, dataset=_ref("s3://bucket/data", SPEC))
    assert "pip install 'fitserve-server[s3]' (or pip install s3fs)" in str(exc.value)


def _reads_limited_to_one_epoch(client: fitserve.Client, stack: Stack) -> training_pb2.DatasetRef:
    """Count the GETs a one-epoch job makes of the files, then let the server answer only
    that many more: a later job's epochs after the first find the files gone (404)."""
    records = _ref(f"{stack.base}/records", SPEC)
    stack.served.reset()
    assert (
        _train(client, "url-one-epoch", records, epochs=1).state == training_pb2.JOB_STATE_SUCCEEDED
    )
    one_epoch = dict(stack.served.gets)
    assert set(one_epoch) == {"/records/part-0.tfrecord", "/records/part-1.tfrecord"}
    stack.served.reset(limit=one_epoch)
    return records


def test_cache_when_it_fits_spares_later_epochs_the_reads(
    client: fitserve.Client, stack: Stack, tmp_path: Path
) -> None:
    records = _reads_limited_to_one_epoch(client, stack)  # cached: the 1 GiB default
    limit = stack.served.limit
    job = _train(client, "url-cached", records, epochs=3)
    assert job.state == training_pb2.JOB_STATE_SUCCEEDED
    assert len(job.history) == 3
    assert dict(stack.served.gets) == limit  # read as in a one-epoch job: epochs 2, 3 read nothing

    with private_stack(tmp_path, dataset_url_schemes=["http"]) as (settings, running):
        env = {"FITSERVE_DATASET_URL_SCHEMES": SCHEMES, "FITSERVE_DATASET_CACHE_BYTES": "0"}
        worker = start_worker(settings, tmp_path / "worker.log", **env)
        try:
            with fitserve.Client(running.target, timeout=120) as uncached:
                records = _reads_limited_to_one_epoch(uncached, stack)
                with pytest.raises(fitserve.JobFailedError) as exc:
                    _train(uncached, "url-uncached", records, epochs=3)
        finally:
            stop_process(worker)
            stack.served.reset()
    assert len(exc.value.job.history) == 1  # epoch 2 read the files again and found them gone
    assert exc.value.reason == "NOTFOUND"
    assert re.fullmatch(
        rf"dataset.uri '{stack.base}/records' could not be read: "
        rf"file '{stack.base}/records/part-\d\.tfrecord' does not exist",
        str(exc.value),
    )
