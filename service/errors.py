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
    │   └── DiskFull            the storage refused a write (no space, quota, file size limit)
    ├── DeadlineExceeded        the caller's deadline passed before the work ran
    ├── Unavailable             Redis down, model still loading
    ├── DataLoss                stored data is unreadable: a model version's corrupt files
    ├── Unimplemented           an RPC a later release builds
    ├── Unauthenticated
    └── PermissionDenied

Anything else is a bug: the edge answers INTERNAL with a request id and logs the traceback.

A message echoes what the caller sent through ``shown`` (cut to ``ECHO_LIMIT``), so a
10 KB name cannot push the status past gRPC's metadata limit; ``redacted`` takes server
paths and traceback lines out of a message that came from a failure on a worker.
"""

from __future__ import annotations

import errno
import os
import re
from typing import ClassVar

# Terminal escapes (colors, cursor moves) that Keras and TensorFlow put in their messages.
_TERMINAL_ESCAPES = re.compile(
    r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[@-Z\\-_])"
)


# Traceback lines, and absolute paths of Python sources, that a failure may carry.
_TRACEBACK_START = "Traceback (most recent call last):"
_FRAME_LINE = re.compile(r'^(\s*)File ".*", line \d+')
_SOURCE_PATH = re.compile(r"(?:/[^\s'\"/:]+)+\.pyc?\b")
ECHO_LIMIT = 80


def plain_text(message: str) -> str:
    """A message without terminal escapes, fit for a person reading it anywhere."""
    return _TERMINAL_ESCAPES.sub("", message)


def shown(value: object, limit: int = ECHO_LIMIT) -> str:
    """``repr(value)`` for a message that echoes what a caller sent, cut to about
    ``limit`` characters with the full length said: ``'aaaa…' (10000 characters)``."""
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]!r}… ({len(value)} characters)"
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


def redacted(message: str, hidden: dict[str, str] | None = None) -> str:
    """A message without traceback lines or Python source paths, and with each ``hidden``
    text (a server folder: the data folder) replaced by what names it to a person
    (``{"/srv/fitserve/data": "<data folder>"}``)."""
    kept: list[str] = []
    frame_indent: int | None = None  # the indent of the last frame line, while in one
    for line in message.splitlines():
        indent = len(line) - len(line.lstrip())
        if frame_indent is not None and line.strip() and indent > frame_indent:
            continue  # the frame's source line, or its ^^^ marker
        frame_indent = None
        if (frame := _FRAME_LINE.match(line)) is not None:
            frame_indent = len(frame.group(1))
        elif line.strip() != _TRACEBACK_START:
            kept.append(line)
    text = "\n".join(kept).strip()
    for secret, label in sorted((hidden or {}).items(), key=lambda kv: -len(kv[0])):
        if secret:
            text = text.replace(secret, label)
    return _SOURCE_PATH.sub("<source>", text)


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


class DiskFull(ResourceExhausted):
    """The storage refused a write: no space left (ENOSPC), a quota reached (EDQUOT) or
    the file size limit of the process (EFBIG). Waiting does not help; freeing space does.
    A job that fails of it reports the reason DISK_FULL."""

    reason = "DISK_FULL"


STORAGE_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
# How the system words those refusals (TensorFlow's own file writes say it this way too).
_STORAGE_FULL_TEXTS = tuple(os.strerror(code) for code in sorted(STORAGE_FULL_ERRNOS))
# The path in such a message: TensorFlow's "<path>; No space left on device", or h5py's
# "... name = '<path>', errno = 28, ...".
_REFUSED_PATH = re.compile(
    r"(/[^\s'\";]+); (?:" + "|".join(map(re.escape, _STORAGE_FULL_TEXTS)) + r")|name = '(/[^']+)'"
)


def storage_full(exc: BaseException) -> tuple[str, str | None] | None:
    """When ``exc`` (or an exception it was raised from) is the storage refusing a
    write: the system's words for why ("No space left on device") and the path being
    written when the error names one; None for any other error."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in STORAGE_FULL_ERRNOS:
            path = current.filename
            return os.strerror(current.errno), None if path is None else os.fsdecode(path)
        text = str(current)
        for words in _STORAGE_FULL_TEXTS:
            if words in text:
                found = _REFUSED_PATH.search(text)
                return words, (found.group(1) or found.group(2)) if found else None
        current = current.__cause__ or current.__context__
    return None


class DeadlineExceeded(FitserveError):
    """The caller's deadline passed before the work could run."""

    code = "DEADLINE_EXCEEDED"


class Unavailable(FitserveError):
    """A dependency (Redis, a loading model) is not ready; retrying may succeed."""

    code = "UNAVAILABLE"


class DataLoss(FitserveError):
    """Stored data is unreadable (a model version whose files are corrupt or missing):
    retrying the same call cannot help until someone replaces or deletes it."""

    code = "DATA_LOSS"


class Unimplemented(FitserveError):
    """Part of the v1 contract that this release does not implement yet."""

    code = "UNIMPLEMENTED"


class Unauthenticated(FitserveError):
    """No valid credentials."""

    code = "UNAUTHENTICATED"


class PermissionDenied(FitserveError):
    """This server's role does not allow the call."""

    code = "PERMISSION_DENIED"
