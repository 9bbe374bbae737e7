import json
from typing import Any

import ml_dtypes
import numpy as np
import pytest

from fitserve.v1 import tensor_pb2, training_pb2
from service.api import converters
from service.api.converters import array_to_tensor, job_to_proto, tensor_to_array
from service.domain.jobs import Job, JobKind, JobState
from service.errors import InvalidRequest

DataType = tensor_pb2.DataType
NUMERIC = [
    ("float16", DataType.DATA_TYPE_FLOAT16),
    ("float32", DataType.DATA_TYPE_FLOAT32),
    ("float64", DataType.DATA_TYPE_FLOAT64),
    ("int8", DataType.DATA_TYPE_INT8),
    ("int16", DataType.DATA_TYPE_INT16),
    ("int32", DataType.DATA_TYPE_INT32),
    ("int64", DataType.DATA_TYPE_INT64),
    ("uint8", DataType.DATA_TYPE_UINT8),
    ("uint16", DataType.DATA_TYPE_UINT16),
    ("uint32", DataType.DATA_TYPE_UINT32),
    ("uint64", DataType.DATA_TYPE_UINT64),
    ("bool", DataType.DATA_TYPE_BOOL),
    (ml_dtypes.bfloat16, DataType.DATA_TYPE_BFLOAT16),
]


def sample(dtype, shape=(2, 3)) -> np.ndarray:
    values = np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape) * 5 - 4
    if np.dtype(dtype) == np.bool_:
        return values % 3 == 0
    if np.dtype(dtype).kind == "u":
        return np.abs(values).astype(dtype)
    if dtype is ml_dtypes.bfloat16 or np.dtype(dtype).kind == "f":
        return (values / 4).astype(dtype)
    return values.astype(dtype)


@pytest.mark.parametrize(("dtype", "wire"), NUMERIC, ids=[str(np.dtype(d)) for d, _ in NUMERIC])
@pytest.mark.parametrize("shape", [(2, 3), (0, 4), (), (1, 1, 5)], ids=str)
def test_numeric_tensors_round_trip(dtype, wire, shape):
    array = sample(dtype, shape)

    tensor = array_to_tensor(array)
    back = tensor_to_array(tensor, "x")

    assert tensor.dtype == wire
    assert list(tensor.shape) == list(shape)
    assert len(tensor.content) == array.size * array.itemsize
    assert back.dtype == array.dtype
    assert back.shape == array.shape
    np.testing.assert_array_equal(back, array)


def test_content_is_little_endian_whatever_the_array_byte_order():
    array = np.array([1, 256], dtype=">i4")

    tensor = array_to_tensor(array)

    assert tensor.content == b"\x01\x00\x00\x00\x00\x01\x00\x00"
    np.testing.assert_array_equal(tensor_to_array(tensor, "x"), [1, 256])


def test_decoding_reads_little_endian_bytes():
    tensor = tensor_pb2.Tensor(
        dtype=DataType.DATA_TYPE_INT16, shape=[2], content=b"\x02\x00\x00\x01"
    )

    np.testing.assert_array_equal(tensor_to_array(tensor, "x"), [2, 256])


@pytest.mark.parametrize("length", [0, 23, 25, 48])
def test_a_wrong_byte_length_is_refused_naming_the_input(length):
    tensor = tensor_pb2.Tensor(
        dtype=DataType.DATA_TYPE_FLOAT32, shape=[2, 3], content=b"\x00" * length
    )

    with pytest.raises(InvalidRequest) as info:
        tensor_to_array(tensor, "pixels")

    assert "input 'pixels'" in info.value.message
    assert f"has {length} bytes" in info.value.message
    assert "shape [2, 3] of float32 needs 24" in info.value.message


@pytest.mark.parametrize("shape", [[-1, 3], [2, -4]])
def test_negative_dimensions_are_refused(shape):
    tensor = tensor_pb2.Tensor(dtype=DataType.DATA_TYPE_FLOAT32, shape=shape, content=b"")

    with pytest.raises(InvalidRequest, match=r"input 'x' has an invalid shape \["):
        tensor_to_array(tensor, "x")


def test_too_many_dimensions_are_refused():
    tensor = tensor_pb2.Tensor(dtype=DataType.DATA_TYPE_FLOAT32, shape=[1] * 33, content=b"")

    with pytest.raises(InvalidRequest, match="invalid shape"):
        tensor_to_array(tensor, "x")


@pytest.mark.parametrize(
    ("dtype", "name"),
    [
        (DataType.DATA_TYPE_UNSPECIFIED, "DATA_TYPE_UNSPECIFIED"),
        (DataType.DATA_TYPE_STRING, "DATA_TYPE_STRING"),
        (99, "99"),
    ],
)
def test_non_numeric_dtypes_are_refused(dtype, name):
    tensor = tensor_pb2.Tensor(dtype=dtype, shape=[1], content=b"\x00")

    with pytest.raises(InvalidRequest, match=f"dtype {name} is not supported"):
        tensor_to_array(tensor, "x")


@pytest.mark.parametrize("state", list(JobState))
def test_job_states_map_to_the_wire(state):
    job = Job(id="j1", kind=JobKind.TRAIN, model_name="m", queue="train", request={}, state=state)

    assert training_pb2.JobState.Name(job_to_proto(job).state) == f"JOB_STATE_{state.value}"


@pytest.mark.parametrize("kind", list(JobKind))
def test_job_kinds_map_to_the_wire(kind):
    job = Job(id="j1", kind=kind, model_name="m", queue="train", request={})

    assert training_pb2.JobKind.Name(job_to_proto(job).kind) == f"JOB_KIND_{kind.value}"


def test_a_finished_job_maps_every_field():
    job = Job(
        id="j1",
        kind=JobKind.TRAIN,
        model_name="mnist",
        queue="cpu",
        request={"model_name": "mnist", "fit": {"epochs": 2}},
        state=JobState.FAILED,
        attempt=2,
        created_at=100.5,
        started_at=101.0,
        finished_at=0.0,
        metrics={"loss": 0.25},
        model_version=3,
        error_reason="INVALIDREQUEST",
        error_message="bad layer",
        labels={"team": "vision"},
        history=[{"epoch": 0, "logs": {"loss": 0.5}}, {"epoch": 1, "logs": {"loss": 0.25}}],
    )

    proto = job_to_proto(job)

    assert proto.id == "j1"
    assert (proto.model_name, proto.queue, proto.attempt) == ("mnist", "cpu", 2)
    assert proto.queue_position == -1  # unknown unless the caller found it
    assert job_to_proto(job, queue_position=4).queue_position == 4
    assert dict(proto.metrics) == {"loss": 0.25}
    assert proto.model_version == 3
    assert (proto.error.reason, proto.error.message) == ("INVALIDREQUEST", "bad layer")
    assert proto.created_at.ToNanoseconds() == 100_500_000_000
    assert proto.started_at.seconds == 101
    assert not proto.HasField("finished_at")
    assert json.loads(proto.request_json) == job.request
    assert dict(proto.labels) == {"team": "vision"}
    assert [(e.epoch, dict(e.logs)) for e in proto.history] == [
        (0, {"loss": 0.5}),
        (1, {"loss": 0.25}),
    ]


def test_a_job_without_error_has_no_error_field():
    job = Job(id="j1", kind=JobKind.TRAIN, model_name="m", queue="train", request={})

    proto = job_to_proto(job)

    assert not proto.HasField("error")
    assert not proto.HasField("created_at")


def _train_spec(**fields: object) -> Any:
    from service.domain.job_specs import parse_train

    request = training_pb2.TrainRequest(
        model_name="m",
        model=training_pb2.ModelSpec(
            layers=training_pb2.LayerList(
                layers=[converters_struct({"type": "Dense", "units": 1, "input_shape": [2]})]
            )
        ),
        compile=training_pb2.CompileOptions(loss=training_pb2.NamedConfig(name="mse")),
        dataset=training_pb2.DatasetRef(builtin="mnist"),
        **fields,
    )
    return parse_train(converters.train_request_data(request))


def converters_struct(values: dict[str, Any]) -> Any:
    from google.protobuf import struct_pb2

    message = struct_pb2.Struct()
    message.update(values)
    return message


def test_zero_values_that_mean_something_reach_the_spec():
    plateau = training_pb2.ReduceLROnPlateau(
        enabled=True, monitor="loss", patience=0, min_delta=0.0
    )
    spec = _train_spec(
        fit=training_pb2.FitOptions(shuffle=False),
        callbacks=training_pb2.CallbackOptions(reduce_lr_on_plateau=plateau),
    )
    assert spec.fit.shuffle is False
    assert spec.callbacks.reduce_lr_on_plateau.patience == 0
    assert spec.callbacks.reduce_lr_on_plateau.min_delta == 0.0


def test_unset_fields_keep_the_keras_defaults():
    plateau = training_pb2.ReduceLROnPlateau(enabled=True, monitor="loss")
    spec = _train_spec(callbacks=training_pb2.CallbackOptions(reduce_lr_on_plateau=plateau))
    assert (spec.fit.epochs, spec.fit.batch_size, spec.fit.shuffle) == (1, 32, True)
    plateau_spec = spec.callbacks.reduce_lr_on_plateau
    assert (plateau_spec.patience, plateau_spec.min_delta, plateau_spec.factor) == (10, 1e-4, 0.1)
    assert spec.callbacks.batch_progress_interval_seconds == 1.0


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"fit": training_pb2.FitOptions(epochs=0)}, "fit.epochs"),
        ({"fit": training_pb2.FitOptions(batch_size=0)}, "fit.batch_size"),
        (
            {"callbacks": training_pb2.CallbackOptions(batch_progress_interval_seconds=0)},
            "callbacks.batch_progress_interval_seconds",
        ),
        (
            {
                "callbacks": training_pb2.CallbackOptions(
                    reduce_lr_on_plateau=training_pb2.ReduceLROnPlateau(factor=0)
                )
            },
            "callbacks.reduce_lr_on_plateau.factor",
        ),
    ],
)
def test_an_explicit_zero_where_zero_is_invalid_is_refused_not_defaulted(fields, field):
    with pytest.raises(InvalidRequest) as info:
        _train_spec(**fields)
    assert info.value.field == field
