"""The exceptions the SDK raises, one per gRPC status a caller can act on.

Every failed RPC surfaces as a subclass of `FitserveError`, never as a bare
`grpc.RpcError`, so callers catch domain errors (`fitserve.NotFoundError`) without
knowing the transport. Our exception hierarchy:

* FitserveError (.code, .details)
  + InvalidArgumentError     - the request is wrong; the details say which field.
  + NotFoundError            - no such model, version, job or dataset.
  + AlreadyExistsError
  + FailedPreconditionError  - wrong state, e.g. cancelling a finished job.
  + ResourceExhaustedError   - a queue is full or a quota is used up; retry later.
  + UnavailableError         - the server (or a model version) is not reachable yet.
  + DeadlineExceededError    - the call's `timeout` passed.
  + UnauthenticatedError     - missing or bad token.
  + PermissionDeniedError    - the token's role does not allow this call.
  + UnimplementedError       - the server does not offer this call (yet).
  + InternalError            - a server bug; the details hold a request id for its logs.
  + DataLossError            - stored data is unreadable, e.g. a model version's corrupt
                               files; retrying cannot help until it is replaced or deleted.
  + CancelledError           - the call was cancelled.
  + JobFailedError (.job)    - a job this client waited for ended FAILED.
  + JobCancelledError (.job) - a job this client waited for ended CANCELLED.

Status codes without a subclass (UNKNOWN, ABORTED, OUT_OF_RANGE) raise
`FitserveError` itself.
"""

from __future__ import annotations

import grpc

from fitserve._states import JobState
from fitserve.v1 import training_pb2

__all__ = [
    "AlreadyExistsError",
    "CancelledError",
    "DataLossError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "FitserveError",
    "InternalError",
    "InvalidArgumentError",
    "JobCancelledError",
    "JobFailedError",
    "NotFoundError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "from_rpc_error",
]


class FitserveError(Exception):
    """Base of every error the SDK raises; `.details` is the server's message."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, details: str, *, code: grpc.StatusCode | None = None) -> None:
        super().__init__(details)
        self.details = details
        if code is not None:
            self.code = code


class InvalidArgumentError(FitserveError):
    """The request is invalid; the details name the field and what is expected."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(FitserveError):
    """The model, version, alias, job or dataset does not exist."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(FitserveError):
    """The thing to create exists already."""

    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPreconditionError(FitserveError):
    """The target is in the wrong state for this call (e.g. the job has finished)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhaustedError(FitserveError):
    """A queue is full or a quota is used up: back off and retry."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class UnavailableError(FitserveError):
    """The server, or the model version asked for, cannot answer right now."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceededError(FitserveError):
    """The call did not finish within its timeout."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class UnauthenticatedError(FitserveError):
    """The call carried no valid credentials."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(FitserveError):
    """The credentials are valid but do not allow this call."""

    code = grpc.StatusCode.PERMISSION_DENIED


class UnimplementedError(FitserveError):
    """The server does not implement this call (an older server, or a disabled role)."""

    code = grpc.StatusCode.UNIMPLEMENTED


class InternalError(FitserveError):
    """The server hit a bug; its details carry a request id to find it in the logs."""

    code = grpc.StatusCode.INTERNAL


class DataLossError(FitserveError):
    """Stored data is unreadable: a model version whose files are corrupt or missing. The
    details name the version and what is wrong; publish a new version or delete it."""

    code = grpc.StatusCode.DATA_LOSS


class CancelledError(FitserveError):
    """The call was cancelled before it finished."""

    code = grpc.StatusCode.CANCELLED


class JobFailedError(FitserveError):
    """A job ended FAILED; `.job` is its final record, `.reason` the machine code."""

    def __init__(self, job: training_pb2.Job) -> None:
        super().__init__(job.error.message or f"job {job.id} failed")
        self.job = job

    @property
    def state(self) -> JobState:
        """`JobState.FAILED`, the state of `.job` as a `JobState`."""
        return JobState.of(self.job.state)

    @property
    def reason(self) -> str:
        """The stable code of the failure, e.g. "INVALID_LABELS" or "OUT_OF_MEMORY"."""
        return self.job.error.reason


class JobCancelledError(FitserveError):
    """A job ended CANCELLED, so it published nothing; `.job` is its final record."""

    code = grpc.StatusCode.CANCELLED

    def __init__(self, job: training_pb2.Job) -> None:
        super().__init__(f"job {job.id} was cancelled")
        self.job = job

    @property
    def state(self) -> JobState:
        """`JobState.CANCELLED`, the state of `.job` as a `JobState`."""
        return JobState.of(self.job.state)


_BY_CODE: dict[grpc.StatusCode, type[FitserveError]] = {
    cls.code: cls
    for cls in (
        InvalidArgumentError,
        NotFoundError,
        AlreadyExistsError,
        FailedPreconditionError,
        ResourceExhaustedError,
        UnavailableError,
        DeadlineExceededError,
        UnauthenticatedError,
        PermissionDeniedError,
        UnimplementedError,
        InternalError,
        DataLossError,
        CancelledError,
    )
}


def from_rpc_error(error: grpc.RpcError) -> FitserveError:
    """Turn a failed call into the `FitserveError` subclass of its status code."""
    code = _status_code(error)
    details = _details(error) or f"the call failed with {code.name}"
    return _BY_CODE.get(code, FitserveError)(details, code=code)


def _status_code(error: grpc.RpcError) -> grpc.StatusCode:
    # An RpcError that is not also a grpc.Call (raised by some interceptors) has no code.
    code = getattr(error, "code", None)
    value = code() if callable(code) else None
    return value if isinstance(value, grpc.StatusCode) else grpc.StatusCode.UNKNOWN


def _details(error: grpc.RpcError) -> str:
    details = getattr(error, "details", None)
    value = details() if callable(details) else None
    return value if isinstance(value, str) else ""
