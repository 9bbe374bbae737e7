"""FineTune end to end: a stored version's model.keras, frozen in part, fitted, published
with its lineage; checked on the weights of the stored versions, layer by layer."""

from __future__ import annotations

import json
from typing import Any

import keras
import numpy as np
import pytest

import fitserve
from fitserve.v1 import dataset_pb2, training_pb2
from service.config import Settings
from tests.conftest import RunningServer

pytestmark = pytest.mark.integration

BASE = "ft-base"
LAYERS = [
    {"type": "Dense", "units": 8, "activation": "relu", "input_shape": [4]},
    {"type": "BatchNormalization"},
    {"type": "Dense", "units": 8, "activation": "relu"},
    {"type": "Dense", "units": 3, "activation": "softmax"},
]
LOSS = "sparse_categorical_crossentropy"


@pytest.fixture(scope="module")
def base(server: RunningServer, worker: object) -> dict[str, dataset_pb2.Dataset]:
    """Version 1 of BASE, and datasets of the old task (3 classes) and a new one (5)."""
    rng = np.random.default_rng(7)
    x = rng.random((96, 4), dtype=np.float32) * 3
    with fitserve.Client(server.target, timeout=120) as c:
        old = c.upload_dataset("ft-old", x=x, y=x[:, :3].argmax(axis=1))
        new = c.upload_dataset("ft-new", x=x, y=np.minimum(x[:, 3] * 5 / 3, 4).astype(np.int64))
        c.train(BASE, layers=LAYERS, loss=LOSS, dataset=old, epochs=1, seed=1).wait(timeout=120)
    return {"old": old, "new": new}


def _model(settings: Settings, name: str, version: int) -> keras.Model:
    return keras.models.load_model(settings.models_dir / name / str(version) / "model.keras")


def _weights(layer: keras.layers.Layer) -> list[np.ndarray]:
    weights: list[np.ndarray] = layer.get_weights()
    return weights


def _same(a: keras.layers.Layer, b: keras.layers.Layer) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(_weights(a), _weights(b), strict=True))


def _body_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The layers of the frozen base inside a model with a new head."""
    body = next(layer for layer in model.layers if isinstance(layer, keras.Model))
    return [layer for layer in body.layers if not isinstance(layer, keras.layers.InputLayer)]


def _fine_tune(client: fitserve.Client, ds: Any, **kwargs: Any) -> training_pb2.Job:
    args: dict[str, Any] = {"loss": LOSS, "dataset": ds, "epochs": 1, "seed": 2} | kwargs
    return client.fine_tune(BASE, version=1, **args).wait(timeout=180)


def test_train_last_n_layers_changes_only_those_and_records_lineage(
    client: fitserve.Client, base: dict[str, dataset_pb2.Dataset], settings: Settings
) -> None:
    job = _fine_tune(client, base["old"], model_name="ft-last", train_last_n_layers=1, epochs=2)

    assert job.kind == training_pb2.JOB_KIND_FINE_TUNE
    assert [e.epoch for e in job.history] == [1, 2]
    before, after = _model(settings, BASE, 1), _model(settings, "ft-last", job.model_version)
    frozen = list(zip(before.layers, after.layers, strict=True))
    assert all(_same(a, b) for a, b in frozen[:3])  # BatchNorm's moving stats included
    assert not _same(*frozen[3])
    version = client.get_model("ft-last").versions[-1]
    assert (version.parent_model, version.parent_version) == (BASE, 1)
    assert version.version == job.model_version


def test_new_head_changes_the_output_and_keeps_the_base_and_its_batchnorm(
    client: fitserve.Client, base: dict[str, dataset_pb2.Dataset], settings: Settings
) -> None:
    head = {"num_classes": 5, "dropout": 0.2}
    job = _fine_tune(client, base["new"], model_name="ft-head", new_head=head, epochs=2)

    before, after = _model(settings, BASE, 1), _model(settings, "ft-head", job.model_version)
    assert tuple(after.outputs[0].shape) == (None, 5)
    probs = after.predict(np.ones((2, 4), np.float32), verbose=0)
    assert probs.shape == (2, 5)
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    kept = list(zip(before.layers[:3], _body_layers(after), strict=True))
    assert isinstance(kept[1][0], keras.layers.BatchNormalization)
    assert all(_same(a, b) for a, b in kept)  # moving mean/variance untouched by 2 epochs
    assert job.model_version == client.get_model("ft-head").versions[-1].version


def test_freeze_layers_by_name_and_index_freezes_exactly_those(
    client: fitserve.Client, base: dict[str, dataset_pb2.Dataset], settings: Settings
) -> None:
    before = _model(settings, BASE, 1)
    first = before.layers[0].name
    submitted = client.fine_tune(
        BASE,
        version=1,
        model_name="ft-chosen",
        freeze_layers=[first, -2],
        loss=LOSS,
        dataset=base["old"],
        epochs=2,
        seed=2,
    )
    job = submitted.wait(timeout=180)

    after = _model(settings, "ft-chosen", job.model_version)
    pairs = list(zip(before.layers, after.layers, strict=True))
    assert _same(*pairs[0])
    assert _same(*pairs[2])
    assert not _same(*pairs[1])
    assert not _same(*pairs[3])
    frozen = [before.layers[0].name, before.layers[2].name]
    said = [e.log.message for e in submitted.events() if e.WhichOneof("payload") == "log"]
    assert f"frozen layers: {', '.join(frozen)}" in said
    meta = json.loads(client.get_model("ft-chosen").versions[-1].metadata_json)
    assert meta["frozen_layers"] == frozen


@pytest.mark.parametrize("drop_last", [0, 1], ids=["keep-all-add-on-top", "replace-the-last"])
def test_a_head_of_several_layers_on_the_frozen_base(
    client: fitserve.Client,
    base: dict[str, dataset_pb2.Dataset],
    settings: Settings,
    drop_last: int,
) -> None:
    head = [
        {"type": "Dense", "units": 6, "activation": "relu"},
        {"type": "Dense", "units": 5, "activation": "softmax"},
    ]
    name = f"ft-layers-{drop_last}"
    job = client.fine_tune(
        BASE,
        version=1,
        model_name=name,
        head_layers=head,
        drop_last=drop_last,
        loss=LOSS,
        dataset=base["new"],
        epochs=3,
        seed=2,
    ).wait(timeout=180)

    before, after = _model(settings, BASE, 1), _model(settings, name, job.model_version)
    kept = _body_layers(after)
    assert len(kept) == len(LAYERS) - drop_last
    assert all(_same(a, b) for a, b in zip(before.layers, kept, strict=False))
    assert tuple(after.outputs[0].shape) == (None, 5)
    losses = [e.logs["loss"] for e in job.history]
    assert losses[-1] < losses[0]  # the head learns


def test_second_phase_unfreezes_the_top_layers_at_a_tenth_of_the_rate(
    client: fitserve.Client, base: dict[str, dataset_pb2.Dataset], settings: Settings
) -> None:
    job = _fine_tune(
        client,
        base["new"],
        model_name="ft-phase2",
        new_head=5,
        optimizer={"name": "adam", "learning_rate": 0.01},
        unfreeze_top_k=1,
        unfreeze_epochs=2,
    )

    assert [e.epoch for e in job.history] == [1, 2, 3]
    rates = [e.logs["learning_rate"] for e in job.history]
    assert rates == pytest.approx([0.01, 0.001, 0.001])
    before, after = _model(settings, BASE, 1), _model(settings, "ft-phase2", job.model_version)
    pairs = list(zip(before.layers[:3], _body_layers(after), strict=True))
    assert _same(*pairs[0])
    assert _same(*pairs[1])  # BatchNorm stays frozen in the second phase too
    assert not _same(*pairs[2])


def test_fine_tune_without_a_name_publishes_a_new_version_of_the_base(
    client: fitserve.Client, base: dict[str, dataset_pb2.Dataset]
) -> None:
    client.set_alias(BASE, "ft-start", 1)
    job = client.fine_tune(
        BASE, alias="ft-start", train_last_n_layers=2, loss=LOSS, dataset=base["old"]
    ).wait(timeout=180)

    version = next(v for v in client.get_model(BASE).versions if v.version == job.model_version)
    assert job.model_version > 1
    assert (version.parent_model, version.parent_version) == (BASE, 1)


def test_fine_tune_bad_requests(
    client: fitserve.Client, base: dict[str, dataset_pb2.Dataset]
) -> None:
    ds = base["old"]
    with pytest.raises(fitserve.NotFoundError, match="model 'no-such-base' not found"):
        client.fine_tune("no-such-base", train_last_n_layers=1, loss=LOSS, dataset=ds)
    with pytest.raises(fitserve.NotFoundError, match="has no version 42"):
        client.fine_tune(BASE, version=42, train_last_n_layers=1, loss=LOSS, dataset=ds)
    with pytest.raises(fitserve.NotFoundError, match="has no alias 'nope'"):
        client.fine_tune(BASE, alias="nope", train_last_n_layers=1, loss=LOSS, dataset=ds)
    with pytest.raises(fitserve.NotFoundError, match="dataset 'ft-missing' not found"):
        client.fine_tune(BASE, train_last_n_layers=1, loss=LOSS, dataset="ft-missing")
    with pytest.raises(fitserve.InvalidArgumentError, match=r"train_last_n_layers .* head_layers"):
        client.fine_tune(BASE, loss=LOSS, dataset=ds)
    with pytest.raises(fitserve.InvalidArgumentError, match=r"indices: 7 is out of range"):
        client.fine_tune(BASE, freeze_layers=[7], loss=LOSS, dataset=ds)
    with pytest.raises(fitserve.InvalidArgumentError, match=r"drop_last is 4, but the base"):
        client.fine_tune(
            BASE, head_layers=[{"type": "Dense", "units": 2}], drop_last=4, loss=LOSS, dataset=ds
        )
    head = [{"type": "Dense", "units": 2, "input_shape": [4]}]
    with pytest.raises(fitserve.InvalidArgumentError, match=r"layers\[0\] has input_shape"):
        client.fine_tune(BASE, head_layers=head, loss=LOSS, dataset=ds)
    with pytest.raises(
        fitserve.InvalidArgumentError, match=r"'Lambda'|Lambda layers are not allowed"
    ):
        client.fine_tune(BASE, head_layers=[{"type": "Lambda"}], loss=LOSS, dataset=ds)
    with pytest.raises(fitserve.JobFailedError, match=r"class 4 cannot occur: .* 2 units"):
        client.fine_tune(BASE, new_head=2, class_weight={4: 1.0}, loss=LOSS, dataset=ds).wait(
            timeout=120
        )
    with pytest.raises(fitserve.JobFailedError, match=r"has no layer 'nope'"):
        client.fine_tune(BASE, freeze_layers=["nope"], loss=LOSS, dataset=ds).wait(timeout=120)
    for classes, message in ((0, "num_classes: is required"), (-3, "greater than or equal to 1")):
        with pytest.raises(fitserve.InvalidArgumentError, match=message):
            client.fine_tune(BASE, new_head=classes, loss=LOSS, dataset=ds)
    with pytest.raises(fitserve.InvalidArgumentError, match="is 9, but the base model has only 4"):
        client.fine_tune(BASE, train_last_n_layers=9, loss=LOSS, dataset=ds)
    with pytest.raises(fitserve.InvalidArgumentError, match=r"unfreeze_top_k is 4, but .* only 3"):
        client.fine_tune(
            BASE, new_head=2, unfreeze_top_k=4, unfreeze_epochs=1, loss=LOSS, dataset=ds
        )
