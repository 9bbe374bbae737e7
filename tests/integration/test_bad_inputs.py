"""Every RPC's bad inputs: the right status, a message that says what was expected, nothing
left behind, and the server still serving."""

from __future__ import annotations

import io
import re
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import struct_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

import fitserve
from fitserve.v1 import (
    dataset_pb2,
    dataset_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
    model_pb2,
    model_pb2_grpc,
    tensor_pb2,
    training_pb2,
    training_pb2_grpc,
)
from service.config import Settings
from tests.integration.conftest import MLP_LAYERS

pytestmark = pytest.mark.integration
Code = grpc.StatusCode


@pytest.fixture(scope="module")
def trained(server: object, worker: object, digits: tuple[np.ndarray, np.ndarray]) -> str:
    """A small model for the Predict cases, trained once."""
    x, y = digits
    with fitserve.Client(server.target, timeout=120) as c:  # type: ignore[attr-defined]
        ds = c.upload_dataset("bad-inputs-data", x=x[:64], y=y[:64])
        c.train(
            "bad-inputs",
            layers=MLP_LAYERS,
            loss="sparse_categorical_crossentropy",
            dataset=ds,
            epochs=1,
            seed=0,
        ).wait(timeout=120)
    return "bad-inputs"


def _code(exc: pytest.ExceptionInfo[fitserve.FitserveError]) -> grpc.StatusCode:
    return exc.value.code


# ---- TrainingService -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"optimizer": "adamm"}, "unknown optimizer 'adamm'; valid: adadelta"),
        ({"loss": "sparse_crossentropy"}, "unknown loss 'sparse_crossentropy'"),
        ({"metrics": ["acuracy"]}, "unknown metric 'acuracy'"),
        ({"loss": None}, "compile.loss is required"),
        ({"optimizer": {"name": "adam", "bogus": 1}}, "optimizer 'adam' has no parameter 'bogus'"),
        (
            {"loss": {"name": "huber", "delta": "x"}},
            "loss 'huber' parameter 'delta' must be a number",
        ),
        ({"metrics": [{"name": "auc", "num_thresholds": 2.5}]}, "must be a whole number"),
        ({"epochs": -1}, "fit.epochs"),
        ({"validation_split": 1.5}, "fit.validation_split"),
        ({"layers": [{"type": "Lambda", "function": "x"}]}, "Lambda layers are not allowed"),
        (
            {"layers": [{"type": "os.system"}]},
            "'os.system' is neither a Keras layer class nor a plugin",
        ),
    ],
)
def test_train_rejects_bad_requests(
    client: fitserve.Client, kwargs: dict[str, object], message: str
) -> None:
    args: dict[str, object] = {
        "layers": MLP_LAYERS,
        "loss": "sparse_categorical_crossentropy",
        "dataset": "no-such-dataset",
    }
    args.update(kwargs)
    with pytest.raises(fitserve.InvalidArgumentError) as exc:
        client.train("some-model", **args)  # type: ignore[arg-type]
    assert message in exc.value.details


def test_train_names_the_field_in_bad_request_details(channel: grpc.Channel) -> None:
    stub = training_pb2_grpc.TrainingServiceStub(channel)
    with pytest.raises(grpc.RpcError) as exc:
        stub.Train(training_pb2.TrainRequest(model_name="Bad Name!"))
    status = rpc_status.from_call(exc.value)  # type: ignore[arg-type]
    assert status is not None
    assert exc.value.code() == Code.INVALID_ARGUMENT
    detail = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(detail)
    assert detail.field_violations[0].field in ("model", "model_name", "compile", "dataset")


def test_train_layer_without_type(channel: grpc.Channel) -> None:
    layer = struct_pb2.Struct()
    layer.update({"units": 3})
    request = training_pb2.TrainRequest(
        model_name="m",
        dataset=training_pb2.DatasetRef(dataset="d"),
        model=training_pb2.ModelSpec(layers=training_pb2.LayerList(layers=[layer])),
        compile=training_pb2.CompileOptions(loss=training_pb2.NamedConfig(name="mse")),
    )
    with pytest.raises(grpc.RpcError) as exc:
        training_pb2_grpc.TrainingServiceStub(channel).Train(request)
    assert exc.value.code() == Code.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert "model.layers[0] has no 'type'" in exc.value.details()  # type: ignore[attr-defined]


def test_train_unknown_dataset_is_not_found(client: fitserve.Client) -> None:
    with pytest.raises(fitserve.NotFoundError, match="dataset 'nope' not found"):
        client.train("m", layers=MLP_LAYERS, loss="mse", dataset="nope")


def test_keras_config_with_a_foreign_module_is_refused(client: fitserve.Client) -> None:
    config = (
        '{"class_name": "Sequential", "config": {"layers": [{"class_name": "Dense", '
        '"module": "os", "config": {"name": "evil", "units": 1}}]}}'
    )
    with pytest.raises(
        fitserve.InvalidArgumentError, match=r"layer 'evil' .*module 'os' is not allowed"
    ):
        client.train("m", model=config, loss="mse", dataset="x")


def test_a_job_that_fails_on_the_worker_says_why(
    client: fitserve.Client, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    x, _ = digits
    ds = client.upload_dataset("no-targets", x=x[:32], labels=np.zeros(32))
    job = client.train(
        "fails", layers=MLP_LAYERS, loss="sparse_categorical_crossentropy", dataset=ds
    )
    with pytest.raises(fitserve.JobFailedError, match=r"has no array 'y'; it has labels, x") as exc:
        job.wait(timeout=120)
    assert exc.value.job.error.reason == "INVALIDREQUEST"
    assert client.list_models() is not None  # the server still serves


@pytest.mark.parametrize("method", ["get_job", "cancel_job"])
def test_unknown_job_is_not_found(client: fitserve.Client, method: str) -> None:
    with pytest.raises(fitserve.NotFoundError, match="job 'abc123' not found"):
        getattr(client, method)("abc123")


def test_job_id_must_look_like_one(channel: grpc.Channel) -> None:
    stub = training_pb2_grpc.TrainingServiceStub(channel)
    with pytest.raises(grpc.RpcError) as exc:
        stub.GetJob(training_pb2.GetJobRequest(job_id="../etc"))
    assert exc.value.code() == Code.INVALID_ARGUMENT  # type: ignore[attr-defined]
    with pytest.raises(grpc.RpcError) as exc:
        list(stub.WatchJob(training_pb2.WatchJobRequest(job_id="0" * 32)))
    assert exc.value.code() == Code.NOT_FOUND  # type: ignore[attr-defined]
    with pytest.raises(grpc.RpcError) as exc:
        stub.ListJobs(training_pb2.ListJobsRequest(page_token="garbage"))
    assert exc.value.code() == Code.INVALID_ARGUMENT  # type: ignore[attr-defined]


@pytest.mark.parametrize("after", ["$", "+", "1700000000000-x", "-1"])
def test_watch_from_something_not_an_event_id_is_refused(channel: grpc.Channel, after: str) -> None:
    stub = training_pb2_grpc.TrainingServiceStub(channel)
    request = training_pb2.WatchJobRequest(job_id="0" * 32, after_event_id=after)
    with pytest.raises(grpc.RpcError) as exc:
        list(stub.WatchJob(request, timeout=30))
    assert exc.value.code() == Code.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert "is not an event id" in exc.value.details()  # type: ignore[attr-defined]


def test_an_empty_fine_tune_request_names_the_base(channel: grpc.Channel) -> None:
    stub = training_pb2_grpc.TrainingServiceStub(channel)
    with pytest.raises(grpc.RpcError) as exc:
        stub.FineTune(training_pb2.FineTuneRequest())
    assert exc.value.code() == Code.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert exc.value.details().startswith("base.name")  # type: ignore[attr-defined]


# ---- DatasetService --------------------------------------------------------------------


def _upload(
    channel: grpc.Channel, messages: list[dataset_pb2.UploadDatasetRequest]
) -> grpc.RpcError:
    stub = dataset_pb2_grpc.DatasetServiceStub(channel)
    with pytest.raises(grpc.RpcError) as exc:
        stub.UploadDataset(iter(messages))
    return exc.value


def _header(name: str = "ok-name", **kw: object) -> dataset_pb2.UploadDatasetRequest:
    return dataset_pb2.UploadDatasetRequest(
        header=dataset_pb2.DatasetHeader(**({"name": name, "format": "npz"} | kw))
    )  # type: ignore[arg-type]


def _chunk(data: bytes) -> dataset_pb2.UploadDatasetRequest:
    return dataset_pb2.UploadDatasetRequest(chunk=data)


def _npz(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


@pytest.fixture
def no_leftovers(settings: Settings) -> Iterator[None]:
    """Nothing new may appear in the dataset store."""
    before = _files(settings.datasets_dir)
    yield
    assert _files(settings.datasets_dir) == before


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()} if root.exists() else set()


@pytest.mark.usefixtures("no_leftovers")
@pytest.mark.parametrize(
    ("messages", "code", "message"),
    [
        ([_chunk(b"abc")], Code.INVALID_ARGUMENT, "first message of an upload must be the header"),
        ([], Code.INVALID_ARGUMENT, "first message of an upload must be the header"),
        ([_header("Bad Name")], Code.INVALID_ARGUMENT, "not a valid dataset name"),
        ([_header(format="csv")], Code.INVALID_ARGUMENT, "header.format 'csv' is not supported"),
        ([_header()], Code.INVALID_ARGUMENT, "no content"),
        ([_header(), _chunk(b"not a zip file")], Code.INVALID_ARGUMENT, "not a valid .npz file"),
        ([_header(size_bytes=10), _chunk(b"12345")], Code.INVALID_ARGUMENT, "announced 10"),
        (
            [_header(sha256="0" * 64), _chunk(_npz(x=np.zeros(3)))],
            Code.INVALID_ARGUMENT,
            "content sha256",
        ),
        (
            [_header(), _chunk(_npz(x=np.zeros(3), y=np.zeros(4)))],
            Code.INVALID_ARGUMENT,
            "different numbers of examples",
        ),
        (
            [_header(), _chunk(_npz(x=np.array([{"a": 1}], dtype=object)))],
            Code.INVALID_ARGUMENT,
            "Python objects",
        ),
        ([_header(size_bytes=2**62)], Code.RESOURCE_EXHAUSTED, "FITSERVE_MAX_DATASET_BYTES"),
        ([_header(), _header()], Code.INVALID_ARGUMENT, "only the first message may be a header"),
    ],
)
def test_bad_uploads_leave_nothing(
    channel: grpc.Channel,
    messages: list[dataset_pb2.UploadDatasetRequest],
    code: Code,
    message: str,
) -> None:
    error = _upload(channel, messages)
    assert error.code() == code  # type: ignore[attr-defined]
    assert message in error.details()  # type: ignore[attr-defined]


def test_same_content_is_stored_once(client: fitserve.Client, settings: Settings) -> None:
    a = client.upload_dataset("dedupe-a", x=np.arange(6.0).reshape(3, 2), y=np.arange(3))
    b = client.upload_dataset("dedupe-b", x=np.arange(6.0).reshape(3, 2), y=np.arange(3))
    assert a.id == b.id
    blob = settings.datasets_dir / "blobs" / f"{a.id.removeprefix('sha256:')}.npz"
    client.delete_dataset("dedupe-a")
    assert blob.exists()
    assert client.get_dataset(a.id).name == "dedupe-b"
    client.delete_dataset("dedupe-b")
    assert not blob.exists()
    with pytest.raises(fitserve.NotFoundError):
        client.get_dataset("dedupe-b")


@pytest.mark.parametrize("ref", ["never-uploaded", "sha256:" + "a" * 64])
def test_unknown_datasets_are_not_found(client: fitserve.Client, ref: str) -> None:
    with pytest.raises(fitserve.NotFoundError, match="not found"):
        client.get_dataset(ref)
    with pytest.raises(fitserve.NotFoundError, match="not found"):
        client.delete_dataset(ref)


def test_malformed_dataset_id_is_invalid(client: fitserve.Client) -> None:
    with pytest.raises(fitserve.InvalidArgumentError, match="is not a dataset id"):
        client.get_dataset("sha256:xyz")


# ---- ModelService ----------------------------------------------------------------------


def test_model_registry_errors(client: fitserve.Client, trained: str) -> None:
    with pytest.raises(fitserve.NotFoundError, match="model 'no-such-model' not found"):
        client.get_model("no-such-model")
    with pytest.raises(fitserve.NotFoundError, match="has no version 99"):
        client.set_alias(trained, "stable", 99)
    with pytest.raises(fitserve.InvalidArgumentError, match="not a valid alias"):
        client.set_alias(trained, "Not An Alias", 1)
    with pytest.raises(fitserve.InvalidArgumentError, match="reserved"):
        client.set_alias(trained, "latest", 1)
    with pytest.raises(fitserve.NotFoundError, match="has no alias 'gone'"):
        client.delete_alias(trained, "gone")
    with pytest.raises(fitserve.InvalidArgumentError, match="positive version"):
        client.delete_version(trained, 0)
    with pytest.raises(fitserve.InvalidArgumentError, match="not a valid model name"):
        client.get_model("../etc")


# ---- InferenceService ------------------------------------------------------------------


def _predict(
    channel: grpc.Channel, model: str, inputs: dict[str, tensor_pb2.Tensor], **ref: object
) -> grpc.RpcError:
    stub = inference_pb2_grpc.InferenceServiceStub(channel)
    request = inference_pb2.PredictRequest(
        model=tensor_pb2.ModelRef(name=model, **ref), inputs=inputs
    )  # type: ignore[arg-type]
    with pytest.raises(grpc.RpcError) as exc:
        stub.Predict(request)
    return exc.value


def _tensor(array: np.ndarray) -> tensor_pb2.Tensor:
    return fitserve.to_tensor(array)


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        (
            {"x": _tensor(np.zeros((2, 28, 28), np.float64))},
            "input 'x' has dtype float64; model 'bad-inputs' version 1 expects float32",
        ),
        (
            {"x": _tensor(np.zeros((2, 27, 28), np.float32))},
            "input 'x' has shape [2, 27, 28]; model 'bad-inputs' version 1 expects [-1, 28, 28]",
        ),
        (
            {
                "x": tensor_pb2.Tensor(
                    dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=[2, 28, 28], content=b"1234"
                )
            },
            "input 'x' has 4 bytes; shape [2, 28, 28] of float32 needs 6272",
        ),
        ({"pixels": _tensor(np.zeros((2, 28, 28), np.float32))}, "missing input 'x'"),
        (
            {
                "x": _tensor(np.zeros((2, 28, 28), np.float32)),
                "y": _tensor(np.zeros(2, np.float32)),
            },
            "unknown input 'y'",
        ),
        ({}, "inputs is empty"),
        ({"x": _tensor(np.zeros((0, 28, 28), np.float32))}, "no rows"),
        (
            {
                "x": tensor_pb2.Tensor(
                    dtype=tensor_pb2.DATA_TYPE_STRING, shape=[1], string_val=[b"a"]
                )
            },
            "DATA_TYPE_STRING is not supported",
        ),
    ],
)
def test_predict_rejects_bad_inputs(
    channel: grpc.Channel, trained: str, inputs: dict[str, tensor_pb2.Tensor], message: str
) -> None:
    error = _predict(channel, trained, inputs)
    assert error.code() == Code.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert message in error.details()  # type: ignore[attr-defined]


def test_predict_unknown_model_version_alias(channel: grpc.Channel, trained: str) -> None:
    ok = {"": _tensor(np.zeros((1, 28, 28), np.float32))}
    for model, ref, message in (
        ("never-trained", {}, "model 'never-trained' not found"),
        (trained, {"version": 42}, "has no version 42"),
        (trained, {"alias": "canary"}, "has no alias 'canary'"),
    ):
        error = _predict(channel, model, ok, **ref)
        assert error.code() == Code.NOT_FOUND, message  # type: ignore[attr-defined]
        assert message in error.details()  # type: ignore[attr-defined]


def test_server_keeps_serving_after_bad_input(
    client: fitserve.Client, channel: grpc.Channel, trained: str
) -> None:
    _predict(channel, trained, {"x": _tensor(np.zeros((2, 3), np.float32))})
    assert client.predict(trained, np.zeros((3, 28, 28), np.float32)).shape == (3, 10)


def test_feedback_for_an_unknown_request_and_status_reports_versions(
    client: fitserve.Client, trained: str
) -> None:
    with pytest.raises(fitserve.NotFoundError, match="no prediction with request id"):
        client.feedback("some-request", np.array([1]))
    client.predict(trained, np.zeros((1, 28, 28), np.float32))
    status = client.model_status(trained)
    assert [(v.version, v.state) for v in status.versions] == [
        (1, inference_pb2.ModelVersionStatus.STATE_AVAILABLE)
    ]
    with pytest.raises(fitserve.NotFoundError):
        client.model_status("never-trained")


# ---- Hostile inputs: never INTERNAL or UNKNOWN, the server keeps serving ---------------


def _train_refused(client: fitserve.Client, **kwargs: object) -> fitserve.InvalidArgumentError:
    args: dict[str, object] = {"loss": "mse", "dataset": "no-such-dataset"}
    args.update(kwargs)
    with pytest.raises(fitserve.InvalidArgumentError) as exc:
        client.train("hostile", **args)  # type: ignore[arg-type]
    assert client.list_models() is not None  # the server still serves
    return exc.value


def _field(error: fitserve.FitserveError | grpc.RpcError) -> str:
    call = error if isinstance(error, grpc.RpcError) else error.__cause__
    status = rpc_status.from_call(call)  # type: ignore[arg-type]
    assert status is not None
    detail = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(detail)
    return str(detail.field_violations[0].field)


_DEEP = "[" * 1000 + "]" * 1000


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            '{"class_name": "Sequential", "config": {"layers": [' + _DEEP + "]}}",
            "model.keras_json is nested 1003 levels deep; the limit is 100",
        ),
        ("[" * 100_000, "model.keras_json is nested 100000 levels deep; the limit is 100"),
        (
            '{"class_name": {"a": 1}, "config": {"layers": []}}',
            "with class_name Sequential or Functional",
        ),
        (
            '{"class_name": "Sequential", "config": {"layers": [{"class_name": {"x": 1}, '
            '"config": {"name": "d"}}]}}',
            "class {'x': 1} is not an allowed Keras class",
        ),
        (
            '{"class_name": "Functional", "config": {"layers": [{"class_name": "Dense", '
            '"config": [1]}], "output_layers": [["d", 0, 0]]}}',
            "",
        ),
        ('{"class_name": "Sequential", "config": {"layers": [' + "1" * 5000 + "]}}", "not JSON"),
    ],
    ids=[
        "deep-in-layers",
        "deep-unclosed",
        "model-class-object",
        "layer-class-object",
        "layer-config-list",
        "huge-integer",
    ],
)
def test_hostile_keras_configs_are_invalid_arguments(
    client: fitserve.Client, config: str, message: str
) -> None:
    error = _train_refused(client, model=config)
    assert message in error.details
    assert _field(error) == "model.keras_json"


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("/data/a\x00b", "dataset.uri '/data/a\\x00b' holds a control character"),
        ("file:///data/a%00b", "holds a control character"),
        ("/data/" + "a" * 300 + "/x", "a path component of 300 bytes; the limit is 255"),
        ("/" + "a/" * 3000, "dataset.uri: String should have at most 4096 characters"),
        ("s3://bucket/a\x00b", "holds a control character"),
    ],
    ids=["nul", "nul-escaped", "long-component", "long-path", "nul-in-url"],
)
def test_hostile_dataset_uris_are_invalid_arguments(
    client: fitserve.Client, uri: str, message: str
) -> None:
    error = _train_refused(client, layers=MLP_LAYERS, dataset=training_pb2.DatasetRef(uri=uri))
    assert message in error.details
    assert _field(error) == "dataset.uri"


@pytest.mark.parametrize(
    ("request_", "field", "message"),
    [
        (training_pb2.ListJobsRequest(page_token="²"), "page_token", "not one this server"),
        (training_pb2.ListJobsRequest(page_token="9" * 30), "page_token", "not one this server"),
        (training_pb2.ListJobsRequest(state=99), "state", "state 99 is not a job state"),  # type: ignore[arg-type]
        (training_pb2.ListJobsRequest(kind=42), "kind", "kind 42 is not a job kind"),  # type: ignore[arg-type]
    ],
    ids=["superscript-two", "huge-offset", "undefined-state", "undefined-kind"],
)
def test_hostile_list_jobs_requests_are_invalid_arguments(
    channel: grpc.Channel, request_: training_pb2.ListJobsRequest, field: str, message: str
) -> None:
    stub = training_pb2_grpc.TrainingServiceStub(channel)
    with pytest.raises(grpc.RpcError) as exc:
        stub.ListJobs(request_)
    assert exc.value.code() == Code.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert message in exc.value.details()  # type: ignore[attr-defined]
    assert _field(exc.value) == field
    assert stub.ListJobs(training_pb2.ListJobsRequest()) is not None  # still serving


@pytest.mark.parametrize("token", ["²", "\u0661\u0662", "9" * 30])
def test_hostile_page_tokens_of_models_and_datasets(channel: grpc.Channel, token: str) -> None:
    models = model_pb2_grpc.ModelServiceStub(channel)
    datasets = dataset_pb2_grpc.DatasetServiceStub(channel)
    for call, request in (
        (models.ListModels, model_pb2.ListModelsRequest(page_token=token)),
        (datasets.ListDatasets, dataset_pb2.ListDatasetsRequest(page_token=token)),
    ):
        with pytest.raises(grpc.RpcError) as exc:
            call(request)  # type: ignore[operator]
        assert exc.value.code() == Code.INVALID_ARGUMENT  # type: ignore[attr-defined]
        assert "page_token is not one this server issued" in exc.value.details()  # type: ignore[attr-defined]
        assert _field(exc.value) == "page_token"


@pytest.mark.parametrize(
    "after", [str(2**64), f"{2**64}-0", f"0-{2**64}", "\u0661\u0667\u0660\u0660-0"]
)
def test_watch_after_an_event_id_beyond_redis_s_range_is_refused(
    channel: grpc.Channel, after: str
) -> None:
    stub = training_pb2_grpc.TrainingServiceStub(channel)
    request = training_pb2.WatchJobRequest(job_id="0" * 32, after_event_id=after)
    with pytest.raises(grpc.RpcError) as exc:
        list(stub.WatchJob(request, timeout=30))
    assert exc.value.code() == Code.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert "is not an event id" in exc.value.details()  # type: ignore[attr-defined]
    assert "each part at most 18446744073709551615" in exc.value.details()  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("layers", "field", "message"),
    [
        (
            [{"type": "Flatten", "input_shape": [28, 28]}, {"type": "Dense", "units": 10**12}],
            "model.layers[1]",
            "model.layers[1] (Dense): units is 1000000000000; the limit is 1,000,000",
        ),
        (
            [{"type": "Dense", "units": 10, "input_shape": "abc"}],
            "model.layers[0]",
            "model.layers[0]: input_shape must be a list of whole numbers from 1 to "
            "1,000,000, e.g. [28, 28]; got 'abc'",
        ),
        (
            [{"type": "Dense", "units": 10, "input_shape": [28, None]}],
            "model.layers[0]",
            "input_shape must be a list of whole numbers",
        ),
        (
            [
                {"type": "Flatten", "input_shape": [1000, 1000]},
                {"type": "Dense", "units": 100_000},
            ],
            "model.layers[1]",
            "the model would hold about 100,000,100,000 weights; the limit is 1,000,000,000",
        ),
        (
            [{"type": "Conv2D", "filters": 8, "kernel_size": [3, 10**9], "input_shape": [8, 8, 1]}],
            "model.layers[0]",
            "kernel_size is 1000000000; the limit is 1,000,000",
        ),
    ],
    ids=["huge-units", "shape-string", "shape-null", "too-many-weights", "huge-kernel"],
)
def test_huge_or_malformed_layers_are_refused_at_submission(
    client: fitserve.Client, layers: list[dict[str, object]], field: str, message: str
) -> None:
    error = _train_refused(client, layers=layers)
    assert message in error.details
    assert _field(error) == field


def test_huge_layers_in_a_keras_config_are_refused_at_submission(client: fitserve.Client) -> None:
    config = (
        '{"class_name": "Sequential", "config": {"name": "s", "layers": ['
        '{"class_name": "InputLayer", "config": {"batch_shape": [null, 4], "name": "in"}},'
        '{"class_name": "Dense", "config": {"name": "big", "units": 1000000000000}}]}}'
    )
    error = _train_refused(client, model=config)
    assert "layer 'big' (Dense): units is 1000000000000; the limit is 1,000,000" in error.details
    assert _field(error) == "model.keras_json"


def _npy_header(shape: tuple[int, ...], dtype: str = "<f4") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": dtype, "fortran_order": False, "shape": shape}
    )
    return buf.getvalue()  # the magic string, then the header


def _zip(*members: tuple[str, bytes]) -> bytes:
    """An .npz written member by member (duplicates included), deflated."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns of a duplicate name
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
            for name, content in members:
                archive.writestr(name, content)
    return buf.getvalue()


@pytest.mark.usefixtures("no_leftovers")
@pytest.mark.parametrize(
    ("content", "code", "message"),
    [
        (
            _zip(("x.npy", _npy_header((1_000_000, 1024), "<f8"))),
            Code.RESOURCE_EXHAUSTED,
            "the dataset's arrays hold 8,192,000,000 bytes unpacked (largest: 'x', "
            "(1000000, 1024) float64); the limit is 4,294,967,296 bytes "
            "(FITSERVE_MAX_DATASET_EXPANDED_BYTES)",
        ),
        (
            _zip(("x.npy", _npy_header((10**12,)))),
            Code.RESOURCE_EXHAUSTED,
            "FITSERVE_MAX_DATASET_EXPANDED_BYTES",
        ),
        (
            _zip(("x.npy", _npy_header((1000,)) + bytes(40))),
            Code.INVALID_ARGUMENT,
            "array 'x' holds 40 bytes of data; its header declares (1000,) float32, 4,000 bytes",
        ),
        (
            _zip(("x.npy", _npy_header((10,)) + bytes(10_000_000))),
            Code.INVALID_ARGUMENT,
            "array 'x' holds more data than its header declares ((10,) float32, 40 bytes)",
        ),
        (
            _zip(("x.npy", _npy_header((4,)) + bytes(16)), ("x.npy", b"")),
            Code.INVALID_ARGUMENT,
            "holds 'x.npy' twice",
        ),
        (
            _zip(("x.npy", _npy_header((-4,)))),
            Code.INVALID_ARGUMENT,
            "array 'x' has a negative dimension",
        ),
    ],
    ids=["declared-8gb", "header-1e12-rows", "fewer-bytes", "more-bytes", "duplicate", "negative"],
)
def test_zip_bombs_and_lying_headers_are_refused(
    channel: grpc.Channel, content: bytes, code: Code, message: str
) -> None:
    error = _upload(channel, [_header(), _chunk(content)])
    assert error.code() == code  # type: ignore[attr-defined]
    assert message in error.details()  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "call",
    [
        lambda c, n: c.get_model(n),
        lambda c, n: c.train(n, layers=MLP_LAYERS, loss="mse", dataset="x"),
        lambda c, n: c.get_dataset(n),
        lambda c, n: c.get_dataset("sha256:" + n),
        lambda c, n: c.delete_dataset("sha256:" + n),
        lambda c, n: c.get_job(n),
        lambda c, n: c.set_alias("some-model", n, 1),
    ],
    ids=[
        "get_model",
        "train",
        "get_dataset",
        "dataset_id",
        "delete_dataset_id",
        "get_job",
        "set_alias",
    ],
)
def test_a_10_kb_value_is_echoed_truncated(client: fitserve.Client, call: object) -> None:
    name = "A" * 10_000
    with pytest.raises(fitserve.InvalidArgumentError) as exc:
        call(client, name)  # type: ignore[operator]
    assert "AAAA" in exc.value.details
    assert re.search(r"… \(100\d\d characters\)", exc.value.details)
    assert len(exc.value.details) < 400


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.set_alias("never-existed", "stable", 1),
        lambda c: c.delete_alias("never-existed", "stable"),
        lambda c: c.delete_version("never-existed", 1),
    ],
    ids=["set_alias", "delete_alias", "delete_version"],
)
def test_alias_and_version_calls_on_an_unknown_model_create_nothing(
    client: fitserve.Client, settings: Settings, call: object
) -> None:
    with pytest.raises(fitserve.NotFoundError, match="model 'never-existed' not found"):
        call(client)  # type: ignore[operator]
    assert not (settings.models_dir / "never-existed").exists()
