"""Hostile inputs against a real in-process server: tensors whose shapes promise more than
they hold, bytes that are not the request message, and bursts of streams. Each is refused
with the right status and a message saying what was expected, and the server keeps serving.

The server here is a private one (its own Redis, no worker) with a 4 MiB message limit and
the benchmarks' reference MLP published, so nothing depends on training.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable, Iterator

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

import fitserve
from bench.models import MODEL, publish_reference
from fitserve.v1 import (
    dataset_pb2,
    inference_pb2,
    inference_pb2_grpc,
    tensor_pb2,
    training_pb2,
)
from service.config import Settings
from tests.conftest import RunningServer, private_stack

pytestmark = pytest.mark.integration
LIMIT = 4 * 1024 * 1024
MIB = 1024 * 1024
WAIT = 30.0  # seconds; a bound on polls for something that should happen soon
LAYERS = [{"type": "Dense", "units": 2, "activation": "softmax", "input_shape": [3]}]
Code = grpc.StatusCode


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Settings, RunningServer]]:
    """A private server (4 MiB message limit) with the reference MLP published."""
    root = tmp_path_factory.mktemp("hostile")
    publish_reference(root / "data" / "models", versions=1)
    with private_stack(root, max_message_bytes=LIMIT) as stack:
        yield stack


@pytest.fixture
def channel(hostile: tuple[Settings, RunningServer]) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(hostile[1].target) as ch:
        yield ch


def _images(rows: int) -> np.ndarray:
    return np.random.default_rng(0).random((rows, 28, 28), dtype=np.float32)


def _still_serving(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == (
        health_pb2.HealthCheckResponse.SERVING
    )
    assert fitserve.Client(channel=channel).predict(MODEL, _images(2)).shape == (2, 10)


def _tf_request(tensor: object) -> object:
    from tensorflow_serving.apis import predict_pb2  # type: ignore[import-untyped]

    request = predict_pb2.PredictRequest()
    request.model_spec.name = MODEL
    request.inputs["x"].CopyFrom(tensor)
    return request


def _tf_predict(channel: grpc.Channel, request: object) -> object:
    from tensorflow_serving.apis import prediction_service_pb2_grpc  # type: ignore[import-untyped]

    return prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=60)


def _declared(*shape: int) -> object:
    """A float TensorProto with a shape and no values: ~30 bytes, whatever the shape."""
    from tensorflow.core.framework import tensor_pb2 as tf_tensor_pb2
    from tensorflow.core.framework import types_pb2

    proto = tf_tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT)
    for size in shape:
        proto.tensor_shape.dim.add(size=size)
    return proto


# ---- TF Serving: content must match the declared shape -----------------------------------


def test_a_tf_serving_shape_without_values_is_refused_before_it_is_allocated(
    channel: grpc.Channel,
) -> None:
    request = _tf_request(_declared(4096, 28, 28))  # tf.make_ndarray: 12 MiB of zeros
    assert len(request.SerializeToString()) < 64  # type: ignore[attr-defined]

    tracemalloc.start()  # the server runs in this process: its numpy allocations are traced
    try:
        with pytest.raises(grpc.RpcError) as refused:
            _tf_predict(channel, request)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert refused.value.code() == Code.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert refused.value.details() == (  # type: ignore[attr-defined]
        "input 'x' has 0 values in float_val; shape [4096, 28, 28] of float32 needs 3211264 "
        "(or exactly 1, broadcast to the shape), or 12845056 bytes of tensor_content"
    )
    assert peak < 8 * MIB
    _still_serving(channel)


def test_tf_serving_values_short_of_the_shape_are_refused_not_padded(
    channel: grpc.Channel,
) -> None:
    import tensorflow as tf

    request = _tf_request(
        tf.make_tensor_proto(np.zeros(10, np.float32).tolist(), shape=[4, 28, 28])
    )

    with pytest.raises(grpc.RpcError) as refused:
        _tf_predict(channel, request)

    assert refused.value.code() == Code.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert "has 10 values in float_val; shape [4, 28, 28] of float32 needs 3136" in (
        refused.value.details()  # type: ignore[attr-defined]
    )


def test_a_tf_serving_broadcast_is_served_within_the_limit_and_refused_past_it(
    channel: grpc.Channel,
) -> None:
    import tensorflow as tf

    broadcast = _tf_predict(channel, _tf_request(tf.make_tensor_proto(0.5, shape=[2, 28, 28])))
    whole = _tf_predict(
        channel, _tf_request(tf.make_tensor_proto(np.full((2, 28, 28), 0.5, np.float32)))
    )
    np.testing.assert_array_equal(
        tf.make_ndarray(broadcast.outputs["output_0"]),  # type: ignore[attr-defined]
        tf.make_ndarray(whole.outputs["output_0"]),  # type: ignore[attr-defined]
    )

    with pytest.raises(grpc.RpcError) as refused:  # 6.1 MiB from one value, over 4 MiB
        _tf_predict(channel, _tf_request(tf.make_tensor_proto(0.5, shape=[2048, 28, 28])))

    assert refused.value.code() == Code.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
    details = refused.value.details()  # type: ignore[attr-defined]
    assert "input 'x' decodes to 6422528 bytes (1 value broadcast to shape [2048, 28, 28])" in (
        details
    )
    assert f"limit of {LIMIT} bytes per request (FITSERVE_MAX_MESSAGE_BYTES)" in details
    _still_serving(channel)


# ---- fitserve Predict: shapes --------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ([0, 2**62], "input 'x' has an invalid shape [0, 4611686018427387904]: its non-zero"),
        ([0, 2**31, 2**31], "its non-zero dimensions multiply past the 4194304 elements"),
        ([2**40, 2**40], "its non-zero dimensions multiply past"),
        ([1] * 100_000, "input 'x' has an invalid shape: more than 32 dimensions"),
    ],
)
def test_fitserve_predict_with_a_shape_no_tensor_can_have_is_invalid(
    channel: grpc.Channel, shape: list[int], message: str
) -> None:
    stub = inference_pb2_grpc.InferenceServiceStub(channel)
    request = inference_pb2.PredictRequest(
        model=tensor_pb2.ModelRef(name=MODEL),
        inputs={"x": tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=shape)},
    )

    with pytest.raises(grpc.RpcError) as refused:
        stub.Predict(request, timeout=30)

    assert refused.value.code() == Code.INVALID_ARGUMENT  # type: ignore[attr-defined]
    details = refused.value.details()  # type: ignore[attr-defined]
    assert message in details
    assert len(details) < 300
    status = rpc_status.from_call(refused.value)  # type: ignore[arg-type]
    assert status is not None
    fields = [
        v.field
        for d in status.details
        if d.Is(error_details_pb2.BadRequest.DESCRIPTOR)
        for v in _unpacked(d).field_violations
    ]
    assert fields == ["inputs[x]"]
    _still_serving(channel)


def _unpacked(detail: object) -> error_details_pb2.BadRequest:
    out = error_details_pb2.BadRequest()
    detail.Unpack(out)  # type: ignore[attr-defined]
    return out


def test_feedback_labels_with_a_shape_no_tensor_can_have_are_invalid(channel: grpc.Channel) -> None:
    stub = inference_pb2_grpc.InferenceServiceStub(channel)
    labels = tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_INT64, shape=[0, 2**62])

    with pytest.raises(grpc.RpcError) as refused:
        stub.Feedback(inference_pb2.FeedbackRequest(request_id="r", labels=labels), timeout=30)

    assert refused.value.code() == Code.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert "input 'labels' has an invalid shape" in refused.value.details()  # type: ignore[attr-defined]


# ---- bytes that are not the request message ---------------------------------------------


def _deep_train_request(levels: int) -> bytes:
    """A TrainRequest with a layer argument nested ``levels`` lists deep (a Struct)."""
    request = training_pb2.TrainRequest(model_name="deep")
    value = request.model.layers.layers.add().fields["units"]
    for _ in range(levels):
        value = value.list_value.values.add()
    value.number_value = 1
    return request.SerializeToString()


GARBAGE = b"\xff\xff\xff\xff not a protobuf message"
HEADER = dataset_pb2.UploadDatasetRequest(
    header=dataset_pb2.DatasetHeader(name="hostile", format="npz")
).SerializeToString()


@pytest.mark.parametrize(
    ("kind", "method", "messages", "expected"),
    [
        (
            "unary",
            "/fitserve.v1.TrainingService/Train",
            [_deep_train_request(200)],
            "fitserve.v1.TrainRequest: its messages are nested deeper than protobuf's "
            "recursion limit",
        ),
        (
            "unary",
            "/fitserve.v1.InferenceService/Predict",
            [GARBAGE],
            "fitserve.v1.PredictRequest: its bytes are not a serialized protobuf message",
        ),
        (
            "unary",
            "/tensorflow.serving.PredictionService/Predict",
            [GARBAGE],
            "tensorflow.serving.PredictRequest: its bytes are not a serialized",
        ),
        (
            "unary",
            "/fitserve.v1.ModelService/GetModel",
            [b"\x0a\x02\xc3\x28"],  # name: not UTF-8
            "fitserve.v1.GetModelRequest: a string field is not valid UTF-8",
        ),
        (
            "client_stream",
            "/fitserve.v1.DatasetService/UploadDataset",
            [GARBAGE],
            "fitserve.v1.UploadDatasetRequest: its bytes are not a serialized",
        ),
        (
            "client_stream",
            "/fitserve.v1.DatasetService/UploadDataset",
            [HEADER, GARBAGE],
            "fitserve.v1.UploadDatasetRequest: its bytes are not a serialized",
        ),
        (
            "server_stream",
            "/fitserve.v1.TrainingService/WatchJob",
            [GARBAGE],
            "fitserve.v1.WatchJobRequest: its bytes are not a serialized",
        ),
        (
            "bidi",
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
            [GARBAGE],
            "grpc.reflection.v1alpha.ServerReflectionRequest: its bytes are not a serialized",
        ),
    ],
)
def test_bytes_that_are_not_the_request_message_are_invalid_argument(
    channel: grpc.Channel, kind: str, method: str, messages: list[bytes], expected: str
) -> None:
    calls: dict[str, Callable[[], object]] = {
        "unary": lambda: channel.unary_unary(method)(messages[0], timeout=30),
        "client_stream": lambda: channel.stream_unary(method)(iter(messages), timeout=30),
        "server_stream": lambda: list(channel.unary_stream(method)(messages[0], timeout=30)),
        "bidi": lambda: list(channel.stream_stream(method)(iter(messages), timeout=30)),
    }

    with pytest.raises(grpc.RpcError) as refused:
        calls[kind]()

    assert refused.value.code() == Code.INVALID_ARGUMENT  # type: ignore[attr-defined]
    details = refused.value.details()  # type: ignore[attr-defined]
    assert details == f"request is not a valid {expected}" or details.startswith(
        f"request is not a valid {expected}"
    )
    for internal in ("Error parsing", "upb", "Unexpected", "DecodeError", "request id"):
        assert internal not in details
    _still_serving(channel)


def test_well_formed_streams_of_every_kind_still_work_through_the_gate(
    channel: grpc.Channel,
) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    reply = next(iter(reflection.ServerReflectionInfo(iter([request]), timeout=10)))  # bidi
    assert "fitserve.v1.InferenceService" in {s.name for s in reply.list_services_response.service}
    health = health_pb2_grpc.HealthStub(channel)
    watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=10)  # coroutine handler
    assert next(iter(watch)).status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()
