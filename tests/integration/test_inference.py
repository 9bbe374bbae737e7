"""The data plane against real parts: batching, overload, hot reload, feedback, TF Serving.

Most tests use a second in-process server with the inference role only, configured for the
case (per-model batching knobs, a store poll too slow to matter, so a switch observed here
came from a Redis event). Models are trained on the session's real worker.
"""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import cast

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from prometheus_client.parser import text_string_to_metric_families

import fitserve
from fitserve.v1 import inference_pb2
from service.config import BatchingOverride, BatchingSettings, InferenceSettings, Settings
from tests.conftest import RunningServer, run_server, stop_server
from tests.integration.conftest import MLP_LAYERS

pytestmark = pytest.mark.integration
Digits = tuple[np.ndarray, np.ndarray]
WAIT = 60.0  # seconds; a bound on polls for something that should happen soon


def _train(client: fitserve.Client, digits: Digits, name: str, seed: int = 0) -> int:
    x, y = digits
    ds = client.upload_dataset(f"{name}-data", x=x[:64], y=y[:64])
    job = client.train(
        name,
        layers=MLP_LAYERS,
        loss="sparse_categorical_crossentropy",
        dataset=ds,
        epochs=1,
        seed=seed,
    )
    return job.wait(timeout=120).model_version


def _poll(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)  # the polling period


def _metric(server: RunningServer, name: str, **labels: str) -> float:
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        body = response.read().decode()
    total = 0.0
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                total += sample.value
    return total


@pytest.fixture(scope="module")
def inference(settings: Settings) -> Iterator[RunningServer]:
    """An inference-only server with batching knobs for the cases below."""
    batching = BatchingSettings(
        models={
            "inf-batching": BatchingOverride(max_batch_size=8, batch_timeout_ms=2000),
            "inf-overload": BatchingOverride(max_batch_size=1, max_queue=1),
        }
    )
    custom = settings.model_copy(
        update={
            "roles": ["inference"],
            "batching": batching,
            # the batcher's own bounds are tested here; shedding has a test of its own
            "inference": InferenceSettings(reload_poll_seconds=3600, max_queue_wait_ms=None),
        }
    )
    running, thread = run_server(custom)
    yield running
    stop_server(running, thread)


@pytest.fixture(scope="module")
def versions(server: RunningServer, worker: object, digits: Digits) -> dict[str, int]:
    """The models of this module, trained once on the session's worker."""
    with fitserve.Client(server.target, timeout=120) as c:
        return {n: _train(c, digits, n) for n in ("inf-batching", "inf-overload", "inf-switch")}


@pytest.fixture
def on_inference(inference: RunningServer) -> Iterator[fitserve.Client]:
    with fitserve.Client(inference.target, timeout=60) as c:
        yield c


# ---- batching and overload -------------------------------------------------------------


def test_concurrent_callers_are_batched_and_a_lone_caller_is_not(
    versions: dict[str, int],
    on_inference: fitserve.Client,
    inference: RunningServer,
    digits: Digits,
) -> None:
    name = "inf-batching"
    version = versions[name]
    x = digits[0][:1]
    labels = {"model": name, "version": str(version)}
    for _ in range(3):
        on_inference.predict(name, x)
    lone = _metric(inference, "fitserve_predict_batch_requests_count", **labels)
    ones = _metric(inference, "fitserve_predict_batch_requests_bucket", le="1.0", **labels)
    assert lone == ones == 3  # three calls, three batches of one request

    with ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(lambda _: on_inference.predict(name, x), range(64)))

    assert all(o.shape == (1, 10) for o in outs)
    batches = _metric(inference, "fitserve_predict_batch_requests_count", **labels) - 3
    assert batches < 64  # some calls shared a batch
    assert _metric(inference, "fitserve_predict_batch_requests_sum", **labels) == 3 + 64


def test_overload_is_refused_with_a_retry_hint_and_the_server_keeps_serving(
    versions: dict[str, int],
    inference: RunningServer,
    digits: Digits,
) -> None:
    name = "inf-overload"
    x = np.repeat(digits[0][:1], 256, axis=0)
    refused: list[grpc.RpcError] = []
    with grpc.insecure_channel(inference.target) as channel:
        sdk = fitserve.Client(channel=channel)
        deadline = time.monotonic() + WAIT
        while not refused:  # bursts until the queue of one overflows
            assert time.monotonic() < deadline, "no burst overflowed a queue of one"
            refused += _burst(lambda: sdk.predict(name, x), 16)
        assert sdk.predict(name, x[:2]).shape == (2, 10)

    error = refused[0]
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
    assert "queue is full (1 requests); retry in" in error.details()  # type: ignore[attr-defined]
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    hints = [d for d in status.details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
    assert len(hints) == 1
    assert _metric(inference, "fitserve_predict_rejections_total", model=name, reason="queue_full")
    assert _metric(
        inference, "fitserve_predict_requests_total", model=name, code="RESOURCE_EXHAUSTED"
    ) == len(refused)


def test_calls_waiting_in_grpcs_queue_are_shed_and_control_calls_never_are(
    versions: dict[str, int], settings: Settings, digits: Digits
) -> None:
    """With a queue-wait bound of 1 µs, any backlog in gRPC's own queue sheds Predict."""
    name, x = "inf-batching", digits[0][:1]
    refused: list[grpc.RpcError] = []
    with _inference_server(settings, max_queue_wait_ms=0.001) as running:
        with grpc.insecure_channel(running.target) as channel:
            sdk = fitserve.Client(channel=channel)
            health_stub = health_pb2_grpc.HealthStub(channel)
            _poll(lambda: _admitted(sdk, name, x), "an idle server to admit a Predict")
            deadline = time.monotonic() + WAIT
            while not refused:  # bursts until calls queue up in gRPC before the handlers
                assert time.monotonic() < deadline, "no burst left calls waiting in gRPC"
                refused += _burst(lambda: sdk.predict(name, x), 64)
                reply = health_stub.Check(health_pb2.HealthCheckRequest(), timeout=WAIT)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            # once the burst has drained, the next call is admitted: the server kept serving
            _poll(lambda: _admitted(sdk, name, x), "the server to admit Predict again")
        error = refused[0]
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
        message = error.details()  # type: ignore[attr-defined]
        assert "server overloaded: calls now wait about" in message
        assert "FITSERVE_INFERENCE__MAX_QUEUE_WAIT_MS" in message
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
        assert status is not None
        assert any(d.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for d in status.details)
        assert _metric(running, "fitserve_predict_rejections_total", reason="overloaded") >= len(
            refused
        )


@contextmanager
def _inference_server(settings: Settings, **inference: object) -> Iterator[RunningServer]:
    """An inference-only server of one test's own, with these inference settings."""
    own = settings.model_copy(
        update={
            "roles": ["inference"],
            "inference": InferenceSettings(reload_poll_seconds=3600, **inference),  # type: ignore[arg-type]
        }
    )
    running, thread = run_server(own)
    try:
        yield running
    finally:
        stop_server(running, thread)


def _admitted(sdk: fitserve.Client, name: str, x: np.ndarray) -> bool:
    try:
        return sdk.predict(name, x).shape == (1, 10)
    except fitserve.ResourceExhaustedError:
        return False


def _burst(call: Callable[[], object], callers: int) -> list[grpc.RpcError]:
    start = threading.Barrier(callers)

    def one(_: int) -> grpc.RpcError | None:
        start.wait()
        try:
            call()
        except fitserve.ResourceExhaustedError as exc:
            return cast(grpc.RpcError, exc.__cause__)
        return None

    with ThreadPoolExecutor(callers) as pool:
        return [e for e in pool.map(one, range(callers)) if e is not None]


def test_an_expired_deadline_is_refused_with_deadline_exceeded(
    versions: dict[str, int], on_inference: fitserve.Client, digits: Digits
) -> None:
    name = "inf-batching"
    with pytest.raises(fitserve.DeadlineExceededError):
        on_inference.predict(name, digits[0][:1], timeout=0.000001)
    assert on_inference.predict(name, digits[0][:1]).shape == (1, 10)


# ---- versions: hot reload, warm switch, drain --------------------------------------------


def test_an_alias_switch_under_concurrent_load_fails_no_request(
    versions: dict[str, int],
    client: fitserve.Client,
    on_inference: fitserve.Client,
    digits: Digits,
) -> None:
    name, x = "inf-switch", digits[0][:1]
    v1 = versions[name]
    v2 = _train(client, digits, name, seed=1)
    client.set_alias(name, "live", v1)
    seen: set[int] = set()
    errors: list[Exception] = []
    stop = threading.Event()

    def caller() -> None:
        while not stop.is_set():
            try:
                seen.add(on_inference.predict_full(name, x, alias="live").version)
            except Exception as exc:
                errors.append(exc)

    threads = [threading.Thread(target=caller) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        for target in (v2, v1, v2):
            client.set_alias(name, "live", target)  # via the api server; Redis tells ours
            _poll(lambda t=target: _answers(on_inference, name, x, t), f"version {target}")
    finally:
        stop.set()
        for t in threads:
            t.join(WAIT)

    assert errors == []
    assert seen == {v1, v2}
    _poll(lambda: _state(on_inference, name, v1) == "STATE_NOT_LOADED", "v1 to unload")
    assert _state(on_inference, name, v2) == "STATE_AVAILABLE"


def _answers(sdk: fitserve.Client, name: str, x: np.ndarray, version: int) -> bool:
    return sdk.predict_full(name, x, alias="live").version == version


def _state(sdk: fitserve.Client, name: str, version: int) -> str:
    status = sdk.model_status(name, version)
    return inference_pb2.ModelVersionStatus.State.Name(status.versions[0].state)


def test_a_published_version_takes_over_the_default_route(
    client: fitserve.Client, on_inference: fitserve.Client, digits: Digits
) -> None:
    name, x = "inf-publish", digits[0][:1]
    v1 = _train(client, digits, name)
    assert on_inference.predict_full(name, x).version == v1
    v2 = _train(client, digits, name, seed=1)  # the worker publishes a Redis event

    _poll(lambda: on_inference.predict_full(name, x).version == v2, "the new version")


# ---- feedback ----------------------------------------------------------------------------


def test_feedback_moves_the_accuracy_counters_once_per_request(
    versions: dict[str, int],
    on_inference: fitserve.Client,
    inference: RunningServer,
    digits: Digits,
) -> None:
    name = "inf-batching"
    labels = {"model": name, "version": str(versions[name]), "output": "output_0"}
    before = _metric(inference, "fitserve_feedback_correct_total", **labels)
    rows_before = _metric(inference, "fitserve_feedback_rows_total", **labels)
    prediction = on_inference.predict_full(name, digits[0][:5])
    predicted = prediction.outputs["output_0"].argmax(axis=1)
    truth = predicted.copy()
    truth[0] = (truth[0] + 1) % 10  # one wrong

    reply = on_inference.feedback(prediction.request_id, truth)

    assert (reply.model_name, reply.version, reply.rows, reply.correct, reply.output) == (
        name,
        versions[name],
        5,
        4,
        "output_0",
    )
    assert _metric(inference, "fitserve_feedback_correct_total", **labels) == before + 4
    assert _metric(inference, "fitserve_feedback_rows_total", **labels) == rows_before + 5
    with pytest.raises(fitserve.NotFoundError, match="accepted once per request id"):
        on_inference.feedback(prediction.request_id, truth)


def test_feedback_reaches_any_replica_and_checks_the_labels(
    versions: dict[str, int],
    client: fitserve.Client,
    on_inference: fitserve.Client,
    digits: Digits,
) -> None:
    prediction = on_inference.predict_full("inf-batching", digits[0][:3])
    with pytest.raises(fitserve.InvalidArgumentError, match=r"had 3 rows, so send \[3\]"):
        client.feedback(prediction.request_id, np.array([1, 2]))
    reply = client.feedback(prediction.request_id, np.array([1, 2, 3]))  # the other server
    assert reply.rows == 3


def test_predictions_not_sampled_for_feedback_answer_not_found_saying_so(
    versions: dict[str, int], settings: Settings, digits: Digits
) -> None:
    with (
        _inference_server(settings, feedback_sample_rate=0.0) as running,
        fitserve.Client(running.target, timeout=60) as sdk,
    ):
        prediction = sdk.predict_full("inf-batching", digits[0][:2])
        assert prediction.outputs["output_0"].shape == (2, 10)  # Predict itself is served
        with pytest.raises(
            fitserve.NotFoundError, match="only 0% of predictions are kept for feedback"
        ):
            sdk.feedback(prediction.request_id, np.array([1, 2]))


# ---- inputs ------------------------------------------------------------------------------


def test_nan_inputs_are_refused_naming_the_input(
    versions: dict[str, int], on_inference: fitserve.Client, digits: Digits
) -> None:
    x = digits[0][:2].copy()
    x[1, 3, 4] = np.nan
    with pytest.raises(fitserve.InvalidArgumentError, match="input 'x' contains NaN"):
        on_inference.predict("inf-batching", x)


# ---- TF Serving compatibility ------------------------------------------------------------


def test_tf_serving_predict_answers_like_fitserve_predict(
    versions: dict[str, int],
    on_inference: fitserve.Client,
    inference: RunningServer,
    digits: Digits,
) -> None:
    import tensorflow as tf
    from tensorflow_serving.apis import (  # type: ignore[import-untyped]
        get_model_metadata_pb2,
        predict_pb2,
        prediction_service_pb2_grpc,
    )

    name, x = "inf-batching", digits[0][:4]
    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    request.model_spec.version.value = versions[name]
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(x))
    with grpc.insecure_channel(inference.target) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        reply = stub.Predict(request, timeout=30)
        metadata = stub.GetModelMetadata(
            get_model_metadata_pb2.GetModelMetadataRequest(
                model_spec=request.model_spec, metadata_field=["signature_def"]
            ),
            timeout=30,
        )

    ours = on_inference.predict(name, x, version=versions[name])
    np.testing.assert_array_equal(tf.make_ndarray(reply.outputs["output_0"]), ours)
    assert (reply.model_spec.name, reply.model_spec.version.value) == (name, versions[name])
    signatures = get_model_metadata_pb2.SignatureDefMap()
    metadata.metadata["signature_def"].Unpack(signatures)
    x_info = signatures.signature_def["serving_default"].inputs["x"]
    assert [d.size for d in x_info.tensor_shape.dim] == [-1, 28, 28]


def test_tf_serving_version_label_is_an_alias_and_bad_specs_are_refused(
    versions: dict[str, int], client: fitserve.Client, inference: RunningServer, digits: Digits
) -> None:
    import tensorflow as tf
    from tensorflow_serving.apis import (  # type: ignore[import-untyped]
        predict_pb2,
        prediction_service_pb2_grpc,
    )

    name = "inf-overload"
    client.set_alias(name, "canary", versions[name])
    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    request.model_spec.version_label = "canary"
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(digits[0][:1]))
    with grpc.insecure_channel(inference.target) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        assert stub.Predict(request, timeout=30).model_spec.version.value == versions[name]
        request.model_spec.signature_name = "classify"
        with pytest.raises(grpc.RpcError) as error:
            stub.Predict(request, timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert "signature 'classify' not found" in error.value.details()  # type: ignore[attr-defined]


# ---- health ------------------------------------------------------------------------------


def test_inference_health_is_not_serving_until_its_preload_models_are_loaded(
    settings: Settings, client: fitserve.Client, digits: Digits
) -> None:
    custom = settings.model_copy(
        update={
            "roles": ["inference"],
            "inference": InferenceSettings(preload_models=["inf-preload"], reload_poll_seconds=0.2),
        }
    )
    running, thread = run_server(custom)
    try:
        with grpc.insecure_channel(running.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)

            def status(service: str) -> int:
                request = health_pb2.HealthCheckRequest(service=service)
                return int(health.Check(request, timeout=5).status)

            services = ["fitserve.v1.InferenceService", "tensorflow.serving.PredictionService"]
            assert {status(s) for s in services} == {health_pb2.HealthCheckResponse.NOT_SERVING}
            _train(client, digits, "inf-preload")  # the model appears; the preload retries
            serving = health_pb2.HealthCheckResponse.SERVING
            _poll(lambda: {status(s) for s in services} == {serving}, "SERVING")
            sdk = fitserve.Client(channel=channel)
            assert _state(sdk, "inf-preload", 1) == "STATE_AVAILABLE"
    finally:
        stop_server(running, thread)
