"""Limits on job submissions: the size of a request and of its free-form fields, the view
ListJobs answers with, and how long a job may run on a worker."""

from __future__ import annotations

import json
import time

import grpc
import numpy as np
import pytest

import fitserve
from fitserve.v1 import training_pb2, training_pb2_grpc
from service.config import Settings
from tests.conftest import RunningServer
from tests.integration.conftest import MLP_LAYERS

pytestmark = pytest.mark.integration
CAP = 1024 * 1024  # Settings.max_job_request_bytes's default
TINY = [{"type": "Dense", "units": 2, "input_shape": [4], "activation": "softmax"}]


@pytest.fixture(scope="module")
def tiny_data(server: RunningServer) -> str:
    rng = np.random.default_rng(0)
    x = rng.random((64, 4), dtype=np.float32)
    with fitserve.Client(server.target, timeout=60) as client:
        return client.upload_dataset("limits-tiny", x=x, y=(x[:, 0] > 0.5).astype(np.int64)).id


def _train(client: fitserve.Client, name: str, dataset: str, **options: object) -> fitserve.Job:
    return client.train(
        name,
        layers=TINY,
        loss="sparse_categorical_crossentropy",
        dataset=dataset,
        **options,  # type: ignore[arg-type]
    )


# ---- the size of a job request and of its free-form fields -----------------------------


def test_a_200_mb_run_label_is_refused_naming_the_cap_and_nothing_is_stored(
    client: fitserve.Client, tiny_data: str
) -> None:
    huge = {"note": "x" * (2 * CAP)}  # over the cap, far under the 256 MiB message limit

    with pytest.raises(fitserve.InvalidArgumentError) as train:
        _train(client, "limits-huge", tiny_data, labels=huge)
    with pytest.raises(fitserve.InvalidArgumentError) as evaluate:
        client.evaluate("limits-huge", dataset=tiny_data, labels=huge)
    with pytest.raises(fitserve.InvalidArgumentError) as fine_tune:
        client.fine_tune("limits-huge", train_last_n_layers=1, dataset=tiny_data, labels=huge)

    for refused, method in ((train, "Train"), (evaluate, "Evaluate"), (fine_tune, "FineTune")):
        message = refused.value.details
        assert f"the {method} request is " in message
        assert f"over this server's limit of {CAP} bytes" in message
        assert "FITSERVE_MAX_JOB_REQUEST_BYTES" in message
        assert "its largest field is run" in message
    assert list(client.list_jobs(model_name="limits-huge")) == []


@pytest.mark.parametrize(
    ("labels", "field", "limit"),
    [
        ({"note": "x" * 257}, "run.labels.note", "at most 256 characters"),
        ({"n" * 64: "x"}, "run.labels", "at most 63 characters"),
        ({f"k{i}": "x" for i in range(65)}, "run.labels", "at most 64 items"),
    ],
)
def test_a_label_over_its_cap_is_refused_naming_the_field_and_the_limit(
    client: fitserve.Client, tiny_data: str, labels: dict[str, str], field: str, limit: str
) -> None:
    with pytest.raises(fitserve.InvalidArgumentError) as refused:
        _train(client, "limits-labels", tiny_data, labels=labels)

    assert refused.value.details.startswith(f"{field}: ")
    assert limit in refused.value.details
    assert list(client.list_jobs(model_name="limits-labels")) == []


def test_a_long_uri_is_refused_before_it_is_stored(client: fitserve.Client) -> None:
    with pytest.raises(fitserve.InvalidArgumentError, match=r"dataset\.uri: .*at most 4096"):
        _train(client, "limits-uri", "s3://bucket/" + "d" * 5000)


# ---- ListJobs: request bodies only when asked for ----------------------------------------


def test_list_jobs_returns_request_bodies_only_in_the_full_view(
    client: fitserve.Client, server: RunningServer, tiny_data: str
) -> None:
    job = _train(client, "limits-view", tiny_data, labels={"team": "vision"})
    job.wait(timeout=120)

    (basic,) = client.list_jobs(model_name="limits-view")
    (full,) = client.list_jobs(model_name="limits-view", view="full")
    whole = client.job_record(job.id)

    assert basic.request_json == ""
    assert (basic.id, dict(basic.labels), basic.state) == (job.id, {"team": "vision"}, full.state)
    assert json.loads(full.request_json)["model_name"] == "limits-view"
    assert full.request_json == whole.request_json  # GetJob: always the whole job
    with grpc.insecure_channel(server.target) as channel:
        stub = training_pb2_grpc.TrainingServiceStub(channel)
        with pytest.raises(grpc.RpcError) as unknown:
            stub.ListJobs(training_pb2.ListJobsRequest(view=7), timeout=30)  # type: ignore[arg-type]
    assert unknown.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "view 7 is not a JobView" in (unknown.value.details() or "")


# ---- how long a job may run --------------------------------------------------------------


def test_a_job_over_its_time_limit_stops_at_a_batch_and_fails_publishing_nothing(
    client: fitserve.Client, settings: Settings, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = digits
    dataset = client.upload_dataset("limits-forever", x=x[:64], y=y[:64])
    started = time.monotonic()
    job = client.train(
        "limits-forever",
        layers=MLP_LAYERS,
        loss="sparse_categorical_crossentropy",
        dataset=dataset,
        epochs=100_000,
        batch_size=1,
        time_limit_seconds=3,
    )
    with pytest.raises(fitserve.JobFailedError):
        job.wait(timeout=120)
    took = time.monotonic() - started

    record = client.job_record(job.id)
    assert record.error.reason == "TIME_LIMIT"
    assert "time limit of 3 s" in record.error.message
    assert "nothing was published" in record.error.message
    assert 0 < len(record.history) < 100_000  # it trained, and stopped
    assert json.loads(record.request_json)["run"]["time_limit_seconds"] == 3
    assert took < 60  # stopped at a batch end, not after its epochs
    with pytest.raises(fitserve.NotFoundError):
        client.get_model("limits-forever")
    model_dir = settings.models_dir / "limits-forever"
    assert not model_dir.exists() or not any((model_dir / ".staging").glob("*"))


def test_a_job_without_a_time_limit_runs_under_the_server_default(
    client: fitserve.Client, tiny_data: str
) -> None:
    job = _train(client, "limits-default", tiny_data)
    job.wait(timeout=120)

    run = json.loads(client.job_record(job.id).request_json)["run"]
    assert run["time_limit_seconds"] == Settings().job_time_limit.default_seconds


def test_a_time_limit_over_the_server_maximum_is_refused_naming_it(
    client: fitserve.Client, tiny_data: str
) -> None:
    most = Settings().job_time_limit.max_seconds
    assert most is not None

    with pytest.raises(fitserve.InvalidArgumentError) as refused:
        _train(client, "limits-max", tiny_data, time_limit_seconds=most + 1)
    with pytest.raises(fitserve.InvalidArgumentError, match="FITSERVE_JOB_TIME_LIMIT__MAX"):
        client.evaluate("limits-max", dataset=tiny_data, time_limit_seconds=most + 1)

    message = refused.value.details
    assert message.startswith(f"run.time_limit_seconds: {most + 1} is over")
    assert f"maximum of {most} seconds (FITSERVE_JOB_TIME_LIMIT__MAX_SECONDS)" in message


def test_a_fine_tune_over_its_time_limit_fails_without_a_second_phase_or_a_version(
    client: fitserve.Client, tiny_data: str
) -> None:
    _train(client, "limits-base", tiny_data).wait(timeout=120)
    job = client.fine_tune(
        "limits-base",
        model_name="limits-tuned",
        train_last_n_layers=1,
        unfreeze_top_k=1,
        unfreeze_epochs=5,
        loss="sparse_categorical_crossentropy",
        dataset=tiny_data,
        epochs=100_000,
        batch_size=1,
        time_limit_seconds=2,
    )
    with pytest.raises(fitserve.JobFailedError):
        job.wait(timeout=120)

    record = client.job_record(job.id)
    assert record.error.reason == "TIME_LIMIT"
    assert "of 100005" in record.error.message  # stopped in the first phase
    with pytest.raises(fitserve.NotFoundError):
        client.get_model("limits-tuned")
