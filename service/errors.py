"""The domain error tree, transport-free; ``service.api.status`` maps it to gRPC codes.

Each class names its status in ``code``, as the plain string gRPC uses for it
("INVALID_ARGUMENT"; a subclass inherits its parent's), so the domain and the metrics can
speak of outcomes without grpc.

    FitserveError
    ├── InvalidRequest          bad input: what was wrong and what was expected
    ├── NotFound                unknown model, version, alias, job or dataset
    ├── AlreadyExists
    ├── FailedPrecondition      wrong state: cancel a finished job, delete an aliased version
    ├── ResourceExhausted       queue full, quota, size limit
    ├── DeadlineExceeded        the caller's deadline passed before the work ran
    ├── Unavailable             Redis down, model still loading
    ├── Unimplemented           an RPC a later release builds
    ├── Unauthenticated
    └── PermissionDenied

Anything else is a bug: the edge answers INTERNAL with a request id and logs the traceback.
"""

from __future__ import annotations

import re
from typing import ClassVar

# Terminal escapes (colors, cursor moves) that Keras and TensorFlow put in their messages.
_TERMINAL_ESCAPES = re.compile(
    r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[@-Z\\-_])"
)


def plain_text(message: str) -> str:
    """A message without terminal escapes, fit for a person reading it anywhere."""
    return _TERMINAL_ESCAPES.sub("", message)


class FitserveError(Exception):
    """A failure a person can act on; its message is safe to show to the caller."""

    code: ClassVar[str] = "INTERNAL"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        message = plain_text(message)
        super().__init__(message)
        self.message = message
        self.field = field


class InvalidRequest(FitserveError):
    """The request is malformed; ``field`` names the offending field when known."""

    code = "INVALID_ARGUMENT"


class NotFound(FitserveError):
    """The named model, version, alias, job or dataset does not exist."""

    code = "NOT_FOUND"


class AlreadyExists(FitserveError):
    """The thing to create exists already."""

    code = "ALREADY_EXISTS"


class FailedPrecondition(FitserveError):
    """The request is valid but the system is not in a state to perform it."""

    code = "FAILED_PRECONDITION"


class ResourceExhausted(FitserveError):
    """A queue or size limit is reached; retry later or with less.

    ``retry_after_seconds``: when a retry may succeed (sent as RetryInfo and gRPC
    pushback); None: waiting will not help (a request over a size limit).
    """

    code = "RESOURCE_EXHAUSTED"

    def __init__(
        self, message: str, retry_after_seconds: float | None = None, *, field: str | None = None
    ) -> None:
        super().__init__(message, field=field)
        self.retry_after_seconds = retry_after_seconds


class DeadlineExceeded(FitserveError):
    """The caller's deadline passed before the work could run."""

    code = "DEADLINE_EXCEEDED"


class Unavailable(FitserveError):
    """A dependency (Redis, a loading model) is not ready; retrying may succeed."""

    code = "UNAVAILABLE"


class Unimplemented(FitserveError):
    """Part of the v1 contract that this release does not implement yet."""

    code = "UNIMPLEMENTED"


class Unauthenticated(FitserveError):
    """No valid credentials."""

    code = "UNAUTHENTICATED"


class PermissionDenied(FitserveError):
    """This server's role does not allow the call."""

    code = "PERMISSION_DENIED"
