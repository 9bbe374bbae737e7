"""Hostile inputs against a real in-process server: tensors whose shapes promise more than
they hold, bytes that are not the request message, and bursts of streams. Each is refused
with the right status and a message saying what was expected, and the server keeps serving.

The server here is a private one (its own Redis, no worker) with a 4 MiB message limit and
the benchmarks' reference MLP published, so nothing depends on training.
"""

from __future__ import annotations

import asyncio
import logging
import time
import tracemalloc
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from prometheus_client.parser import text_string_to_metric_families

import fitserve
from bench.models import MODEL, publish_reference
from fitserve.v1 import (
    dataset_pb2,
    inference_pb2,
    inference_pb2_grpc,
    tensor_pb2,
    training_pb2,
    training_pb2_grpc,
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


# ---- bursts of cancelled streams, and the bounds on open streams ---------------------------


def _queued_job(target: str) -> str:
    """A job that stays queued (no worker serves this stack), for watchers to wait on."""
    with fitserve.Client(target, timeout=30) as client:
        ds = client.upload_dataset("w-data", x=np.zeros((4, 3), np.float32), y=np.zeros(4))
        return client.train(
            "w", layers=LAYERS, loss="sparse_categorical_crossentropy", dataset=ds
        ).id


def _gauge(running: RunningServer, name: str) -> float:
    url = f"http://127.0.0.1:{running.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        families = text_string_to_metric_families(response.read().decode())
    return sum(s.value for f in families for s in f.samples if s.name == name)


async def _cancelled_watchers(target: str, job_id: str, count: int) -> None:
    """``count`` WatchJob calls at once, all cancelled by their client 0.3 s later: some have
    reached their handler, the rest still wait in gRPC's core."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = training_pb2_grpc.TrainingServiceStub(channel)
        calls = [stub.WatchJob(training_pb2.WatchJobRequest(job_id=job_id)) for _ in range(count)]
        await asyncio.sleep(0.3)
        for call in calls:
            call.cancel()
        await asyncio.sleep(0.5)  # the cancellations reach the server


def test_a_burst_of_cancelled_watchers_leaves_no_calls_counted_waiting_and_predict_unshed(
    hostile: tuple[Settings, RunningServer], caplog: pytest.LogCaptureFixture
) -> None:
    """Before the fix, hundreds of the cancelled calls stayed counted as waiting in gRPC's
    queue for ever (channelz never ends a call cancelled before a handler took it), and
    nearly every idle Predict was shed until restart."""
    _settings, running = hostile
    job_id = _queued_job(running.target)
    with caplog.at_level(logging.INFO, logger="service.api.backlog"):
        asyncio.run(_cancelled_watchers(running.target, job_id, 2000))

        deadline = time.monotonic() + WAIT
        while (queued := _gauge(running, "fitserve_grpc_queued_calls")) > 0:
            assert time.monotonic() < deadline, f"{queued:.0f} calls still counted waiting"
            time.sleep(0.1)  # the polling period
    with fitserve.Client(running.target, timeout=30) as client:
        refused = 0
        for _ in range(40):
            try:
                assert client.predict(MODEL, _images(1)).shape == (1, 10)
            except fitserve.ResourceExhaustedError:
                refused += 1

    assert refused == 0
    # the burst did leave calls the core's counts hold open: this test saw the leak
    assert any(
        "ended in gRPC's core before a handler took them" in r.message for r in caplog.records
    )


async def _first(call: object) -> object:
    return await call.read()  # type: ignore[attr-defined]


async def _refusal(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _first(call)
    return refused.value


async def _admitted_again(open_call: Callable[[], object]) -> object:
    """A new stream, admitted once a slot has freed (the cancellation reached the server)."""
    deadline = time.monotonic() + WAIT
    while True:
        call = open_call()
        try:
            await _first(call)
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
        else:
            return call
        assert code == Code.RESOURCE_EXHAUSTED
        assert time.monotonic() < deadline, "no stream slot freed"
        await asyncio.sleep(0.05)  # the polling period


def test_streams_past_their_bounds_are_refused_naming_the_setting_and_slots_free_as_streams_end(
    tmp_path: Path,
) -> None:
    with private_stack(tmp_path, max_streams=4, max_job_watchers=2) as (_settings, running):
        job_id = _queued_job(running.target)
        asyncio.run(_bounded(running.target, job_id))


async def _bounded(target: str, job_id: str) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        training = training_pb2_grpc.TrainingServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)

        def watch_job() -> object:
            return training.WatchJob(training_pb2.WatchJobRequest(job_id=job_id), timeout=60)

        def watch_health() -> object:
            return health.Watch(health_pb2.HealthCheckRequest(), timeout=60)

        watchers = [watch_job(), watch_job()]
        for call in watchers:
            assert (await _first(call)).HasField("state_changed")  # type: ignore[attr-defined]
        refused = await _refusal(watch_job())
        assert refused.code() == Code.RESOURCE_EXHAUSTED
        assert "too many WatchJob streams open on this server" in (refused.details() or "")
        assert "FITSERVE_MAX_JOB_WATCHERS=2" in (refused.details() or "")

        others = [watch_health(), watch_health()]  # 4 streams open: the server-wide bound
        for call in others:
            await _first(call)
        refused = await _refusal(watch_health())
        assert refused.code() == Code.RESOURCE_EXHAUSTED
        assert "too many streaming calls open" in (refused.details() or "")
        assert "FITSERVE_MAX_STREAMS=4" in (refused.details() or "")
        trailing = dict(refused.trailing_metadata() or ())
        assert trailing.get("grpc-retry-pushback-ms") == "1000"  # waiting helps

        job = await training.GetJob(training_pb2.GetJobRequest(job_id=job_id), timeout=10)
        assert job.state == training_pb2.JOB_STATE_QUEUED  # unary calls are not bounded

        others[0].cancel()  # type: ignore[attr-defined]
        others.append(await _admitted_again(watch_health))
        watchers[0].cancel()  # type: ignore[attr-defined]
        watchers.append(await _admitted_again(watch_job))

        # end the rest as streams end: the job's end closes its watchers
        await training.CancelJob(training_pb2.CancelJobRequest(job_id=job_id), timeout=10)
        for call in watchers[1:]:
            while await _first(call) is not grpc.aio.EOF:
                pass
        for call in others[1:]:
            call.cancel()  # type: ignore[attr-defined]
