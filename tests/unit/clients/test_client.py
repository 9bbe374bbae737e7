"""fitserve.Client against fake servicers on a real gRPC server over loopback."""

import hashlib
import inspect
import io
import itertools
import json
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import numpy as np
import pytest
from google.protobuf import json_format

import fitserve
from fitserve import _job, _options, cli
from fitserve.v1 import (
    dataset_pb2,
    dataset_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
    model_pb2,
    model_pb2_grpc,
    training_pb2,
    training_pb2_grpc,
)
from service.api.status import to_status
from service.errors import ResourceExhausted
from service.inference.batcher import QueueFull

JobState = training_pb2.JobState
MNIST_LAYERS = [
    {"type": "Flatten", "input_shape": [28, 28]},
    {"type": "Dense", "units": 128, "activation": "relu"},
    {"type": "Dropout", "rate": 0.2},
    {"type": "Dense", "units": 10, "activation": "softmax"},
]


# -- fake servicers --------------------------------------------------------------------


def _block_until_cancelled(context: grpc.ServicerContext) -> None:
    done = threading.Event()
    context.add_callback(done.set)
    done.wait(10)


class FakeDatasets(dataset_pb2_grpc.DatasetServiceServicer):
    def __init__(self) -> None:
        self.headers: list[dataset_pb2.DatasetHeader] = []
        self.chunks: list[bytes] = []
        self.requests: list[object] = []

    def UploadDataset(self, request_iterator, context):
        for request in request_iterator:
            if request.HasField("header"):
                self.headers.append(request.header)
            else:
                self.chunks.append(request.chunk)
        content = b"".join(self.chunks)
        return dataset_pb2.Dataset(
            id="sha256:" + hashlib.sha256(content).hexdigest(),
            name=self.headers[0].name,
            format="npz",
            size_bytes=len(content),
        )

    def GetDataset(self, request, context):
        self.requests.append(request)
        if request.dataset != "mnist-train":
            context.abort(grpc.StatusCode.NOT_FOUND, f"dataset {request.dataset!r} not found")
        return dataset_pb2.Dataset(id="sha256:ab", name="mnist-train")

    def ListDatasets(self, request, context):
        self.requests.append(request)
        pages = {"": (["a", "b"], "p2"), "p2": (["c"], "")}
        names, token = pages[request.page_token]
        return dataset_pb2.ListDatasetsResponse(
            datasets=[dataset_pb2.Dataset(name=name) for name in names], next_page_token=token
        )

    def DeleteDataset(self, request, context):
        self.requests.append(request)
        return dataset_pb2.DeleteDatasetResponse()


class FakeTraining(training_pb2_grpc.TrainingServiceServicer):
    """Jobs and event logs set by each test; WatchJob honours after_event_id."""

    def __init__(self) -> None:
        self.requests: list[object] = []
        self.watch_requests: list[training_pb2.WatchJobRequest] = []
        self.jobs: dict[str, training_pb2.Job] = {}
        self.events: list[training_pb2.JobEvent] = []
        self.drop_after: set[str] = set()
        self.always_unavailable = False
        self.hang_at_end = False
        self.visible_per_call: list[int] = []
        self.metadata: list[tuple[tuple[str, str], ...]] = []
        self.time_remaining: list[float] = []
        # (code, trailing metadata) that the next WatchJob and GetJob calls fail with
        self.watch_failures: list[tuple[grpc.StatusCode, tuple[tuple[str, str], ...]]] = []
        self.get_failures: list[grpc.StatusCode] = []

    def Train(self, request, context):
        self.requests.append(request)
        self.metadata.append(tuple(context.invocation_metadata()))
        self.time_remaining.append(context.time_remaining())
        job = training_pb2.Job(id="job-1", state=JobState.JOB_STATE_QUEUED, model_name="m")
        return training_pb2.TrainResponse(job=job)

    def FineTune(self, request, context):
        self.requests.append(request)
        return training_pb2.FineTuneResponse(job=training_pb2.Job(id="job-2"))

    def GetJob(self, request, context):
        if self.get_failures:
            context.abort(self.get_failures.pop(0), "server restarting")
        if request.job_id not in self.jobs:
            context.abort(grpc.StatusCode.NOT_FOUND, f"job {request.job_id!r} not found")
        return self.jobs[request.job_id]

    def ListJobs(self, request, context):
        self.requests.append(request)
        pages = {"": (["j3", "j2"], "next"), "next": (["j1"], "")}
        ids, token = pages[request.page_token]
        return training_pb2.ListJobsResponse(
            jobs=[training_pb2.Job(id=i) for i in ids], next_page_token=token
        )

    def WatchJob(self, request, context):
        self.watch_requests.append(request)
        if self.always_unavailable:
            context.abort(grpc.StatusCode.UNAVAILABLE, "redis is down")
        if self.watch_failures:
            code, trailing = self.watch_failures.pop(0)
            context.set_trailing_metadata(trailing)
            context.abort(code, f"failing with {code.name}")
        published = self._published(len(self.watch_requests) - 1)
        after = int(request.after_event_id or 0)
        for event in published:
            if int(event.event_id) <= after:
                continue
            yield event
            if event.event_id in self.drop_after:
                self.drop_after.discard(event.event_id)
                context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset")
        if self.hang_at_end or len(published) < len(self.events):
            _block_until_cancelled(context)  # the job runs on, quietly

    def _published(self, call_index: int) -> list[training_pb2.JobEvent]:
        """The events the job has published by the time of this call."""
        if not self.visible_per_call:
            return self.events
        return self.events[: self.visible_per_call[min(call_index, len(self.visible_per_call) - 1)]]

    def CancelJob(self, request, context):
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, "job job-1 has already SUCCEEDED")

    def ListPlugins(self, request, context):
        self.requests.append(request)
        if request.kind not in ("", "loss"):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"kind {request.kind!r} is unknown")
        huber = training_pb2.Plugin(
            name="examples>huber",
            kind="loss",
            form="function",
            signature="(y_true, y_pred, delta=1.0)",
            distribution="fitserve-examples",
            version="0.1.0",
        )
        return training_pb2.ListPluginsResponse(
            plugins=[huber],
            failures=[training_pb2.PluginFailure(source="bad_pkg", error="ImportError: x")],
        )


class FakeModels(model_pb2_grpc.ModelServiceServicer):
    def __init__(self) -> None:
        self.requests: list[object] = []

    def GetModel(self, request, context):
        context.abort(grpc.StatusCode.NOT_FOUND, f"model {request.name!r} does not exist")

    def ListModels(self, request, context):
        self.requests.append(request)
        return model_pb2.ListModelsResponse(
            models=[model_pb2.ModelSummary(name="mnist", latest_version=3, aliases={"stable": 2})]
        )

    def SetAlias(self, request, context):
        self.requests.append(request)
        return model_pb2.SetAliasResponse(
            model_name=request.model_name,
            alias=request.alias,
            version=request.version,
            previous_version=1,
        )

    def DeleteVersion(self, request, context):
        self.requests.append(request)
        return model_pb2.DeleteVersionResponse()


class FakeInference(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self) -> None:
        self.requests: list[object] = []
        self.times: list[float] = []
        self.refusals = 0  # how many Predicts to model "busy" are refused first
        self.outputs: dict[str, np.ndarray] = {}

    def Predict(self, request, context):
        self.requests.append(request)
        self.times.append(time.monotonic())
        if request.model.name == "slow":
            _block_until_cancelled(context)
        if request.model.name == "too-big":
            context.abort_with_status(to_status(ResourceExhausted("request over the limit")))
        if request.model.name == "busy" and len(self.requests) <= self.refusals:
            # what fitserve's server sends for a full queue: RetryInfo and gRPC pushback
            context.abort_with_status(to_status(QueueFull("queue is full", 0.2)))
        return inference_pb2.PredictResponse(
            model_name=request.model.name,
            version=4,
            outputs={name: fitserve.to_tensor(value) for name, value in self.outputs.items()},
            request_id="req-1",
        )

    def Feedback(self, request, context):
        self.requests.append(request)
        labels = fitserve.to_numpy(request.labels)
        return inference_pb2.FeedbackResponse(version=4, rows=len(labels), correct=1)


@dataclass
class Fakes:
    target: str
    datasets: FakeDatasets = field(default_factory=FakeDatasets)
    training: FakeTraining = field(default_factory=FakeTraining)
    models: FakeModels = field(default_factory=FakeModels)
    inference: FakeInference = field(default_factory=FakeInference)


@pytest.fixture
def fakes() -> Iterator[Fakes]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    port = server.add_insecure_port("127.0.0.1:0")
    fakes = Fakes(target=f"127.0.0.1:{port}")
    dataset_pb2_grpc.add_DatasetServiceServicer_to_server(fakes.datasets, server)
    training_pb2_grpc.add_TrainingServiceServicer_to_server(fakes.training, server)
    model_pb2_grpc.add_ModelServiceServicer_to_server(fakes.models, server)
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(fakes.inference, server)
    server.start()
    yield fakes
    server.stop(grace=None).wait()


@pytest.fixture
def client(fakes: Fakes) -> Iterator[fitserve.Client]:
    with fitserve.Client(fakes.target, timeout=10) as client:
        yield client


def state_event(event_id: int, state: int, **fields: object) -> training_pb2.JobEvent:
    return training_pb2.JobEvent(
        event_id=str(event_id),
        job_id="job-1",
        state_changed=training_pb2.StateChanged(state=state, **fields),
    )


def epoch_event(event_id: int, epoch: int, loss: float) -> training_pb2.JobEvent:
    return training_pb2.JobEvent(
        event_id=str(event_id),
        job_id="job-1",
        epoch_ended=training_pb2.EpochEnded(epoch=epoch, epochs=2, logs={"loss": loss}),
    )


# -- training requests -----------------------------------------------------------------


def test_train_builds_the_request_of_the_readme_example(client, fakes):
    dataset = dataset_pb2.Dataset(id="sha256:" + "ab" * 32, name="mnist-train")

    job = client.train(
        "mnist-mlp",
        layers=MNIST_LAYERS,
        optimizer="adam",
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        dataset=dataset,
        epochs=5,
        batch_size=32,
        seed=0,
    )

    (request,) = fakes.training.requests
    assert request.model_name == "mnist-mlp"
    assert [json_format.MessageToDict(s) for s in request.model.layers.layers] == MNIST_LAYERS
    assert request.compile.optimizer.name == "adam"
    assert request.compile.loss.name == "sparse_categorical_crossentropy"
    assert [m.name for m in request.compile.metrics] == ["accuracy"]
    assert request.dataset.dataset == dataset.id
    assert (request.fit.epochs, request.fit.batch_size) == (5, 32)
    assert request.fit.HasField("seed")
    assert request.fit.seed == 0
    assert request.fit.HasField("shuffle")
    assert request.fit.shuffle is True
    assert not request.fit.HasField("validation_data")
    assert job.id == "job-1"
    assert job.state == "QUEUED"


def test_train_maps_keras_style_arguments(client, fakes):
    class KerasModel:
        def to_json(self) -> str:
            return '{"class_name": "Sequential"}'

    client.train(
        "multi",
        model=KerasModel(),
        optimizer={"name": "adam", "learning_rate": np.float32(0.5)},
        loss={"digit": "sparse_categorical_crossentropy", "box": {"name": "huber", "delta": 2}},
        loss_weights={"digit": 1, "box": 0.5},
        metrics="accuracy",
        weighted_metrics=[{"name": "auc", "num_thresholds": 50}],
        dataset="builtin:mnist:test",
        validation_data="s3://bucket/val",
        class_weight={np.int64(0): 1, 1: 2.5},
        callbacks={
            "early_stopping": {"monitor": "val_loss", "patience": 2},
            "reduce_lr_on_plateau": True,
            "model_checkpoint": False,
            "tensorboard": True,
            "plugins": ["wandb"],
        },
        queue="cpu",
        labels={"team": "vision"},
        idempotency_key="k1",
    )

    (request,) = fakes.training.requests
    assert request.model.keras_json == '{"class_name": "Sequential"}'
    assert request.compile.optimizer.name == "adam"
    assert dict(request.compile.optimizer.params) == {"learning_rate": 0.5}
    assert not request.compile.HasField("loss")
    losses = request.compile.output_losses
    assert losses["digit"].name == "sparse_categorical_crossentropy"
    assert (losses["box"].name, dict(losses["box"].params)) == ("huber", {"delta": 2.0})
    assert dict(request.compile.loss_weights) == {"digit": 1.0, "box": 0.5}
    assert [m.name for m in request.compile.metrics] == ["accuracy"]
    assert request.compile.weighted_metrics[0].params["num_thresholds"] == 50
    assert (request.dataset.builtin, request.dataset.split) == ("mnist", "test")
    assert request.fit.validation_data.uri == "s3://bucket/val"
    assert dict(request.fit.class_weight) == {0: 1.0, 1: 2.5}
    assert not request.fit.HasField("seed")
    stopping = request.callbacks.early_stopping
    assert (stopping.enabled, stopping.monitor, stopping.patience) == (True, "val_loss", 2)
    assert request.callbacks.reduce_lr_on_plateau.enabled
    assert not request.callbacks.model_checkpoint.enabled
    assert request.callbacks.tensorboard
    assert [p.name for p in request.callbacks.plugins] == ["wandb"]
    assert (request.run.queue, dict(request.run.labels)) == ("cpu", {"team": "vision"})
    assert request.idempotency_key == "k1"


@pytest.mark.parametrize(
    ("value", "field", "expected"),
    [
        ("mnist-train", "dataset", "mnist-train"),
        ("sha256:00ff", "dataset", "sha256:00ff"),
        ("builtin:cifar10", "builtin", "cifar10"),
        ("/data/train.tfrecord", "uri", "/data/train.tfrecord"),
        ("gs://b/ds", "uri", "gs://b/ds"),
    ],
)
def test_dataset_strings_select_the_source(client, fakes, value, field, expected):
    client.train("m", layers=MNIST_LAYERS, loss="mse", dataset=value)

    ref = fakes.training.requests[0].dataset
    assert ref.WhichOneof("source") == field
    assert getattr(ref, field) == expected


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "exactly one of layers"),
        ({"layers": MNIST_LAYERS, "model": "{}"}, "exactly one of layers"),
        ({"layers": [{"units": 3}]}, 'layers\\[0\\] needs a "type"'),
        ({"layers": MNIST_LAYERS, "callbacks": {"early_stop": {}}}, "unknown callback"),
        ({"layers": MNIST_LAYERS, "validation_split": 0.1, "validation_data": "v"}, "not both"),
    ],
)
def test_train_rejects_ambiguous_arguments_before_calling(client, fakes, kwargs, match):
    with pytest.raises(ValueError, match=match):
        client.train("m", dataset="d", **kwargs)

    assert fakes.training.requests == []


def test_fine_tune_builds_its_request(client, fakes):
    job = client.fine_tune(
        "mnist",
        alias="stable",
        model_name="mnist-letters",
        new_head={"num_classes": 26, "dropout": 0.1},
        unfreeze_top_k=2,
        loss="sparse_categorical_crossentropy",
        dataset="letters",
        epochs=3,
    )

    (request,) = fakes.training.requests
    assert (request.base.name, request.base.alias) == ("mnist", "stable")
    assert request.model_name == "mnist-letters"
    assert request.freeze.new_head.num_classes == 26
    assert request.freeze.new_head.dropout == pytest.approx(0.1)
    assert request.freeze.unfreeze_top_k == 2
    assert request.fit.epochs == 3
    assert job.id == "job-2"


def test_train_and_fine_tune_share_option_defaults(client, fakes):
    client.train("a", layers=MNIST_LAYERS, loss="mse", dataset="d")
    client.fine_tune("a", train_last_n_layers=1, loss="mse", dataset="d")

    for request in fakes.training.requests:
        assert request.compile.optimizer.name == "adam"
        assert (request.fit.epochs, request.fit.batch_size, request.fit.shuffle) == (1, 32, True)
        assert not request.fit.HasField("seed")
        assert request.idempotency_key == ""


@pytest.mark.parametrize("call", ["train", "fine_tune"])
def test_an_unknown_option_is_a_type_error_before_calling(client, fakes, call):
    with pytest.raises(TypeError, match=f"{call}\\(\\) got an unexpected keyword argument 'epoch'"):
        getattr(client, call)("a", layers=MNIST_LAYERS, dataset="d", epoch=3)
    assert fakes.training.requests == []


def test_fine_tune_takes_no_initial_epoch(client, fakes):
    with pytest.raises(TypeError, match="initial_epoch"):
        client.fine_tune("a", dataset="d", initial_epoch=2)


def test_evaluate_raises_unimplemented_when_the_server_lacks_it(client):
    with pytest.raises(fitserve.UnimplementedError) as caught:
        client.evaluate("mnist", dataset="builtin:mnist:test", version=2)

    assert caught.value.code == grpc.StatusCode.UNIMPLEMENTED


# -- datasets ----------------------------------------------------------------------------


def test_upload_streams_a_header_then_chunks_of_an_npz(client, fakes):
    x = np.arange(3000, dtype=np.float32).reshape(100, 30)
    y = np.arange(100, dtype=np.int64)
    aux = np.ones((100, 2), dtype=np.uint8)

    dataset = client.upload_dataset("tiny", x=x, y=y, aux=aux, chunk_bytes=1000)

    (header,) = fakes.datasets.headers
    content = b"".join(fakes.datasets.chunks)
    assert (header.name, header.format) == ("tiny", "npz")
    assert header.size_bytes == len(content)
    assert header.sha256 == hashlib.sha256(content).hexdigest()
    assert {len(chunk) for chunk in fakes.datasets.chunks[:-1]} == {1000}
    assert 0 < len(fakes.datasets.chunks[-1]) <= 1000
    with np.load(io.BytesIO(content), allow_pickle=False) as npz:
        assert sorted(npz.files) == ["aux", "x", "y"]
        np.testing.assert_array_equal(npz["x"], x)
        np.testing.assert_array_equal(npz["y"], y)
        np.testing.assert_array_equal(npz["aux"], aux)
    assert dataset.id == f"sha256:{header.sha256}"


def test_upload_file_streams_the_file_as_is(client, fakes, tmp_path):
    path = tmp_path / "train.npz"
    np.savez(path, x=np.zeros((5, 4)), y=np.ones(5))

    dataset = client.upload_dataset_file("from-disk", path, chunk_bytes=256)

    assert b"".join(fakes.datasets.chunks) == path.read_bytes()
    assert fakes.datasets.headers[0].sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert fakes.datasets.headers[0].size_bytes == path.stat().st_size
    assert dataset.name == "from-disk"


def test_upload_refuses_object_arrays_before_sending(client, fakes):
    with pytest.raises(TypeError, match="array 'y' has dtype object"):
        client.upload_dataset("bad", x=np.zeros(2), y=np.array([{}, {}], dtype=object))

    assert fakes.datasets.headers == []


def test_dataset_lookups_page_and_map_errors(client, fakes):
    assert [d.name for d in client.list_datasets()] == ["a", "b", "c"]
    assert client.get_dataset("mnist-train").id == "sha256:ab"
    client.delete_dataset(dataset_pb2.Dataset(id="sha256:cd"))

    with pytest.raises(fitserve.NotFoundError, match="dataset 'nope' not found"):
        client.get_dataset("nope")
    page_tokens = [r.page_token for r in fakes.datasets.requests[:2]]
    assert page_tokens == ["", "p2"]
    assert fakes.datasets.requests[3].dataset == "sha256:cd"


# -- jobs ----------------------------------------------------------------------------------


def test_wait_follows_events_to_success_and_returns_the_final_job(client, fakes):
    fakes.training.events = [
        state_event(1, JobState.JOB_STATE_RUNNING),
        epoch_event(2, 1, 0.5),
        state_event(3, JobState.JOB_STATE_SUCCEEDED, model_version=7),
    ]
    final = training_pb2.Job(
        id="job-1", state=JobState.JOB_STATE_SUCCEEDED, model_version=7, metrics={"loss": 0.5}
    )
    fakes.training.jobs["job-1"] = final

    job = client.train("m", layers=MNIST_LAYERS, loss="mse", dataset="d")
    result = job.wait(timeout=10)

    assert result == final
    assert job.state == "SUCCEEDED"
    assert job.info.model_version == 7
    assert [r.after_event_id for r in fakes.training.watch_requests] == [""]


def test_wait_raises_job_failed_with_the_job_error(client, fakes):
    error = training_pb2.JobError(reason="INVALID_LABELS", message="label 12 >= 10 classes")
    fakes.training.events = [state_event(1, JobState.JOB_STATE_FAILED, error=error)]
    fakes.training.jobs["job-1"] = training_pb2.Job(
        id="job-1", state=JobState.JOB_STATE_FAILED, error=error
    )

    with pytest.raises(fitserve.JobFailedError, match="label 12 >= 10 classes") as caught:
        client.get_job("job-1").wait()

    assert caught.value.reason == "INVALID_LABELS"
    assert caught.value.job.id == "job-1"


def test_wait_raises_job_cancelled(client, fakes):
    fakes.training.events = [state_event(1, JobState.JOB_STATE_CANCELLED)]
    fakes.training.jobs["job-1"] = training_pb2.Job(id="job-1", state=JobState.JOB_STATE_CANCELLED)

    with pytest.raises(fitserve.JobCancelledError) as caught:
        client.get_job("job-1").wait()

    assert caught.value.job.state == JobState.JOB_STATE_CANCELLED


def test_events_resume_after_the_stream_drops(client, fakes):
    fakes.training.events = [
        state_event(1, JobState.JOB_STATE_RUNNING),
        epoch_event(2, 1, 0.9),
        epoch_event(3, 2, 0.4),
        state_event(4, JobState.JOB_STATE_SUCCEEDED),
    ]
    fakes.training.drop_after = {"2", "3"}
    fakes.training.jobs["job-1"] = training_pb2.Job(id="job-1", state=JobState.JOB_STATE_RUNNING)

    events = list(client.get_job("job-1").events())

    assert [e.event_id for e in events] == ["1", "2", "3", "4"]
    assert [r.after_event_id for r in fakes.training.watch_requests] == ["", "2", "3"]
    assert events[2].epoch_ended.logs["loss"] == pytest.approx(0.4)


def test_wait_resumes_a_dropped_stream_from_the_last_event(client, fakes):
    fakes.training.events = [
        state_event(1, JobState.JOB_STATE_RUNNING),
        state_event(2, JobState.JOB_STATE_SUCCEEDED),
    ]
    fakes.training.drop_after = {"1"}
    fakes.training.jobs["job-1"] = training_pb2.Job(id="job-1", state=JobState.JOB_STATE_SUCCEEDED)

    client.get_job("job-1").wait(timeout=10)

    assert [r.after_event_id for r in fakes.training.watch_requests] == ["", "1"]


def test_a_lasting_outage_raises_unavailable_once_the_retry_budget_is_spent(fakes):
    fakes.training.always_unavailable = True
    fakes.training.jobs["job-1"] = training_pb2.Job(id="job-1", state=JobState.JOB_STATE_RUNNING)
    started = time.monotonic()

    with (
        fitserve.Client(fakes.target, timeout=10, watch_retry_seconds=0.5) as client,
        pytest.raises(fitserve.UnavailableError, match=r"redis is down \(still failing after"),
    ):
        list(client.get_job("job-1").events())

    assert 0.5 <= time.monotonic() - started < 3
    assert len(fakes.training.watch_requests) >= 2


def test_wait_times_out_while_the_job_runs(client, fakes):
    fakes.training.events = [state_event(1, JobState.JOB_STATE_RUNNING)]
    fakes.training.hang_at_end = True
    fakes.training.jobs["job-1"] = training_pb2.Job(id="job-1", state=JobState.JOB_STATE_RUNNING)
    job = client.get_job("job-1")

    with pytest.raises(TimeoutError, match="job job-1 did not finish"):
        job.wait(timeout=0.3)


def test_a_quiet_job_outlasting_the_call_deadline_is_watched_on(fakes):
    fakes.training.events = [
        state_event(1, JobState.JOB_STATE_RUNNING),
        state_event(2, JobState.JOB_STATE_SUCCEEDED, model_version=1),
    ]
    fakes.training.visible_per_call = [1, 2]
    fakes.training.jobs["job-1"] = training_pb2.Job(id="job-1", state=JobState.JOB_STATE_SUCCEEDED)

    with fitserve.Client(fakes.target, timeout=0.3) as client:
        final = client.get_job("job-1").wait()

    assert final.state == JobState.JOB_STATE_SUCCEEDED
    assert [r.after_event_id for r in fakes.training.watch_requests] == ["", "1"]


def test_list_jobs_pages_and_filters(client, fakes):
    jobs = list(client.list_jobs(state="running", model_name="mnist", kind="fine_tune"))

    assert [j.id for j in jobs] == ["j3", "j2", "j1"]
    first, second = fakes.training.requests
    assert first.state == JobState.JOB_STATE_RUNNING
    assert first.kind == training_pb2.JobKind.JOB_KIND_FINE_TUNE
    assert first.model_name == "mnist"
    assert (first.page_token, second.page_token) == ("", "next")


def test_list_jobs_leaves_out_request_bodies_unless_asked_for_the_full_view(client, fakes):
    list(client.list_jobs())
    list(client.list_jobs(view="full"))
    list(client.list_jobs(view=training_pb2.JobView.JOB_VIEW_BASIC))

    views = [r.view for r in fakes.training.requests[::2]]
    assert views == [
        training_pb2.JobView.JOB_VIEW_UNSPECIFIED,  # the server's default: BASIC
        training_pb2.JobView.JOB_VIEW_FULL,
        training_pb2.JobView.JOB_VIEW_BASIC,
    ]
    with pytest.raises(ValueError, match="expected one of BASIC, FULL"):
        list(client.list_jobs(view="everything"))


def test_a_job_time_limit_is_sent_only_when_given(client, fakes):
    client.train("m", layers=MNIST_LAYERS, loss="mse", dataset="d", time_limit_seconds=60)
    client.train("m", layers=MNIST_LAYERS, loss="mse", dataset="d")
    client.fine_tune("m", train_last_n_layers=1, loss="mse", dataset="d", time_limit_seconds=5)

    limited, default, fine_tune = (r.run for r in fakes.training.requests)
    assert (limited.HasField("time_limit_seconds"), limited.time_limit_seconds) == (True, 60)
    assert not default.HasField("time_limit_seconds")  # the server's default
    assert fine_tune.time_limit_seconds == 5


def test_list_jobs_rejects_unknown_states(client):
    with pytest.raises(ValueError, match="expected one of QUEUED, RUNNING"):
        list(client.list_jobs(state="DONE"))


def test_cancel_of_a_finished_job_is_a_failed_precondition(client, fakes):
    fakes.training.jobs["job-1"] = training_pb2.Job(id="job-1", state=JobState.JOB_STATE_SUCCEEDED)

    with pytest.raises(fitserve.FailedPreconditionError, match="already SUCCEEDED"):
        client.get_job("job-1").cancel()


class PublicCallsOnly:
    """A stand-in client with only the public calls `Job` is documented to use."""

    timeout = 5.0
    watch_retry_seconds = 60.0

    def __init__(self, events: list[training_pb2.JobEvent], final: training_pb2.Job) -> None:
        self.events, self.final, self.calls = events, final, []

    def job_record(self, job_id, *, timeout=None):
        self.calls.append(("job_record", job_id, timeout))
        return self.final

    def cancel_job(self, job_id, *, timeout=None):
        self.calls.append(("cancel_job", job_id, timeout))
        return self.final

    def watch_job(self, job_id, after_event_id="", *, timeout=None):
        self.calls.append(("watch_job", job_id, after_event_id))
        return _Stream(self.events)


class _Stream(list):
    def cancel(self) -> bool:
        return True


def test_a_job_needs_only_the_public_client_calls():
    final = training_pb2.Job(id="job-1", state=JobState.JOB_STATE_SUCCEEDED)
    calls = PublicCallsOnly([state_event(1, JobState.JOB_STATE_SUCCEEDED)], final)
    job = fitserve.Job(calls, training_pb2.Job(id="job-1"))

    assert job.wait() == final
    assert job.cancel(timeout=2) == final
    assert calls.calls == [
        ("watch_job", "job-1", ""),
        ("job_record", "job-1", 5.0),
        ("cancel_job", "job-1", 2),
    ]


def test_the_job_module_does_not_import_the_client_module():
    source = inspect.getsource(_job)

    assert "fitserve._client" not in source


def test_every_training_option_has_a_default():
    assert set(fitserve.TrainingOptions.__optional_keys__) == set(_options._DEFAULTS)


# -- plugins ---------------------------------------------------------------------------


def test_list_plugins_sends_the_kind_and_returns_the_answer(client, fakes):
    everything = client.list_plugins()
    losses = client.list_plugins("loss", timeout=5)

    assert [r.kind for r in fakes.training.requests] == ["", "loss"]
    assert [p.name for p in losses.plugins] == ["examples>huber"]
    assert [(f.source, f.error) for f in everything.failures] == [("bad_pkg", "ImportError: x")]


def test_list_plugins_of_an_unknown_kind_is_invalid_argument(client):
    with pytest.raises(fitserve.InvalidArgumentError, match="kind 'optimizer' is unknown"):
        client.list_plugins("optimizer")


def test_cli_plugins_prints_a_table_and_the_failures(fakes, capsys):
    status = cli.main(["--target", fakes.target, "plugins", "--kind", "loss"])

    out, err = capsys.readouterr()
    assert status == 0
    assert out.splitlines()[1].split() == [
        "examples>huber",
        "loss",
        "function",
        "(y_true,",
        "y_pred,",
        "delta=1.0)",
        "fitserve-examples",
        "0.1.0",
    ]
    assert err == "failed to load: bad_pkg: ImportError: x\n"
    assert fakes.training.requests[0].kind == "loss"


def test_cli_plugins_json(fakes, capsys):
    status = cli.main(["--target", fakes.target, "plugins", "--json"])

    answer = json.loads(capsys.readouterr().out)
    assert status == 0
    assert answer["plugins"][0]["name"] == "examples>huber"
    assert answer["failures"] == [{"source": "bad_pkg", "error": "ImportError: x"}]


# -- inference and models --------------------------------------------------------------


def test_predict_sends_x_under_the_empty_key_and_returns_the_only_output(client, fakes):
    x = np.random.default_rng(0).random((3, 28, 28), dtype=np.float32)
    probs = np.eye(3, 10, dtype=np.float32)
    fakes.inference.outputs = {"output_0": probs}

    result = client.predict("mnist-mlp", x)

    (request,) = fakes.inference.requests
    assert list(request.inputs) == [""]
    np.testing.assert_array_equal(fitserve.to_numpy(request.inputs[""]), x)
    assert request.model.name == "mnist-mlp"
    assert request.model.WhichOneof("selector") is None
    assert isinstance(result, np.ndarray)
    np.testing.assert_array_equal(result, probs)


def test_predict_with_named_inputs_returns_outputs_by_name(client, fakes):
    fakes.inference.outputs = {"digit": np.zeros((2, 10)), "box": np.ones((2, 4), np.float16)}

    result = client.predict(
        "multi", inputs={"image": np.zeros((2, 4)), "text": np.array(["a", "b"])}, version=3
    )

    (request,) = fakes.inference.requests
    assert sorted(request.inputs) == ["image", "text"]
    assert list(request.inputs["text"].string_val) == [b"a", b"b"]
    assert request.model.version == 3
    assert set(result) == {"digit", "box"}
    np.testing.assert_array_equal(result["box"], np.ones((2, 4), np.float16))
    assert result["box"].dtype == np.float16


def test_predict_full_reports_version_and_request_id_for_feedback(client, fakes):
    fakes.inference.outputs = {"y": np.array([1.0])}

    prediction = client.predict_full("m", np.array([[1.0]]), alias="canary")
    feedback = client.feedback(prediction.request_id, np.array([3]))

    assert (prediction.version, prediction.request_id) == (4, "req-1")
    assert fakes.inference.requests[0].model.alias == "canary"
    assert fakes.inference.requests[1].request_id == "req-1"
    assert fitserve.to_numpy(fakes.inference.requests[1].labels).tolist() == [3]
    assert feedback.rows == 1


def test_predict_needs_exactly_one_of_x_and_inputs(client, fakes):
    with pytest.raises(ValueError, match="not both"):
        client.predict("m", np.zeros(1), inputs={"a": np.zeros(1)})
    with pytest.raises(ValueError, match="nothing to predict"):
        client.predict("m")
    with pytest.raises(ValueError, match="version= or alias="):
        client.predict("m", np.zeros(1), version=1, alias="stable")

    assert fakes.inference.requests == []


def test_not_found_from_the_server_is_a_not_found_error(client):
    with pytest.raises(fitserve.NotFoundError) as caught:
        client.get_model("ghost")

    assert caught.value.details == "model 'ghost' does not exist"
    assert caught.value.code == grpc.StatusCode.NOT_FOUND
    assert isinstance(caught.value.__cause__, grpc.RpcError)


def test_unimplemented_rpcs_raise_unimplemented(client):
    with pytest.raises(fitserve.UnimplementedError):
        client.model_status("mnist")


def test_model_registry_calls(client, fakes):
    (summary,) = client.list_models()
    moved = client.set_alias("mnist", "stable", 3)
    client.delete_version("mnist", 1)

    assert (summary.name, dict(summary.aliases)) == ("mnist", {"stable": 2})
    assert (moved.version, moved.previous_version) == (3, 1)
    alias_request, delete_request = fakes.models.requests[1:]
    assert (alias_request.alias, alias_request.version) == ("stable", 3)
    assert (delete_request.model_name, delete_request.version) == ("mnist", 1)


# -- channel, deadline, metadata -------------------------------------------------------------


def test_every_call_carries_metadata_and_a_deadline(fakes):
    with fitserve.Client(fakes.target, timeout=30, metadata=[("authorization", "Bearer t")]) as c:
        c.train("m", layers=MNIST_LAYERS, loss="mse", dataset="d")

    assert ("authorization", "Bearer t") in fakes.training.metadata[0]
    assert fakes.training.time_remaining[0] == pytest.approx(30, abs=1)


def test_a_per_call_timeout_overrides_the_default(client):
    with pytest.raises(fitserve.DeadlineExceededError):
        client.predict("slow", np.zeros(1), timeout=0.2)


def test_an_injected_channel_is_used_and_left_open(fakes):
    channel = grpc.insecure_channel(fakes.target)
    fakes.inference.outputs = {"y": np.array([2])}

    with fitserve.Client(channel=channel) as client:
        assert client.predict("m", np.zeros(1)).tolist() == [2]
    stub = model_pb2_grpc.ModelServiceStub(channel)
    assert stub.ListModels(model_pb2.ListModelsRequest(), timeout=5).models[0].name == "mnist"
    channel.close()


def test_an_unreachable_server_is_unavailable():
    with (
        fitserve.Client("127.0.0.1:1", timeout=5) as client,
        pytest.raises(fitserve.UnavailableError),
    ):
        client.get_model("m")


# -- the command line ------------------------------------------------------------------------


def test_cli_gets_a_job_as_fields_or_as_json(fakes, capsys):
    fakes.training.jobs["job-1"] = training_pb2.Job(id="job-1", state=JobState.JOB_STATE_RUNNING)

    assert cli.main(["--target", fakes.target, "jobs", "get", "job-1"]) == 0
    fields = [line.split() for line in capsys.readouterr().out.splitlines()]
    status = cli.main(["--target", fakes.target, "jobs", "get", "job-1", "--json"])

    assert status == 0
    assert ["id", "job-1"] in fields
    assert ["state", "RUNNING"] in fields
    document = json.loads(capsys.readouterr().out)
    assert document["id"] == "job-1"
    assert document["state"] == "RUNNING"  # the JobState value, never the wire's number
    assert document["model_version"] == 0  # every field, 64-bit integers as numbers


def test_cli_lists_jobs_as_a_table_or_whole_as_json_lines(fakes, capsys):
    assert cli.main(["--target", fakes.target, "jobs", "list"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert cli.main(["--target", fakes.target, "jobs", "list", "--full"]) == 0
    lines = capsys.readouterr().out.splitlines()

    assert table[0].split() == ["ID", "KIND", "STATE", "MODEL", "VERSION", "CREATED"]
    assert [json.loads(line)["id"] for line in lines] == ["j3", "j2", "j1"]
    views = [r.view for r in fakes.training.requests[::2]]
    assert views == [training_pb2.JobView.JOB_VIEW_BASIC, training_pb2.JobView.JOB_VIEW_FULL]


def test_cli_prints_server_errors_and_exits_with_their_status(fakes, capsys):
    status = cli.main(["--target", fakes.target, "models", "get", "ghost"])

    assert status == cli.EXIT_NOT_FOUND == 3
    assert capsys.readouterr().err == "error: model 'ghost' does not exist\n"


def test_cli_watch_prints_events_and_fails_with_the_job(fakes, capsys):
    error = training_pb2.JobError(reason="OUT_OF_MEMORY", message="use a smaller batch_size")
    fakes.training.events = [
        epoch_event(1, 1, 0.25),
        state_event(2, JobState.JOB_STATE_FAILED, error=error),
    ]
    fakes.training.jobs["job-1"] = training_pb2.Job(
        id="job-1", state=JobState.JOB_STATE_FAILED, error=error
    )

    status = cli.main(["--target", fakes.target, "jobs", "watch", "job-1"])

    out, err = capsys.readouterr()
    assert status == 1
    assert out.splitlines() == ["epoch 1/2: loss=0.25", "state FAILED: use a smaller batch_size"]
    assert err == "error: use a smaller batch_size\n"


def test_cli_predict_prints_the_output_array(fakes, capsys, tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((2, 3), dtype=np.float32))
    fakes.inference.outputs = {"y": np.array([[0.25, 0.75], [1.0, 0.0]])}

    status = cli.main(["--target", fakes.target, "predict", "m", str(tmp_path / "x.npy")])

    assert status == 0
    assert capsys.readouterr().out == "[[0.25 0.75]\n [1.   0.  ]]\n"
    np.testing.assert_array_equal(
        fitserve.to_numpy(fakes.inference.requests[0].inputs[""]), np.zeros((2, 3))
    )


def test_cli_uploads_a_dataset_file(fakes, capsys, tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros(3), y=np.ones(3))

    argv = ["--target", fakes.target, "datasets", "upload", "tiny", str(path), "--json"]
    status = cli.main(argv)

    assert status == 0
    assert json.loads(capsys.readouterr().out)["name"] == "tiny"
    assert b"".join(fakes.datasets.chunks) == path.read_bytes()


@pytest.mark.parametrize("command", ["up", "serve", "worker"])
def test_cli_server_commands_need_the_server_package(monkeypatch, capsys, command):
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name: None)

    status = cli.main([command])

    assert status == 2
    assert capsys.readouterr().err == (
        f"fitserve {command} needs the server package: "
        "run 'make install' in the fitserve repository\n"
    )


def test_cli_server_commands_exec_the_server_with_their_arguments(monkeypatch):
    calls = []
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(cli.os, "execv", lambda path, argv: calls.append((path, argv)))

    cli.main(["--target", "ignored:1", "up", "--port", "9000", "-v"])

    ((path, argv),) = calls
    assert path == cli.sys.executable
    assert argv == [cli.sys.executable, "-m", "service.main", "up", "--port", "9000", "-v"]


def test_a_refused_predict_is_retried_after_the_servers_pushback(client, fakes):
    fakes.inference.refusals = 2
    fakes.inference.outputs = {"y": np.zeros((1, 2), np.float32)}

    assert client.predict("busy", np.zeros((1, 3), np.float32)).shape == (1, 2)

    times = fakes.inference.times
    assert len(times) == 3  # two refusals, then the answer
    assert min(b - a for a, b in itertools.pairwise(times)) >= 0.15  # the 0.2 s hint


def test_predict_attempts_bound_the_retries(fakes):
    fakes.inference.refusals = 5
    with (
        fitserve.Client(fakes.target, timeout=10, predict_attempts=2) as client,
        pytest.raises(fitserve.ResourceExhaustedError, match="queue is full"),
    ):
        client.predict("busy", np.zeros((1, 3), np.float32))
    assert len(fakes.inference.requests) == 2


def test_predict_attempts_of_one_never_retry(fakes):
    fakes.inference.refusals = 5
    with (
        fitserve.Client(fakes.target, timeout=10, predict_attempts=1) as client,
        pytest.raises(fitserve.ResourceExhaustedError),
    ):
        client.predict("busy", np.zeros((1, 3), np.float32))
    assert len(fakes.inference.requests) == 1


def test_a_refusal_that_waiting_cannot_cure_is_not_retried(client, fakes):
    with pytest.raises(fitserve.ResourceExhaustedError, match="over the limit"):
        client.predict("too-big", np.zeros((1, 3), np.float32))
    assert len(fakes.inference.requests) == 1  # the server's pushback of -1: no retry
