"""Maps domain errors to gRPC status at the edge, and wraps every RPC the same way.

Each handler is wrapped by ``unary`` or ``stream_out``: the wrapper gives the call a request
id, counts and times it whatever its outcome, turns a ``FitserveError`` into the status its
``code`` names (INVALID_ARGUMENT carries a google.rpc.BadRequest naming the field), and
turns anything else into INTERNAL with the request id, logging the traceback instead of
sending it. A call that ends without an answer (the client cancelled it, or its deadline
passed: gRPC cancels the handler's task, which ``except Exception`` does not see) is
counted as gRPC reports it to the client, CANCELLED or DEADLINE_EXCEEDED (``gone``).

Every message and field name sent is cut to ``MAX_MESSAGE_BYTES`` and ``MAX_FIELD_BYTES``
of UTF-8 (``capped``): the message travels in the trailers twice (grpc-message, percent
encoded, and the status details), and trailers past gRPC's metadata limit would reach the
client as RESOURCE_EXHAUSTED instead of the error.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import grpc
import redis
from google.protobuf import message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from service import errors
from service.logs import new_request_id, request_id_var
from service.metrics import Metrics

log = logging.getLogger(__name__)

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Context = grpc.aio.ServicerContext[Any, Any]
PUSHBACK_KEY = "grpc-retry-pushback-ms"
MAX_MESSAGE_BYTES = 1024
MAX_FIELD_BYTES = 128
_CUT = "… (cut)"


def capped(text: str, limit: int = MAX_MESSAGE_BYTES) -> str:
    """``text`` in at most ``limit`` bytes of UTF-8, cut at a character and marked so."""
    raw = text.encode()
    if len(raw) <= limit:
        return text
    room = limit - len(_CUT.encode())
    return raw[:room].decode(errors="ignore") + _CUT


def code_of(exc: errors.FitserveError) -> grpc.StatusCode:
    """The gRPC code of a domain error, which names it in ``code``."""
    return grpc.StatusCode[exc.code]


def to_status(exc: errors.FitserveError) -> grpc.Status:
    """A rich status: code, message, BadRequest field details when a field is known, and
    RetryInfo when the error says when to retry (a full queue)."""
    retry_after = exc.retry_after_seconds if isinstance(exc, errors.ResourceExhausted) else None
    status = status_pb2.Status(code=code_of(exc).value[0], message=capped(exc.message))
    for detail in _details(exc, retry_after):
        status.details.add().Pack(detail)
    result: grpc.Status = rpc_status.to_status(status)
    if (pushback := _pushback(exc, retry_after)) is None:
        return result
    return _Status(
        result.code, result.details, (*result.trailing_metadata, (PUSHBACK_KEY, pushback))
    )


def _details(exc: errors.FitserveError, retry_after: float | None) -> list[message.Message]:
    """The field at fault (BadRequest) and when to retry (RetryInfo), those that are known."""
    details: list[message.Message] = []
    if exc.field:
        violation = error_details_pb2.BadRequest.FieldViolation(
            field=capped(exc.field, MAX_FIELD_BYTES), description=capped(exc.message)
        )
        details.append(error_details_pb2.BadRequest(field_violations=[violation]))
    if retry_after is not None:
        hint = error_details_pb2.RetryInfo()
        hint.retry_delay.FromNanoseconds(int(retry_after * 1e9))
        details.append(hint)
    return details


def _pushback(exc: errors.FitserveError, retry_after: float | None) -> str | None:
    """Server pushback (gRFC A6) for gRPC's own retry policy (the SDK's, or any client's
    service config): wait this long before the next attempt; a negative value: do not
    retry, for RESOURCE_EXHAUSTED that waiting cannot cure (a request over the size limit)."""
    if retry_after is not None:
        return str(max(1, round(retry_after * 1000)))
    return "-1" if exc.code == "RESOURCE_EXHAUSTED" else None


@dataclasses.dataclass(frozen=True)
class _Status(grpc.Status):
    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...]


DEADLINE_SLACK_SECONDS = 0.25  # measured: 1 ms early under load; clocks differ by ~0.1 s


def gone_code(context: Context) -> str:
    """The code gRPC gives the client of a call that ended without an answer: its
    deadline passed (DEADLINE_EXCEEDED) or the client cancelled it (CANCELLED).

    gRPC's timer can end a call a little before ``time_remaining`` reaches 0 (the two
    read different clocks), so a call ended within ``DEADLINE_SLACK_SECONDS`` of its
    deadline is taken as ended by it."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= DEADLINE_SLACK_SECONDS:
        return "DEADLINE_EXCEEDED"
    return "CANCELLED"


def answered_code(context: Context) -> str:
    """The code the client of a call whose handler returned gets: OK, unless the answer
    comes too late (its deadline passed while the server was busy: gRPC does not send
    it) or the client cancelled the call meanwhile."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        return "DEADLINE_EXCEEDED"
    try:
        cancelled = context.cancelled()
    except NotImplementedError:  # a context that cannot tell
        cancelled = False
    return "CANCELLED" if cancelled else "OK"


class RpcOutcomes:
    """How every RPC ends, counted and timed by code: answered (``ok``), aborted with the
    status its error maps to and logged (``fail``), or cancelled by the client or its
    deadline (``gone``). One per server."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    async def fail(
        self,
        context: Context,
        method: str,
        exc: BaseException,
        *,
        quiet: bool = False,
        started: float | None = None,
    ) -> NoReturn:
        """Abort the call with the status ``exc`` maps to (``quiet``: count it, log nothing;
        for refusals that come by the thousand and have their own metric; ``started``:
        also time it, from that ``time.monotonic()``)."""
        if isinstance(exc, redis.ConnectionError | redis.TimeoutError):
            exc = errors.Unavailable(
                f"Redis did not answer ({type(exc).__name__}: {exc}); retry shortly"
            )
            log.warning("%s: %s", method, exc.message)  # logged louder than a caller's mistake
            quiet = True
        if isinstance(exc, errors.FitserveError):
            self._count(method, exc.code, started)
            if not quiet:
                log.info("%s: %s", method, exc.message, extra={"code": exc.code})
            await context.abort_with_status(to_status(exc))
        self._count(method, "INTERNAL", started)
        log.error("%s failed", method, exc_info=exc)
        await context.abort(
            grpc.StatusCode.INTERNAL,
            f"internal error; quote request id {request_id_var.get()} when reporting it",
        )
        raise AssertionError("unreachable")  # abort raises

    def ok(self, method: str, started: float, context: Context | None = None) -> None:
        """Count a call that returned, and time it from ``started`` (monotonic): OK, or
        as its client sees it (``answered_code``) given its ``context``."""
        self._count(method, "OK" if context is None else answered_code(context), started)

    def gone(self, context: Context, method: str, started: float) -> None:
        """Count and time a call that ended without an answer (``gone_code``)."""
        self._count(method, gone_code(context), started)

    def _count(self, method: str, code: str, started: float | None = None) -> None:
        self.metrics.rpc_requests.labels(method, code).inc()
        if started is not None:
            self.metrics.rpc_latency.labels(method, code).observe(time.monotonic() - started)


_RPC_MARK = "__fitserve_rpc__"


class Servicer:
    """Base of fitserve servicers: holds the RpcOutcomes the wrappers use, and creates
    the call counters of its methods at zero, one per code (``Metrics.prepare_rpc``)."""

    def __init__(self, outcomes: RpcOutcomes) -> None:
        self.outcomes = outcomes
        for name in dir(type(self)):
            if getattr(getattr(type(self), name, None), _RPC_MARK, False):
                outcomes.metrics.prepare_rpc(name)


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
        except asyncio.CancelledError:
            self.outcomes.gone(context, method, started)
            raise
        except Exception as exc:
            await self.outcomes.fail(context, method, exc, started=started)
        finally:
            request_id_var.reset(token)
        self.outcomes.ok(method, started, context)
        return response

    setattr(wrapper, _RPC_MARK, True)
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
        counted = False

        def on_done(_: Context) -> None:
            # A stream the client abandons while gRPC itself sends an item is ended
            # outside this generator, which is closed only when collected: count it
            # when the call is done, unless counted already; and mark it counted, or the
            # generator's later close would count it a second time.
            nonlocal counted
            if not counted:
                counted = True
                self.outcomes.gone(context, method, started)

        context.add_done_callback(on_done)  # type: ignore[arg-type]  # the stub wants a class
        try:
            async for item in fn(self, request, context):
                yield item
        except (asyncio.CancelledError, GeneratorExit):  # GeneratorExit: closed, abandoned
            if not counted:
                counted = True
                self.outcomes.gone(context, method, started)
            raise
        except Exception as exc:
            counted = True
            await self.outcomes.fail(context, method, exc, started=started)
        counted = True
        self.outcomes.ok(method, started, context)

    setattr(wrapper, _RPC_MARK, True)
    return wrapper
