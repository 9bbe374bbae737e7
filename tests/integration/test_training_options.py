"""Each fit option and callback of Train has an observable effect, checked on tiny data
against values computed independently: weights, losses, optimizer steps, files."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
import tensorflow as tf

import fitserve
from fitserve.v1 import dataset_pb2, training_pb2
from service.config import Settings
from tests.conftest import RunningServer

pytestmark = pytest.mark.integration

LAYERS = [
    {"type": "Dense", "units": 8, "activation": "relu", "input_shape": [4]},
    {"type": "Dropout", "rate": 0.3},
    {"type": "Dense", "units": 3, "activation": "softmax"},
]
LOSS = "sparse_categorical_crossentropy"
FROZEN = {"name": "sgd", "learning_rate": 0.0}  # weights stay the initial ones


@pytest.fixture(scope="module")
def blobs(server: RunningServer, worker: object) -> tuple[dataset_pb2.Dataset, np.ndarray]:
    """128 examples of 4 features; the class is the largest of the first three."""
    rng = np.random.default_rng(5)
    x = rng.random((128, 4), dtype=np.float32)
    y = x[:, :3].argmax(axis=1)
    weights = rng.random(128).astype(np.float32) * 2
    with fitserve.Client(server.target, timeout=120) as c:
        return c.upload_dataset("options-blobs", x=x, y=y, w=weights), x


def _train(client: fitserve.Client, name: str, ds: Any, **kwargs: Any) -> training_pb2.Job:
    args: dict[str, Any] = {"layers": LAYERS, "loss": LOSS, "dataset": ds, "seed": 3} | kwargs
    return client.train(name, **args).wait(timeout=180)


def _model(settings: Settings, name: str, version: int) -> keras.Model:
    return keras.models.load_model(settings.models_dir / name / str(version) / "model.keras")


def _weights(path: Path) -> list[np.ndarray]:
    weights: list[np.ndarray] = keras.models.load_model(path).get_weights()
    return weights


def _same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_same_seed_same_weights_bit_for_bit(
    client: fitserve.Client, blobs: tuple[dataset_pb2.Dataset, np.ndarray], settings: Settings
) -> None:
    ds, _ = blobs
    options = {"epochs": 3, "batch_size": 16, "shuffle": True}  # shuffling and dropout: RNG
    first = _train(client, "seeded-a", ds, **options)
    second = _train(client, "seeded-b", ds, **options)
    other = _train(client, "seeded-c", ds, **options | {"seed": 4})

    a = _model(settings, "seeded-a", first.model_version).get_weights()
    assert _same(a, _model(settings, "seeded-b", second.model_version).get_weights())
    assert not _same(a, _model(settings, "seeded-c", other.model_version).get_weights())
    assert [e.logs["loss"] for e in first.history] == [e.logs["loss"] for e in second.history]


def test_early_stopping_stops_after_patience_and_restores_the_best_epoch(
    client: fitserve.Client, blobs: tuple[dataset_pb2.Dataset, np.ndarray], settings: Settings
) -> None:
    ds, _ = blobs
    # With min_delta this large no epoch after the first counts as an improvement, so
    # the best epoch is 1 and patience 2 stops training at the end of epoch 3.
    stop = {"monitor": "loss", "min_delta": 1e9, "patience": 2, "restore_best_weights": True}
    job = _train(
        client,
        "early-stop",
        ds,
        epochs=50,
        callbacks={"early_stopping": stop, "model_checkpoint": {"monitor": "loss"}},
    )

    assert [e.epoch for e in job.history] == [1, 2, 3]
    checkpoints = settings.jobs_dir / job.id / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        "epoch-0001.keras",
        "epoch-0002.keras",
        "epoch-0003.keras",
    ]
    published = _model(settings, "early-stop", job.model_version).get_weights()
    assert _same(published, _weights(checkpoints / "epoch-0001.keras"))
    assert not _same(published, _weights(checkpoints / "epoch-0003.keras"))
    # The version's metrics are those of the weights published: epoch 1's, not epoch 3's.
    assert dict(job.metrics) == pytest.approx(dict(job.history[0].logs))
    assert job.metrics["loss"] != pytest.approx(job.history[2].logs["loss"])
    version = client.get_model("early-stop").versions[-1]
    assert dict(version.metrics) == pytest.approx(dict(job.history[0].logs))
    assert json.loads(version.metadata_json)["metrics_epoch"] == 1


def test_validation_split_reports_val_metrics_of_the_held_out_tail(
    client: fitserve.Client, blobs: tuple[dataset_pb2.Dataset, np.ndarray]
) -> None:
    ds, x = blobs
    job = _train(client, "val-split", ds, epochs=2, validation_split=0.25, metrics=["accuracy"])

    assert all({"val_loss", "val_accuracy"} <= set(e.logs) for e in job.history)
    # Keras holds out the last 25 % (32 rows): evaluating the final model there agrees.
    tail = client.upload_dataset("val-split-tail", x=x[96:], y=x[96:, :3].argmax(axis=1))
    evaluated = client.evaluate("val-split", dataset=tail).wait(timeout=120)
    assert evaluated.metrics["loss"] == pytest.approx(job.history[-1].logs["val_loss"], rel=1e-5)


@pytest.mark.parametrize("weighting", ["class_weight", "sample_weight_key"])
def test_weights_scale_each_example_of_the_loss(
    client: fitserve.Client,
    blobs: tuple[dataset_pb2.Dataset, np.ndarray],
    settings: Settings,
    weighting: str,
) -> None:
    ds, x = blobs
    y = x[:, :3].argmax(axis=1)
    class_weight = {0: 0.0, 1: 1.0, 2: 3.0}
    if weighting == "class_weight":
        kwargs: dict[str, Any] = {"class_weight": class_weight}
        weights = np.array([class_weight[int(c)] for c in y])
    else:
        kwargs = {"sample_weight_key": "w"}
        weights = np.load(_blob(settings, ds))["w"]
    name = f"weighted-{weighting.replace('_', '-')}"
    # One batch of all rows, learning rate 0, no dropout: the epoch's loss is the weighted
    # loss of the initial weights, which the published model still has.
    job = _train(
        client,
        name,
        ds,
        layers=[LAYERS[0], LAYERS[2]],
        optimizer=FROZEN,
        batch_size=128,
        shuffle=False,
        **kwargs,
    )

    probs = _model(settings, name, job.model_version).predict(x, verbose=0)
    per_example = -np.log(probs[np.arange(len(y)), y])
    expected = float((weights * per_example).sum() / len(y))
    assert job.metrics["loss"] == pytest.approx(expected, rel=1e-5)
    assert job.metrics["loss"] != pytest.approx(float(per_example.mean()), rel=1e-2)


def test_an_array_named_sample_weight_weights_samples_and_other_arrays_are_reported(
    client: fitserve.Client, blobs: tuple[dataset_pb2.Dataset, np.ndarray], settings: Settings
) -> None:
    ds, x = blobs
    y = x[:, :3].argmax(axis=1)
    weights = np.load(_blob(settings, ds))["w"]
    weighted = client.upload_dataset("options-weighted", x=x, y=y, sample_weight=weights)
    options: dict[str, Any] = {
        "layers": [LAYERS[0], LAYERS[2]],
        "optimizer": FROZEN,
        "batch_size": 128,
        "shuffle": False,
    }
    by_name = client.train(
        "weights-by-name", **{"loss": LOSS, "dataset": weighted, "seed": 3} | options
    )
    by_key = _train(client, "weights-by-key", ds, sample_weight_key="w", **options)
    unused = client.train("weights-unused", **{"loss": LOSS, "dataset": ds, "seed": 3} | options)

    assert by_name.wait(timeout=180).metrics["loss"] == pytest.approx(
        by_key.metrics["loss"], rel=1e-6
    )
    said = [e.log.message for e in by_name.events() if e.WhichOneof("payload") == "log"]
    assert any("array 'sample_weight' weights each sample" in m for m in said)
    unused.wait(timeout=180)
    warned = [e.log for e in unused.events() if e.WhichOneof("payload") == "log"]
    assert any(w.level == "WARNING" and "array 'w' is not used" in w.message for w in warned)


def test_initial_epoch_and_steps_per_epoch_set_the_steps_run(
    client: fitserve.Client, blobs: tuple[dataset_pb2.Dataset, np.ndarray], settings: Settings
) -> None:
    ds, _ = blobs
    job = _train(client, "steps", ds, epochs=4, initial_epoch=1, steps_per_epoch=3, batch_size=8)

    assert [e.epoch for e in job.history] == [2, 3, 4]
    optimizer = _model(settings, "steps", job.model_version).optimizer
    assert int(optimizer.iterations) == 3 * 3  # 3 epochs of 3 batches, not 16 per epoch


def test_reduce_lr_on_plateau_halves_the_rate_each_flat_epoch(
    client: fitserve.Client, blobs: tuple[dataset_pb2.Dataset, np.ndarray]
) -> None:
    ds, _ = blobs
    plateau = {"monitor": "loss", "min_delta": 1e9, "patience": 1, "factor": 0.5}
    job = _train(
        client,
        "plateau",
        ds,
        epochs=4,
        optimizer={"name": "adam", "learning_rate": 0.01},
        callbacks={"reduce_lr_on_plateau": plateau},
    )

    rates = [e.logs["learning_rate"] for e in job.history]
    assert rates == pytest.approx([0.01, 0.01, 0.005, 0.0025])


def _plain_keras_rates(x: np.ndarray, plateau: dict[str, Any], epochs: int) -> list[float]:
    """The learning rate of each epoch of the same fit in plain Keras, in this process."""
    keras.utils.set_random_seed(3)
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(3)]
    )
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=1e-5),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    rates: list[float] = []
    record = keras.callbacks.LambdaCallback(
        on_epoch_begin=lambda *_: rates.append(float(model.optimizer.learning_rate))
    )
    reduce = keras.callbacks.ReduceLROnPlateau(monitor="loss", factor=0.5, **plateau)
    y = x[:, :3].argmax(axis=1)
    model.fit(x, y, batch_size=len(x), epochs=epochs, callbacks=[record, reduce], verbose=0)
    return rates


@pytest.mark.parametrize(
    "plateau",
    [{"patience": 0}, {"patience": 0, "min_delta": 0.0}],
    ids=["patience-0", "patience-0-min-delta-0"],
)
def test_reduce_lr_on_plateau_zero_values_mean_what_they_mean_in_keras(
    client: fitserve.Client, blobs: tuple[dataset_pb2.Dataset, np.ndarray], plateau: dict[str, Any]
) -> None:
    """A learning rate so small that each epoch improves the loss by less than the
    default min_delta (1e-4) but more than 0: patience 0 reduces after every epoch, and
    patience 0 with min_delta 0 never does. The unset defaults (10, 1e-4) would do
    neither in 4 epochs."""
    ds, x = blobs
    job = _train(
        client,
        "plateau-zero",
        ds,
        layers=[LAYERS[0], {"type": "Dense", "units": 3}],
        loss={"name": "sparse_categorical_crossentropy", "from_logits": True},
        optimizer={"name": "sgd", "learning_rate": 1e-5},
        batch_size=128,
        epochs=4,
        callbacks={"reduce_lr_on_plateau": {"monitor": "loss", "factor": 0.5, **plateau}},
    )

    rates = [e.logs["learning_rate"] for e in job.history]
    assert rates == pytest.approx(_plain_keras_rates(x, plateau, 4), rel=1e-6)
    expected = [1e-5] * 4 if "min_delta" in plateau else [1e-5, 1e-5, 5e-6, 2.5e-6]
    assert rates == pytest.approx(expected, rel=1e-6)


def test_checkpoints_of_weights_only_every_few_batches(
    client: fitserve.Client, blobs: tuple[dataset_pb2.Dataset, np.ndarray], settings: Settings
) -> None:
    ds, _ = blobs
    checkpoint = {"monitor": "loss", "save_weights_only": True, "save_freq_batches": 4}
    job = _train(
        client,
        "weights-ckpt",
        ds,
        epochs=2,
        batch_size=16,
        callbacks={"model_checkpoint": checkpoint},
    )

    files = sorted((settings.jobs_dir / job.id / "checkpoints").iterdir())
    assert len(files) == 4  # 8 batches an epoch, every 4th, 2 epochs
    assert all(f.name.endswith(".weights.h5") for f in files)
    model = _model(settings, "weights-ckpt", job.model_version)
    model.load_weights(files[-1])  # the last checkpoint is the published weights
    assert _same(
        model.get_weights(), _model(settings, "weights-ckpt", job.model_version).get_weights()
    )


def test_csv_history_is_kept_with_the_job(
    client: fitserve.Client, blobs: tuple[dataset_pb2.Dataset, np.ndarray], settings: Settings
) -> None:
    ds, _ = blobs
    job = _train(client, "csv-log", ds, epochs=3, callbacks={"csv_logger": True})

    with (settings.jobs_dir / job.id / "history.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    losses = [float(r["loss"]) for r in rows]
    assert losses == pytest.approx([e.logs["loss"] for e in job.history], rel=1e-6)


def test_tensorboard_logs_are_kept_with_the_job(
    client: fitserve.Client, blobs: tuple[dataset_pb2.Dataset, np.ndarray], settings: Settings
) -> None:
    ds, _ = blobs
    job = _train(client, "tb-log", ds, epochs=3, callbacks={"tensorboard": True})
    folder = settings.jobs_dir / job.id / "tensorboard" / "train"
    assert _tensorboard_steps(folder, "epoch_loss") == [0, 1, 2]


def _tensorboard_steps(folder: Path, tag: str) -> list[int]:
    steps = []
    for path in sorted(folder.glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            steps += [event.step for v in event.summary.value if v.tag == tag]
    return steps


def _blob(settings: Settings, ds: dataset_pb2.Dataset) -> Path:
    return settings.datasets_dir / "blobs" / f"{ds.id.removeprefix('sha256:')}.npz"
