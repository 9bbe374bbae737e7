"""Deadlines and retries of Client and AsyncClient, against servicers on a real gRPC server
over loopback whose answers each test sets: which calls are retried, on which codes, after
whose hint."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from concurrent import futures

import grpc
import grpc.aio
import pytest

import fitserve
from fitserve import _calls
from fitserve import _client as fitserve_client
from fitserve.v1 import training_pb2, training_pb2_grpc
from service.api.status import to_status
from service.errors import ResourceExhausted, Unavailable


class Training(training_pb2_grpc.TrainingServiceServicer):
    """Refuses the first `refusals` calls of each method with `refusal`, answers after."""

    def __init__(self) -> None:
        self.refusal: grpc.Status = to_status(Unavailable("restarting; retry shortly"))
        self.refusals = 0
        self.calls: dict[str, int] = {}
        self.block = False
        self.unblocked = threading.Event()

    def _answer(self, method: str, context: grpc.ServicerContext) -> None:
        self.calls[method] = self.calls.get(method, 0) + 1
        if self.block:  # until the client gives up on the call (or the test ends)
            ended = threading.Event()
            context.add_callback(ended.set)
            while not (ended.wait(0.05) or self.unblocked.is_set()):
                pass
            context.abort(grpc.StatusCode.CANCELLED, "test over")
        if self.calls[method] <= self.refusals:
            context.abort_with_status(self.refusal)

    def Train(self, request, context):
        self._answer("Train", context)
        return training_pb2.TrainResponse(job=training_pb2.Job(id="j1", state=1))

    def GetJob(self, request, context):
        self._answer("GetJob", context)
        return training_pb2.Job(id=request.job_id, state=training_pb2.JOB_STATE_SUCCEEDED)

    def CancelJob(self, request, context):
        self._answer("CancelJob", context)
        return training_pb2.Job(id=request.job_id, state=training_pb2.JOB_STATE_CANCELLED)


@pytest.fixture
def training() -> Iterator[tuple[str, Training]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    port = server.add_insecure_port("127.0.0.1:0")
    servicer = Training()
    training_pb2_grpc.add_TrainingServiceServicer_to_server(servicer, server)
    server.start()
    yield f"127.0.0.1:{port}", servicer
    servicer.unblocked.set()
    server.stop(None)


LAYERS = [{"type": "Dense", "units": 1, "input_shape": [2]}]


def _train(client: fitserve.Client, **options: str) -> fitserve.Job:
    return client.train("m", layers=LAYERS, loss="mse", dataset="d", **options)  # type: ignore[arg-type]


def test_train_without_an_idempotency_key_is_never_retried(training):
    target, servicer = training
    servicer.refusals = 1
    with (
        fitserve.Client(target, timeout=10) as client,
        pytest.raises(fitserve.UnavailableError, match="restarting"),
    ):
        _train(client)
    assert servicer.calls == {"Train": 1}


def test_train_with_an_idempotency_key_is_retried_on_unavailable(training):
    target, servicer = training
    servicer.refusals = 2
    with fitserve.Client(target, timeout=10) as client:
        assert _train(client, idempotency_key="k1").id == "j1"
    assert servicer.calls == {"Train": 3}


def test_a_shed_train_with_a_key_waits_for_the_servers_hint(training, monkeypatch):
    target, servicer = training
    servicer.refusals = 1
    servicer.refusal = to_status(ResourceExhausted("server overloaded", 0.25))
    pauses: list[float] = []
    monkeypatch.setattr(fitserve_client.time, "sleep", pauses.append)
    with fitserve.Client(target, timeout=10) as client:
        assert _train(client, idempotency_key="k2").id == "j1"
    assert servicer.calls == {"Train": 2}
    assert pauses == [0.25]  # the pushback the server sent, not the client's backoff


def test_a_resource_exhausted_without_a_hint_is_not_retried(training):
    target, servicer = training
    servicer.refusals = 1
    servicer.refusal = to_status(ResourceExhausted("request too big"))  # pushback -1
    with (
        fitserve.Client(target, timeout=10) as client,
        pytest.raises(fitserve.ResourceExhaustedError, match="too big"),
    ):
        _train(client, idempotency_key="k3")
    assert servicer.calls == {"Train": 1}


def test_reads_are_retried_by_the_channel_and_cancel_is_not(training):
    target, servicer = training
    servicer.refusals = 2
    with fitserve.Client(target, timeout=10) as client:
        assert client.get_job("j1").state == fitserve.JobState.SUCCEEDED
        with pytest.raises(fitserve.UnavailableError):
            client.cancel_job("j1")
    assert servicer.calls == {"GetJob": 3, "CancelJob": 1}


def test_retry_attempts_of_one_turn_retries_off(training):
    target, servicer = training
    servicer.refusals = 1
    with fitserve.Client(target, timeout=10, retry_attempts=1) as client:
        with pytest.raises(fitserve.UnavailableError):
            client.get_job("j1")
        with pytest.raises(fitserve.UnavailableError):
            _train(client, idempotency_key="k4")
    assert servicer.calls == {"GetJob": 1, "Train": 1}


@pytest.mark.parametrize("attempts", [0, -1])
def test_retry_attempts_below_one_are_refused(attempts):
    with pytest.raises(ValueError, match="retry_attempts and predict_attempts must be >= 1"):
        fitserve.Client("127.0.0.1:1", retry_attempts=attempts)
    with pytest.raises(ValueError, match="must be >= 1"):
        fitserve.AsyncClient("127.0.0.1:1", predict_attempts=attempts)


def test_a_call_past_the_clients_default_deadline_raises_deadline_exceeded(training):
    target, servicer = training
    servicer.block = True
    with fitserve.Client(target, timeout=0.3) as client:
        with pytest.raises(fitserve.DeadlineExceededError):
            client.job_record("j1")
        with pytest.raises(fitserve.DeadlineExceededError):  # Train with a key: the same
            _train(client, idempotency_key="k5")
    assert servicer.calls == {"GetJob": 1, "Train": 1}  # a lapsed deadline is not retried


def test_a_per_call_timeout_overrides_the_clients(training):
    target, servicer = training
    servicer.block = True
    with (
        fitserve.Client(target, timeout=None) as client,  # none: only the call's own
        pytest.raises(fitserve.DeadlineExceededError),
    ):
        client.job_record("j1", timeout=0.3)


def test_async_client_deadlines_and_retries(training):
    target, servicer = training

    async def unkeyed() -> None:
        servicer.refusals = 1
        async with fitserve.AsyncClient(target, timeout=10) as client:
            with pytest.raises(fitserve.UnavailableError):
                await client.train("m", layers=LAYERS, loss="mse", dataset="d")

    asyncio.run(unkeyed())
    assert servicer.calls == {"Train": 1}  # no key: not retried

    async def keyed() -> None:
        async with fitserve.AsyncClient(target, timeout=10) as client:
            servicer.refusals, servicer.calls = 2, {}
            job = await client.train(
                "m", layers=LAYERS, loss="mse", dataset="d", idempotency_key="k"
            )
            assert job.id == "j1"
            assert servicer.calls == {"Train": 3}
            servicer.calls = {}
            assert (await client.get_job("j1")).state == "SUCCEEDED"
            assert servicer.calls == {"GetJob": 3}  # retried by the channel's policy
            servicer.block = True
            with pytest.raises(fitserve.DeadlineExceededError):
                await client.job_record("j1", timeout=0.3)

    asyncio.run(keyed())


def test_the_retry_hint_is_read_from_retry_info_without_pushback():
    status = to_status(ResourceExhausted("busy", 0.5))
    details = [(k, v) for k, v in status.trailing_metadata if k != _calls.PUSHBACK_KEY]

    class Error(grpc.RpcError):
        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.RESOURCE_EXHAUSTED

        def trailing_metadata(self):
            return details

    assert _calls.retry_pause(Error(), 1) == 0.5


def test_the_service_config_retries_only_idempotent_methods():
    import json

    config = json.loads(_calls.service_config(3, 2))
    names = {
        (name["service"].rsplit(".", 1)[-1], name["method"]): c["retryPolicy"]["maxAttempts"]
        for c in config["methodConfig"]
        for name in c["name"]
    }
    assert names[("InferenceService", "Predict")] == 2
    assert names[("TrainingService", "GetJob")] == 3
    for write in ("Train", "FineTune", "Evaluate", "CancelJob", "WatchJob"):
        assert ("TrainingService", write) not in names
    assert ("InferenceService", "Feedback") not in names
    assert json.loads(_calls.service_config(1, 1)) == {}
