"""Maps domain errors to gRPC status at the edge, and wraps every RPC the same way.

Each handler is wrapped by ``unary``, ``stream_out`` or ``stream_in``: the wrapper gives the
call a request id, counts and times it, turns a ``FitserveError`` into its status code
(INVALID_ARGUMENT carries a google.rpc.BadRequest naming the field), and turns anything
else into INTERNAL with the request id, logging the traceback instead of sending it.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import grpc
import redis
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from service import errors
from service.logs import new_request_id, request_id_var
from service.metrics import Metrics

log = logging.getLogger(__name__)

CODES: dict[type[errors.FitserveError], grpc.StatusCode] = {
    errors.InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.Unimplemented: grpc.StatusCode.UNIMPLEMENTED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
}

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Self = TypeVar("Self")
Context = grpc.aio.ServicerContext[Any, Any]


def code_of(exc: errors.FitserveError) -> grpc.StatusCode:
    """The gRPC code of a domain error."""
    for cls in type(exc).__mro__:
        if cls in CODES:
            return CODES[cls]
    return grpc.StatusCode.INTERNAL


def to_status(exc: errors.FitserveError) -> grpc.Status:
    """A rich status: code, message, BadRequest field details when a field is known, and
    RetryInfo when the error says when to retry (a full queue)."""
    code = code_of(exc)
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=exc.message)
    if exc.field:
        detail = any_pb2.Any()
        violation = error_details_pb2.BadRequest.FieldViolation(
            field=exc.field, description=exc.message
        )
        detail.Pack(error_details_pb2.BadRequest(field_violations=[violation]))
        status.details.append(detail)
    retry_after = exc.retry_after_seconds if isinstance(exc, errors.ResourceExhausted) else None
    if retry_after is not None:
        hint = error_details_pb2.RetryInfo()
        hint.retry_delay.FromNanoseconds(int(retry_after * 1e9))
        status.details.add().Pack(hint)
    result: grpc.Status = rpc_status.to_status(status)
    # Server pushback (gRFC A6) for gRPC's own retry policy (the SDK's, or any client's
    # service config): wait this long before the next attempt; a negative value: do not
    # retry, for RESOURCE_EXHAUSTED that waiting cannot cure (a request over the size limit).
    if retry_after is not None:
        pushback = str(max(1, round(retry_after * 1000)))
    elif code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        pushback = "-1"
    else:
        return result
    return _Status(
        result.code, result.details, (*result.trailing_metadata, (PUSHBACK_KEY, pushback))
    )


PUSHBACK_KEY = "grpc-retry-pushback-ms"


@dataclasses.dataclass(frozen=True)
class _Status(grpc.Status):
    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...]


class Edge:
    """Per-server state the wrappers need: the metrics object."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    async def fail(
        self, context: Context, method: str, exc: BaseException, *, quiet: bool = False
    ) -> NoReturn:
        """Abort the call with the status ``exc`` maps to (``quiet``: count it, log nothing;
        for refusals that come by the thousand and have their own metric)."""
        if isinstance(exc, errors.FitserveError):
            self._count(method, code_of(exc))
            if not quiet:
                log.info("%s: %s", method, exc.message, extra={"code": code_of(exc).name})
            await context.abort_with_status(to_status(exc))
        if isinstance(exc, redis.ConnectionError | redis.TimeoutError):
            unavailable = errors.Unavailable(
                f"Redis did not answer ({type(exc).__name__}: {exc}); retry shortly"
            )
            log.warning("%s: %s", method, unavailable.message)
            self._count(method, grpc.StatusCode.UNAVAILABLE)
            await context.abort_with_status(to_status(unavailable))
        self._count(method, grpc.StatusCode.INTERNAL)
        log.error("%s failed", method, exc_info=exc)
        await context.abort(
            grpc.StatusCode.INTERNAL,
            f"internal error; quote request id {request_id_var.get()} when reporting it",
        )
        raise AssertionError("unreachable")  # abort raises

    def ok(self, method: str, started: float) -> None:
        self._count(method, grpc.StatusCode.OK)
        self.metrics.rpc_latency.labels(method).observe(time.monotonic() - started)

    def _count(self, method: str, code: grpc.StatusCode) -> None:
        self.metrics.rpc_requests.labels(method, code.name).inc()


class Servicer:
    """Base of fitserve servicers: holds the Edge the wrappers use."""

    def __init__(self, edge: Edge) -> None:
        self.edge = edge


S = TypeVar("S", bound=Servicer)


def unary(
    fn: Callable[[S, Req, Context], Awaitable[Resp]],
) -> Callable[[S, Req, Context], Awaitable[Resp]]:
    """Wrap a unary-response handler (unary or client-streaming request)."""
    method = fn.__name__

    @functools.wraps(fn)
    async def wrapper(self: S, request: Req, context: Context) -> Resp:
        token = request_id_var.set(new_request_id())
        started = time.monotonic()
        try:
            response = await fn(self, request, context)
        except Exception as exc:
            await self.edge.fail(context, method, exc)
        finally:
            request_id_var.reset(token)
        self.edge.ok(method, started)
        return response

    return wrapper


def stream_out(
    fn: Callable[[S, Req, Context], AsyncIterator[Resp]],
) -> Callable[[S, Req, Context], AsyncIterator[Resp]]:
    """Wrap a server-streaming handler."""
    method = fn.__name__

    @functools.wraps(fn)
    async def wrapper(self: S, request: Req, context: Context) -> AsyncIterator[Resp]:
        # No reset: each RPC runs in its own task and context, and a stream the client
        # abandons is closed from another context, where ContextVar.reset would fail.
        request_id_var.set(new_request_id())
        started = time.monotonic()
        try:
            async for item in fn(self, request, context):
                yield item
        except Exception as exc:
            await self.edge.fail(context, method, exc)
        self.edge.ok(method, started)

    return wrapper
