"""Evaluate end to end: a stored version on a dataset -> job metrics, the version's
evaluations, and the Prometheus gauge; bad references answer the right status."""

from __future__ import annotations

import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

import fitserve
from fitserve.v1 import training_pb2
from tests.conftest import RunningServer
from tests.integration.conftest import MLP_LAYERS

pytestmark = pytest.mark.integration
MODEL = "eval-digits"


@pytest.fixture(scope="module")
def trained(server: RunningServer, worker: object, digits: tuple[np.ndarray, np.ndarray]) -> str:
    """Version 1 of MODEL, trained with a validation dataset that is evaluated later."""
    x, y = digits
    with fitserve.Client(server.target, timeout=120) as c:
        train = c.upload_dataset("eval-train", x=x[:256], y=y[:256])
        c.upload_dataset("eval-holdout", x=x[256:384], y=y[256:384])
        job = c.train(
            MODEL,
            layers=MLP_LAYERS,
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
            dataset=train,
            validation_data="eval-holdout",
            epochs=2,
            seed=0,
        )
        job.wait(timeout=120)
        return job.id


def test_evaluate_records_metrics_on_the_version(client: fitserve.Client, trained: str) -> None:
    train_job = client.get_job(trained).info
    result = client.evaluate(MODEL, dataset="eval-holdout", version=1).wait(timeout=120)

    assert result.kind == training_pb2.JOB_KIND_EVALUATE
    assert result.queue == "cpu"
    assert result.model_version == 1
    assert set(result.metrics) == {"loss", "accuracy"}
    # The final weights on the validation data: what fit reported as val_ for its last epoch.
    last = train_job.history[-1].logs
    assert result.metrics["loss"] == pytest.approx(last["val_loss"], rel=1e-5)
    assert result.metrics["accuracy"] == pytest.approx(last["val_accuracy"])
    version = client.get_model(MODEL).versions[0]
    entry = next(e for e in version.evaluations if e.job_id == result.id)
    assert entry.dataset == "eval-holdout"
    assert dict(entry.metrics) == dict(result.metrics)


def test_evaluate_by_alias_and_gauge_per_dataset(
    client: fitserve.Client, trained: str, server: RunningServer
) -> None:
    client.set_alias(MODEL, "canary", 1)
    by_alias = client.evaluate(MODEL, dataset="eval-train", alias="canary").wait(timeout=120)
    holdout = client.evaluate(MODEL, dataset="eval-holdout").wait(timeout=120)
    assert by_alias.model_version == holdout.model_version == 1

    gauge = _scrape(server.metrics_port, "fitserve_model_evaluation_metric")
    for dataset, job in (("eval-train", by_alias), ("eval-holdout", holdout)):
        for metric in ("loss", "accuracy"):
            key = (MODEL, "1", dataset, metric)
            assert gauge[key] == pytest.approx(job.metrics[metric]), key


def test_evaluate_unknown_references(client: fitserve.Client, trained: str) -> None:
    cases = [
        ({"model_name": "never-trained"}, "model 'never-trained' not found"),
        ({"model_name": MODEL, "version": 9}, "has no version 9"),
        ({"model_name": MODEL, "alias": "nope"}, "has no alias 'nope'"),
    ]
    for kwargs, message in cases:
        with pytest.raises(fitserve.NotFoundError, match=message):
            client.evaluate(dataset="eval-holdout", **kwargs)  # type: ignore[arg-type]
    with pytest.raises(fitserve.NotFoundError, match="dataset 'no-such-data' not found"):
        client.evaluate(MODEL, dataset="no-such-data")
    with pytest.raises(fitserve.InvalidArgumentError, match="not a valid model name"):
        client.evaluate("Bad Name", dataset="eval-holdout")
    with pytest.raises(fitserve.InvalidArgumentError, match="version"):
        client.evaluate(MODEL, dataset="eval-holdout", version=-2)


def test_evaluate_on_data_of_the_wrong_shape_fails_the_job(
    client: fitserve.Client, trained: str
) -> None:
    ds = client.upload_dataset("eval-wrong", x=np.zeros((8, 27, 28), np.float32), y=np.zeros(8))
    job = client.evaluate(MODEL, dataset=ds)
    with pytest.raises(fitserve.JobFailedError) as exc:
        job.wait(timeout=120)
    assert exc.value.job.error.reason == "INVALID_INPUTS"
    assert "has shape [8, 27, 28]; the model's input 'x' expects [-1, 28, 28]" in str(exc.value)


def _scrape(port: int, name: str) -> dict[tuple[str, ...], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (s.labels["model"], s.labels["version"], s.labels["dataset"], s.labels["metric"]): s.value
        for family in text_string_to_metric_families(text)
        if family.name == name
        for s in family.samples
    }
