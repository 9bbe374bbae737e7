"""The README's example, end to end: upload, train on a real worker, predict."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import fitserve
from fitserve.v1 import training_pb2
from service.config import Settings
from tests.integration.conftest import MLP_LAYERS

pytestmark = pytest.mark.integration


def test_upload_train_predict(
    client: fitserve.Client, digits: tuple[np.ndarray, np.ndarray], settings: Settings
) -> None:
    x, y = digits
    ds = client.upload_dataset("digits-train", x=x, y=y)
    assert ds.id.startswith("sha256:")
    assert ds.num_examples == len(x)

    job = client.train(
        "digits-mlp",
        layers=MLP_LAYERS,
        optimizer="adam",
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        dataset=ds,
        epochs=8,
        batch_size=32,
        seed=0,
    )
    result = job.wait(timeout=240)

    assert result.state == training_pb2.JOB_STATE_SUCCEEDED
    assert result.model_version >= 1
    assert [e.epoch for e in result.history] == list(range(1, 9))
    assert result.metrics["accuracy"] > 0.8, result.metrics
    version_dir = settings.models_dir / "digits-mlp" / str(result.model_version)
    assert (version_dir / "saved_model.pb").exists()
    assert (version_dir / "model.keras").exists()

    probs = client.predict("digits-mlp", x[:64])
    assert probs.shape == (64, 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    assert (probs.argmax(axis=1) == y[:64]).mean() > 0.8

    # The stored version is a plain SavedModel: TF Serving's layout, loadable without fitserve.
    loaded = tf.saved_model.load(str(version_dir))
    direct = loaded.signatures["serving_default"](x=tf.constant(x[:64]))["output_0"].numpy()
    np.testing.assert_allclose(direct, probs, rtol=1e-5, atol=1e-6)
    # ... and as a Keras layer, the way Keras 3 reloads an exported SavedModel.
    layer = keras.layers.TFSMLayer(str(version_dir), call_endpoint="serving_default")
    via_keras = layer(tf.constant(x[:64]))["output_0"].numpy()
    np.testing.assert_allclose(via_keras, probs, rtol=1e-5, atol=1e-6)


def test_job_events_stream_in_order(
    client: fitserve.Client, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = digits
    ds = client.upload_dataset("digits-small", x=x[:64], y=y[:64])
    job = client.train(
        "digits-events",
        layers=MLP_LAYERS,
        loss="sparse_categorical_crossentropy",
        dataset=ds,
        epochs=3,
        batch_size=32,
        seed=1,
    )
    kinds = [e.WhichOneof("payload") for e in job.events()]
    states = [e.state_changed.state for e in job.events() if e.HasField("state_changed")]
    assert kinds.count("epoch_ended") == 3
    assert states == [
        training_pb2.JOB_STATE_QUEUED,
        training_pb2.JOB_STATE_RUNNING,
        training_pb2.JOB_STATE_SUCCEEDED,
    ]
    # Resuming after the second event replays only what came after it.
    events = list(job.events())
    resumed = list(job.events(after_event_id=events[1].event_id))
    assert [e.event_id for e in resumed] == [e.event_id for e in events[2:]]
    # Resuming after the last event of a finished job ends the stream with nothing new.
    assert list(job.events(after_event_id=events[-1].event_id)) == []
    assert job.wait(timeout=10).state == training_pb2.JOB_STATE_SUCCEEDED


def test_listing_and_aliases(
    client: fitserve.Client, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = digits
    ds = client.upload_dataset("digits-tiny", x=x[:32], y=y[:32])
    for _ in range(2):
        client.train(
            "digits-alias",
            layers=MLP_LAYERS,
            loss="sparse_categorical_crossentropy",
            dataset=ds,
            epochs=1,
            seed=2,
        ).wait(timeout=120)
    model = client.get_model("digits-alias")
    assert [v.version for v in model.versions] == [2, 1]
    assert model.versions[0].signature.inputs[0].name == "x"
    assert list(model.versions[0].signature.outputs[0].shape) == [-1, 10]

    client.set_alias("digits-alias", "stable", 1)
    assert client.predict_full("digits-alias", x[:2]).version == 1  # stable wins over latest
    assert client.predict_full("digits-alias", x[:2], version=2).version == 2
    with pytest.raises(fitserve.FailedPreconditionError, match="aliased as stable"):
        client.delete_version("digits-alias", 1)
    client.delete_alias("digits-alias", "stable")
    client.delete_version("digits-alias", 1)
    assert [v.version for v in client.get_model("digits-alias").versions] == [2]

    names = [m.name for m in client.list_models()]
    assert "digits-alias" in names
    jobs = list(client.list_jobs(model_name="digits-alias"))
    assert len(jobs) == 2
    assert all(j.state == training_pb2.JOB_STATE_SUCCEEDED for j in jobs)
    assert next(d.name for d in client.list_datasets()) == "digits-tiny"  # newest first


def test_cancel_a_queued_job_never_runs(
    client: fitserve.Client, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = digits
    ds = client.upload_dataset("digits-cancel", x=x[:32], y=y[:32])
    # The worker runs one job at a time: the second job waits behind the first.
    first = client.train(
        "digits-c1",
        layers=MLP_LAYERS,
        loss="sparse_categorical_crossentropy",
        dataset=ds,
        epochs=100_000,
        seed=3,
    )
    second = client.train(
        "digits-c2",
        layers=MLP_LAYERS,
        loss="sparse_categorical_crossentropy",
        dataset=ds,
        epochs=1,
        seed=3,
    )
    cancelled = second.cancel()
    assert cancelled.state == training_pb2.JOB_STATE_CANCELLED
    with pytest.raises(fitserve.JobCancelledError):
        second.wait(timeout=60)
    for event in first.events():  # cancel once it is really running
        if event.HasField("epoch_ended"):
            break
    assert first.cancel().state == training_pb2.JOB_STATE_CANCELLING
    with pytest.raises(fitserve.JobCancelledError):
        first.wait(timeout=120)
    assert second.refresh().attempt == 0  # it never started
    assert first.refresh().model_version == 0  # a cancelled job publishes nothing
    with pytest.raises(fitserve.NotFoundError):
        client.get_model("digits-c2")
    with pytest.raises(fitserve.FailedPreconditionError, match="CANCELLED"):
        second.cancel()


def test_a_retried_train_with_the_same_key_is_one_job(
    client: fitserve.Client, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = digits
    ds = client.upload_dataset("digits-retry", x=x[:32], y=y[:32])
    args = {
        "layers": MLP_LAYERS,
        "loss": "sparse_categorical_crossentropy",
        "dataset": ds,
        "seed": 4,
        "idempotency_key": "retry-1",
    }
    first = client.train("digits-retry", **args)  # type: ignore[arg-type]
    second = client.train("digits-retry", **args)  # type: ignore[arg-type]
    assert second.id == first.id
    assert first.wait(timeout=120).model_version == 1
    assert [v.version for v in client.get_model("digits-retry").versions] == [1]
    assert len(list(client.list_jobs(model_name="digits-retry"))) == 1


def test_a_queued_job_knows_its_place_in_the_queue(
    client: fitserve.Client, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = digits
    ds = client.upload_dataset("digits-queue", x=x[:32], y=y[:32])
    args = {"layers": MLP_LAYERS, "loss": "sparse_categorical_crossentropy", "dataset": ds}
    running = client.train("digits-q0", epochs=100_000, **args)  # type: ignore[arg-type]
    try:
        for event in running.events():  # the worker holds it: nothing else runs meanwhile
            if event.HasField("epoch_ended"):
                break
        waiting = [client.train(f"digits-q{i}", **args) for i in (1, 2)]  # type: ignore[arg-type]
        assert [job.refresh().queue_position for job in waiting] == [0, 1]
        assert running.refresh().queue_position == -1  # running, not waiting
        for job in waiting:
            job.cancel()
    finally:
        running.cancel()
    with pytest.raises(fitserve.JobCancelledError):
        running.wait(timeout=120)
