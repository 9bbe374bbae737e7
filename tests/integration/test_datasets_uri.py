"""Datasets by uri (tf.data.Dataset.save folders, TFRecord files) and built-in Keras
datasets, end to end: the same data gives the same results as an upload."""

from __future__ import annotations

import gzip
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tensorflow as tf

import fitserve
from fitserve.v1 import training_pb2
from service.config import Settings
from tests.conftest import RunningServer
from tests.integration.conftest import MLP_LAYERS

pytestmark = pytest.mark.integration

LAYERS = [
    {"type": "Dense", "units": 8, "activation": "relu", "input_shape": [4]},
    {"type": "Dense", "units": 3, "activation": "softmax"},
]
LOSS = "sparse_categorical_crossentropy"
RNG = np.random.default_rng(11)
X = RNG.random((64, 4), dtype=np.float32)
Y = X[:, :3].argmax(axis=1).astype(np.int64)


@pytest.fixture(scope="module")
def external(settings: Settings, server: RunningServer, worker: object) -> Path:
    """The default dataset root, holding the same 64 examples in three forms."""
    root = settings.data_dir / "external"
    tf.data.Dataset.from_tensor_slices((X, Y)).save(str(root / "tuples"))
    tf.data.Dataset.from_tensor_slices({"features": X, "label": Y}).save(str(root / "dicts"))
    tf.data.Dataset.from_tensor_slices((X, Y)).batch(16).save(str(root / "batched"))
    (root / "records").mkdir(parents=True)
    with tf.io.TFRecordWriter(str(root / "records" / "part-0.tfrecord")) as writer:
        for x, y in zip(X, Y, strict=True):
            feature = {
                "x": tf.train.Feature(float_list=tf.train.FloatList(value=x)),
                "y": tf.train.Feature(int64_list=tf.train.Int64List(value=[y])),
            }
            writer.write(
                tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()
            )
    return root


def _train(client: fitserve.Client, name: str, dataset: Any, **kwargs: Any) -> training_pb2.Job:
    args: dict[str, Any] = {"layers": LAYERS, "loss": LOSS, "dataset": dataset, "seed": 4}
    args |= {"epochs": 2, "batch_size": 16, "shuffle": False} | kwargs
    return client.train(name, **args).wait(timeout=180)


def _losses(job: training_pb2.Job, key: str = "loss") -> list[float]:
    return [e.logs[key] for e in job.history]


def test_saved_tf_data_trains_like_the_same_arrays_uploaded(
    client: fitserve.Client, external: Path
) -> None:
    uploaded = client.upload_dataset("uri-same", x=X, y=Y)
    dicts = training_pb2.DatasetRef(uri=str(external / "dicts"), input_keys=["features"])
    dicts.target_keys.append("label")
    by_upload = _train(client, "uri-npz", uploaded, validation_data=uploaded)
    by_uri = _train(client, "uri-saved", str(external / "tuples"), validation_data=dicts)

    assert _losses(by_uri) == pytest.approx(_losses(by_upload), rel=1e-5)
    assert _losses(by_uri, "val_loss") == pytest.approx(_losses(by_upload, "val_loss"), rel=1e-5)
    version = client.get_model("uri-saved").versions[-1]
    assert version.dataset == str(external / "tuples")


def test_a_folder_saved_already_batched_is_used_as_saved(
    client: fitserve.Client, external: Path
) -> None:
    uploaded = client.upload_dataset("uri-same", x=X, y=Y)
    by_upload = _train(client, "uri-unbatched", uploaded)
    submitted = client.train(
        "uri-batched",
        layers=LAYERS,
        loss=LOSS,
        dataset=str(external / "batched"),
        seed=4,
        epochs=2,
        batch_size=999,  # does not apply: the folder holds batches of 16
        shuffle=False,
    )
    by_batches = submitted.wait(timeout=180)

    assert _losses(by_batches) == pytest.approx(_losses(by_upload), rel=1e-5)
    logs = [e.log.message for e in submitted.events() if e.WhichOneof("payload") == "log"]
    assert any("saved already batched" in m and "batch_size does not apply" in m for m in logs)
    evaluated = client.evaluate(
        "uri-batched", dataset=str(external / "batched"), batch_size=999
    ).wait(timeout=180)
    assert evaluated.metrics["loss"] > 0


def test_tfrecords_train_and_evaluate_like_the_same_arrays(
    client: fitserve.Client, external: Path
) -> None:
    records = training_pb2.DatasetRef(uri=f"file://{external / 'records'}")
    records.feature_spec.update({"x": "float32:4", "y": "int64:"})
    job = _train(client, "uri-records", records)
    by_upload = _train(client, "uri-records-npz", client.upload_dataset("uri-rec", x=X, y=Y))
    # Equal but for float summation order (TFRecord floats are the same float32 values).
    assert _losses(job) == pytest.approx(_losses(by_upload), rel=1e-4)

    on_records = client.evaluate("uri-records", dataset=records).wait(timeout=120)
    on_arrays = client.evaluate("uri-records", dataset="uri-rec").wait(timeout=120)
    assert on_records.metrics["loss"] == pytest.approx(on_arrays.metrics["loss"], rel=1e-5)


def test_bad_uris_answer_before_a_job_exists(
    client: fitserve.Client, external: Path, tmp_path: Path
) -> None:
    cases: list[tuple[Any, type[Exception], str]] = [
        (str(tmp_path), fitserve.InvalidArgumentError, "outside the dataset_roots setting"),
        (f"{external}/../../x", fitserve.InvalidArgumentError, "outside the dataset_roots"),
        ("s3://bucket/data", fitserve.FailedPreconditionError, r"\(or pip install s3fs\)"),
        ("https://host/data", fitserve.InvalidArgumentError, "FITSERVE_DATASET_URL_SCHEMES"),
        (str(external / "missing"), fitserve.NotFoundError, "does not exist"),
        (str(external / "records"), fitserve.InvalidArgumentError, "feature_spec is required"),
    ]
    for uri, error, message in cases:
        with pytest.raises(error, match=message):
            client.train("uri-bad", layers=LAYERS, loss=LOSS, dataset=uri)
    with pytest.raises(fitserve.InvalidArgumentError, match=r"give fit\.validation_data instead"):
        _train(client, "uri-bad", str(external / "tuples"), validation_split=0.2)


def test_feature_spec_that_does_not_match_the_records_fails_the_job(
    client: fitserve.Client, external: Path
) -> None:
    records = training_pb2.DatasetRef(uri=str(external / "records"))
    records.feature_spec.update({"x": "float32:5", "y": "int64:"})
    with pytest.raises(fitserve.JobFailedError) as exc:
        _train(client, "uri-wrong-spec", records)
    assert "could not be read with its feature_spec" in str(exc.value)


def test_unknown_builtin_lists_the_valid_names(client: fitserve.Client) -> None:
    with pytest.raises(fitserve.InvalidArgumentError, match="valid: mnist, fashion_mnist, cifar10"):
        client.train("builtin-bad", layers=LAYERS, loss=LOSS, dataset="builtin:svhn")


def test_builtin_mnist_offline_then_a_file_that_is_not_the_published_one_is_refused(
    client: fitserve.Client, settings: Settings
) -> None:
    cache = settings.data_dir / "keras_datasets" / "datasets" / "mnist.npz"
    shown = "<data folder>/keras_datasets/datasets/mnist.npz"  # no server paths to clients
    args: dict[str, Any] = {"layers": MLP_LAYERS, "loss": LOSS, "epochs": 1, "seed": 0}
    if not _online():
        with pytest.raises(fitserve.JobFailedError) as exc:
            client.train("builtin-mnist", dataset="builtin:mnist", **args).wait(timeout=120)
        assert exc.value.job.error.reason == "DATASET_UNAVAILABLE"
        assert "put mnist.npz (from https://storage.googleapis.com/" in str(exc.value)
        assert f"at {shown}" in str(exc.value)

    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **_fake_digits(rng=np.random.default_rng(3)))
    with pytest.raises(fitserve.JobFailedError) as exc:
        client.train("builtin-mnist", dataset="builtin:mnist", **args).wait(timeout=120)
    assert exc.value.job.error.reason == "DATASET_UNAVAILABLE"
    assert f"the file at {shown} has the wrong sha256 (expected 731c5ac6" in str(exc.value)
    assert cache.is_file()  # the operator's file is left alone


def test_builtin_fashion_mnist_provided_at_the_cache_path(
    client: fitserve.Client, settings: Settings
) -> None:
    """fashion_mnist has no published hash: any files with its arrays are used."""
    folder = settings.data_dir / "keras_datasets" / "datasets" / "fashion-mnist"
    folder.mkdir(parents=True, exist_ok=True)
    fake = _fake_digits(rng=np.random.default_rng(4))
    for split, keras_split in (("train", "train"), ("test", "t10k")):
        labels, images = fake[f"y_{split}"], fake[f"x_{split}"]
        (folder / f"{keras_split}-labels-idx1-ubyte.gz").write_bytes(
            gzip.compress(bytes(8) + labels.tobytes())
        )
        (folder / f"{keras_split}-images-idx3-ubyte.gz").write_bytes(
            gzip.compress(bytes(16) + images.tobytes())
        )
    args: dict[str, Any] = {"layers": MLP_LAYERS, "loss": LOSS, "epochs": 1, "seed": 0}
    train = client.train("builtin-fashion", dataset="builtin:fashion_mnist", **args)
    assert train.wait(timeout=120).state == training_pb2.JOB_STATE_SUCCEEDED

    test_split = "builtin:fashion_mnist:test"
    on_test = client.evaluate("builtin-fashion", dataset=test_split).wait(timeout=120)
    same = client.upload_dataset("fashion-fake-test", x=fake["x_test"], y=fake["y_test"])
    on_upload = client.evaluate("builtin-fashion", dataset=same).wait(timeout=120)
    assert on_test.metrics["loss"] == pytest.approx(on_upload.metrics["loss"], rel=1e-6)


def _fake_digits(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """28x28 uint8 images with labels 0-9, as mnist and fashion_mnist hold them."""
    return {
        f"{a}_{s}": rng.integers(0, 10, (n, 28, 28) if a == "x" else n).astype(np.uint8)
        for s, n in (("train", 32), ("test", 8))
        for a in ("x", "y")
    }


def _online() -> bool:
    """Whether the Keras dataset host resolves (the offline path is checked only offline)."""
    try:
        socket.getaddrinfo("storage.googleapis.com", 443)
    except OSError:
        return False
    return True
