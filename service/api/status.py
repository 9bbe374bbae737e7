"""Maps domain errors to gRPC status at the edge, and wraps every RPC the same way.

Each handler is wrapped by ``unary``, ``stream_out`` or ``stream_in``: the wrapper gives the
call a request id, counts and times it, turns a ``FitserveError`` into its status code
(INVALID_ARGUMENT carries a google.rpc.BadRequest naming the field), and turns anything
else into INTERNAL with the request id, logging the traceback instead of sending it.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn, TypeAlias, TypeVar

import grpc
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
    retry_after = getattr(exc, "retry_after_seconds", None)
    if retry_after is not None:
        hint = error_details_pb2.RetryInfo()
        hint.retry_delay.FromNanoseconds(int(retry_after * 1e9))
        status.details.add().Pack(hint)
    result: grpc.Status = rpc_status.to_status(status)
    return result


class Edge:
    """Per-server state the wrappers need: the metrics object."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    async def fail(self, context: Context, method: str, exc: BaseException) -> NoReturn:
        """Abort the call with the status ``exc`` maps to."""
        if isinstance(exc, errors.FitserveError):
            self._count(method, code_of(exc))
            log.info("%s: %s", method, exc.message, extra={"code": code_of(exc).name})
            await context.abort_with_status(to_status(exc))
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


Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"  # generic in the stubs only


class MessageSizeLimit(grpc.aio.ServerInterceptor):
    """Refuses request messages over ``limit`` bytes with a status that names the setting.

    gRPC's own refusal ("received message larger than max") names neither the server's
    limit nor how to raise it, so the transport is configured with headroom (see
    ``transport_limit``) and this check, on the raw bytes before they are parsed, gives
    the answer. Unary and client-streaming requests (every fitserve RPC that can carry
    tensors or data) are checked; wrapped handlers are built once per method.
    """

    def __init__(self, limit: int, edge: Edge) -> None:
        self._limit, self._edge = limit, edge
        self._wrapped: dict[str, Handler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        method: str = handler_call_details.method
        if (wrapped := self._wrapped.get(method)) is not None:
            return wrapped
        handler = await continuation(handler_call_details)
        if handler is None or handler.response_streaming:
            return handler
        wrapped = self._wrap(handler, method.rsplit("/", 1)[-1])
        self._wrapped[method] = wrapped
        return wrapped

    def too_big(self, size: int) -> errors.ResourceExhausted:
        """The error of a request message of ``size`` bytes over the limit."""
        return errors.ResourceExhausted(
            f"request message is {size} bytes, over this server's limit of {self._limit} "
            f"bytes; send less per call (fewer rows, smaller chunks), or raise the server's "
            f"FITSERVE_MAX_MESSAGE_BYTES (and the client's max_message_bytes)"
        )

    def _wrap(self, handler: Handler, method: str) -> Handler:
        parse = handler.request_deserializer or (lambda raw: raw)
        serialize = handler.response_serializer
        if handler.request_streaming:
            inner_stream: Any = handler.stream_unary  # typed for the sync server

            async def stream_unary(requests: AsyncIterator[bytes], context: Context) -> Any:
                return await inner_stream(self._checked_stream(requests, parse), context)

            return grpc.stream_unary_rpc_method_handler(stream_unary, response_serializer=serialize)
        inner: Any = handler.unary_unary

        async def unary_unary(raw: bytes, context: Context) -> Any:
            if len(raw) > self._limit:
                await self._edge.fail(context, method, self.too_big(len(raw)))
            return await inner(parse(raw), context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, response_serializer=serialize)

    async def _checked_stream(
        self, requests: AsyncIterator[bytes], parse: Callable[[bytes], Any]
    ) -> AsyncIterator[Any]:
        """The parsed messages of a request stream; the handler's edge maps the refusal."""
        async for raw in requests:
            if len(raw) > self._limit:
                raise self.too_big(len(raw))
            yield parse(raw)


def transport_limit(limit: int) -> int:
    """gRPC's own receive limit: room above ``limit`` so MessageSizeLimit sees the
    oversize requests (up to twice the limit) and names the setting; beyond that, gRPC
    refuses by itself before the message reaches Python. gRPC takes a signed 32-bit int."""
    return min(2 * limit, 2**31 - 1)
