"""Following a job through an outage: retried for a time budget with capped, jittered
backoff, resumed from the last event (each once, in order); codes retrying cannot cure
raise at once. Against the fake servicers of test_client on a real gRPC server."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

import fitserve
from fitserve import _job, cli
from fitserve.v1 import training_pb2, training_pb2_grpc
from tests.unit.clients.test_client import Fakes, epoch_event, state_event

JobState = training_pb2.JobState
UNAVAILABLE = (grpc.StatusCode.UNAVAILABLE, ())


@pytest.fixture
def fakes() -> Iterator[Fakes]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    port = server.add_insecure_port("127.0.0.1:0")
    fakes = Fakes(target=f"127.0.0.1:{port}")
    training_pb2_grpc.add_TrainingServiceServicer_to_server(fakes.training, server)
    server.start()
    yield fakes
    server.stop(grace=None).wait()


@pytest.fixture
def client(fakes: Fakes) -> Iterator[fitserve.Client]:
    with fitserve.Client(fakes.target, timeout=10) as client:
        yield client


def _running(fakes: Fakes) -> None:
    fakes.training.jobs["job-1"] = training_pb2.Job(id="job-1", state=JobState.JOB_STATE_RUNNING)


def test_an_outage_longer_than_the_old_five_retries_is_ridden_out_without_gaps(fakes, monkeypatch):
    pauses: list[float] = []
    monkeypatch.setattr(_job, "_nap", pauses.append)  # the outage, without waiting it out
    fakes.training.events = [
        state_event(1, JobState.JOB_STATE_RUNNING),
        epoch_event(2, 1, 0.9),
        epoch_event(3, 2, 0.4),
        state_event(4, JobState.JOB_STATE_SUCCEEDED),
    ]
    fakes.training.drop_after = {"2"}
    _running(fakes)

    with fitserve.Client(fakes.target, timeout=10) as following:
        job = following.get_job("job-1")
        events = job.events()
        first = [next(events), next(events)]  # the stream drops after event 2
        fakes.training.watch_failures = [UNAVAILABLE] * 12  # then 12 calls fail: ~40 s
        rest = list(events)

    assert [e.event_id for e in first + rest] == ["1", "2", "3", "4"]
    afters = [r.after_event_id for r in fakes.training.watch_requests]
    assert afters == ["", *["2"] * 13]  # every retry resumes after the last event seen
    assert len(pauses) == 13  # the dropped stream, then the 12 failed calls
    assert sum(pauses) > 6.2  # past where the old 5 retries gave up


def test_the_backoff_grows_to_a_cap_with_jitter_and_restarts_after_an_event(monkeypatch):
    pauses: list[float] = []
    monkeypatch.setattr(_job, "_nap", pauses.append)
    outage = _job._Outage(None, None, lambda: "late")
    error = _FakeRpcError(grpc.StatusCode.UNAVAILABLE)
    for _ in range(10):
        outage.pause_or_raise(error, fitserve.UnavailableError("down"))
    outage.ended()
    outage.pause_or_raise(error, fitserve.UnavailableError("down"))

    steps = [0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0, 5.0, 5.0, 0.2]
    for pause, step in zip(pauses, steps, strict=True):
        assert step * 0.8 <= pause <= step * 1.2
    assert len(set(pauses)) == len(pauses)  # jittered, not in lockstep


@pytest.mark.parametrize(
    ("code", "error"),
    [
        (grpc.StatusCode.NOT_FOUND, fitserve.NotFoundError),
        (grpc.StatusCode.INVALID_ARGUMENT, fitserve.InvalidArgumentError),
        (grpc.StatusCode.PERMISSION_DENIED, fitserve.PermissionDeniedError),
        (grpc.StatusCode.UNAUTHENTICATED, fitserve.UnauthenticatedError),
        (grpc.StatusCode.INTERNAL, fitserve.InternalError),
        (grpc.StatusCode.FAILED_PRECONDITION, fitserve.FailedPreconditionError),
    ],
)
def test_codes_that_retrying_cannot_cure_raise_at_once(client, fakes, code, error):
    fakes.training.watch_failures = [(code, ())]
    _running(fakes)

    with pytest.raises(error):
        list(client.get_job("job-1").events())

    assert len(fakes.training.watch_requests) == 1


def test_resource_exhausted_is_retried_only_with_a_retry_hint(client, fakes, monkeypatch):
    pauses: list[float] = []
    monkeypatch.setattr(_job, "_nap", pauses.append)
    shed = (grpc.StatusCode.RESOURCE_EXHAUSTED, (("grpc-retry-pushback-ms", "1500"),))
    never = (grpc.StatusCode.RESOURCE_EXHAUSTED, (("grpc-retry-pushback-ms", "-1"),))
    fakes.training.events = [state_event(1, JobState.JOB_STATE_SUCCEEDED)]
    fakes.training.watch_failures = [shed]
    _running(fakes)

    assert [e.event_id for e in client.get_job("job-1").events()] == ["1"]
    assert pauses[0] >= 1.5  # the server's hint, over the first backoff step

    fakes.training.watch_failures = [never]
    with pytest.raises(fitserve.ResourceExhaustedError):
        list(client.get_job("job-1").events())


def test_wait_with_a_timeout_retries_until_that_deadline_not_the_budget(fakes):
    fakes.training.events = [state_event(1, JobState.JOB_STATE_SUCCEEDED, model_version=3)]
    fakes.training.watch_failures = [UNAVAILABLE] * 4  # 0.2 + 0.4 + 0.8 + 1.6 s of pauses
    fakes.training.jobs["job-1"] = training_pb2.Job(
        id="job-1", state=JobState.JOB_STATE_SUCCEEDED, model_version=3
    )

    with fitserve.Client(fakes.target, timeout=10, watch_retry_seconds=0.1) as waiting:
        job = waiting.get_job("job-1")
        fakes.training.get_failures = [grpc.StatusCode.UNAVAILABLE] * 2  # GetJob too
        final = job.wait(timeout=30)

    assert final.model_version == 3
    assert len(fakes.training.watch_requests) == 5


def test_wait_gives_up_with_timeout_error_at_its_deadline(client, fakes):
    fakes.training.always_unavailable = True
    _running(fakes)
    started = time.monotonic()

    with pytest.raises(TimeoutError, match="job job-1 did not finish"):
        client.get_job("job-1").wait(timeout=0.8)

    assert 0.8 <= time.monotonic() - started < 2.5


def test_events_with_a_timeout_end_with_timeout_error(client, fakes):
    fakes.training.always_unavailable = True
    _running(fakes)

    with pytest.raises(TimeoutError):
        list(client.get_job("job-1").events(timeout=0.5))


def test_cli_watch_retry_for_sets_the_budget(fakes, capsys):
    fakes.training.always_unavailable = True
    _running(fakes)
    started = time.monotonic()

    status = cli.main(["--target", fakes.target, "jobs", "watch", "job-1", "--retry-for", "0.5"])

    assert status == cli.EXIT_UNAVAILABLE
    assert 0.5 <= time.monotonic() - started < 3
    assert "still failing after" in capsys.readouterr().err


def test_cli_watch_prints_each_event_once_across_an_outage(fakes, capsys, monkeypatch):
    monkeypatch.setattr(_job, "_nap", lambda seconds: None)
    fakes.training.events = [
        state_event(1, JobState.JOB_STATE_RUNNING),
        epoch_event(2, 1, 0.9),
        state_event(3, JobState.JOB_STATE_SUCCEEDED, model_version=2),
    ]
    fakes.training.drop_after = {"2"}
    fakes.training.watch_failures = []
    fakes.training.jobs["job-1"] = training_pb2.Job(
        id="job-1", state=JobState.JOB_STATE_SUCCEEDED, model_version=2
    )

    status = cli.main(["--target", fakes.target, "jobs", "watch", "job-1"])

    out = capsys.readouterr().out.splitlines()
    assert status == 0
    assert out == [
        "state RUNNING",
        "epoch 1/2: loss=0.9",
        "state SUCCEEDED (version 2)",
        "job job-1 SUCCEEDED (version 2)",
    ]


def test_a_negative_budget_is_refused():
    with pytest.raises(ValueError, match="watch_retry_seconds"):
        fitserve.Client("localhost:1", watch_retry_seconds=-1)


class _FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def trailing_metadata(self) -> tuple[()]:
        return ()
