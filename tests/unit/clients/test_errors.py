import grpc
import pytest

import fitserve
from fitserve import _errors
from fitserve.v1 import training_pb2

MAPPED = [
    (grpc.StatusCode.INVALID_ARGUMENT, fitserve.InvalidArgumentError),
    (grpc.StatusCode.NOT_FOUND, fitserve.NotFoundError),
    (grpc.StatusCode.ALREADY_EXISTS, fitserve.AlreadyExistsError),
    (grpc.StatusCode.FAILED_PRECONDITION, fitserve.FailedPreconditionError),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, fitserve.ResourceExhaustedError),
    (grpc.StatusCode.UNAVAILABLE, fitserve.UnavailableError),
    (grpc.StatusCode.DEADLINE_EXCEEDED, fitserve.DeadlineExceededError),
    (grpc.StatusCode.UNAUTHENTICATED, fitserve.UnauthenticatedError),
    (grpc.StatusCode.PERMISSION_DENIED, fitserve.PermissionDeniedError),
    (grpc.StatusCode.UNIMPLEMENTED, fitserve.UnimplementedError),
    (grpc.StatusCode.INTERNAL, fitserve.InternalError),
    (grpc.StatusCode.CANCELLED, fitserve.CancelledError),
    (grpc.StatusCode.DATA_LOSS, fitserve.DataLossError),
]


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str | None) -> None:
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str | None:
        return self._details


@pytest.mark.parametrize(("code", "error_type"), MAPPED, ids=[c.name for c, _ in MAPPED])
def test_each_status_code_maps_to_its_subclass(code, error_type):
    error = _errors.from_rpc_error(FakeRpcError(code, "model 'mnist' has no version 7"))

    assert type(error) is error_type
    assert isinstance(error, fitserve.FitserveError)
    assert error.code == code
    assert error.details == "model 'mnist' has no version 7"
    assert str(error) == "model 'mnist' has no version 7"


@pytest.mark.parametrize(
    "code", [grpc.StatusCode.UNKNOWN, grpc.StatusCode.ABORTED, grpc.StatusCode.OUT_OF_RANGE]
)
def test_codes_without_a_subclass_raise_the_base_class(code):
    error = _errors.from_rpc_error(FakeRpcError(code, "boom"))

    assert type(error) is fitserve.FitserveError
    assert error.code == code


def test_missing_details_name_the_status_code():
    error = _errors.from_rpc_error(FakeRpcError(grpc.StatusCode.UNAVAILABLE, None))

    assert error.details == "the call failed with UNAVAILABLE"


def test_an_rpc_error_without_status_is_unknown():
    error = _errors.from_rpc_error(grpc.RpcError())

    assert type(error) is fitserve.FitserveError
    assert error.code == grpc.StatusCode.UNKNOWN


def test_subclasses_carry_their_code_when_raised_directly():
    assert fitserve.NotFoundError("gone").code == grpc.StatusCode.NOT_FOUND
    assert fitserve.FitserveError("x").code == grpc.StatusCode.UNKNOWN


def test_job_failed_error_carries_the_job_and_its_reason():
    job = training_pb2.Job(
        id="job-1",
        state=training_pb2.JobState.JOB_STATE_FAILED,
        error=training_pb2.JobError(reason="INVALID_LABELS", message="labels go up to 11"),
    )

    error = fitserve.JobFailedError(job)

    assert str(error) == "labels go up to 11"
    assert error.job is job
    assert error.reason == "INVALID_LABELS"


def test_job_failed_error_without_message_names_the_job():
    assert str(fitserve.JobFailedError(training_pb2.Job(id="job-9"))) == "job job-9 failed"


def test_job_cancelled_error_carries_the_job():
    job = training_pb2.Job(id="job-2", state=training_pb2.JobState.JOB_STATE_CANCELLED)

    error = fitserve.JobCancelledError(job)

    assert error.job is job
    assert error.code == grpc.StatusCode.CANCELLED
    assert "job-2" in str(error)


def test_the_docstring_tree_names_every_exception():
    classes = [name for name in _errors.__all__ if isinstance(getattr(_errors, name), type)]

    assert len(classes) == 16
    for name in classes:
        assert name in (_errors.__doc__ or ""), name
