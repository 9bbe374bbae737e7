"""What every call passes before its handler: message checks, stream bounds, load shedding.

One server interceptor (``CallGate``) wraps every handler once per method; every handler
then takes its request messages as raw bytes, and the gate parses them:

* **Size.** Request messages over ``FITSERVE_MAX_MESSAGE_BYTES`` are refused with a status
  that names the limit and the setting; gRPC's own refusal ("received message larger than
  max") names neither. The transport is configured with headroom (``transport_limit``) so
  the check, on the raw bytes before they are parsed, sees them.
* **Parsing.** Bytes that do not parse as the method's request message (corrupt, not UTF-8
  where a string must be, or nested deeper than protobuf's recursion limit, as a
  ``google.protobuf.Struct`` 200 levels deep is) are INVALID_ARGUMENT: "request is not a
  valid fitserve.v1.TrainRequest: ...", never protobuf's own text as UNKNOWN or INTERNAL.
* **Streams.** At most ``FITSERVE_MAX_STREAMS`` streaming calls (any method streaming
  requests or responses) and ``FITSERVE_MAX_JOB_WATCHERS`` WatchJob calls are open at once;
  past either, RESOURCE_EXHAUSTED naming the setting, with a retry hint. A slot is freed
  when its call ends however it ends: by the handler's ``finally`` or gRPC's done callback,
  whichever comes first (an async generator the client cancelled while it waited to send is
  never resumed, so its ``finally`` alone might run only when it is garbage collected).
* **Load shedding.** While the oldest call waiting in gRPC's own queue has waited longer
  than ``FITSERVE_INFERENCE__MAX_QUEUE_WAIT_MS`` (measured by
  ``service.api.backlog.Backlog``, which the gate feeds with the calls inside handlers,
  counted the same way as stream slots), a share of Predict calls (fitserve's and TF
  Serving's; ``shed_share``) is refused with RESOURCE_EXHAUSTED and a RetryInfo, before the
  request is parsed. While that measured wait is under the bound, nothing is shed.
  Control-plane calls (health, jobs, uploads) are never shed.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NoReturn, TypeAlias

import grpc
from google.protobuf import message

from service import errors
from service.api.backlog import Backlog, Overloaded, shed_share
from service.api.status import Context, RpcOutcomes

log = logging.getLogger(__name__)

Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"  # generic in the stubs only
Parse: TypeAlias = Callable[[bytes], Any]

SHED_METHODS = frozenset(
    {
        "/fitserve.v1.InferenceService/Predict",
        "/tensorflow.serving.PredictionService/Predict",
    }
)
WATCH_METHOD = "/fitserve.v1.TrainingService/WatchJob"
# Streams that last as long as their client wants: at shutdown they end at once (UNAVAILABLE)
# rather than hold the grace that in-flight calls get. Downloads and uploads end by
# themselves, so they are left to finish within the grace like unary calls.
ENDLESS_STREAMS = frozenset(
    {
        WATCH_METHOD,
        "/grpc.health.v1.Health/Watch",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    }
)
SHUTTING_DOWN = (
    "this server is shutting down; retry on another replica (the load balancer or a "
    "restarted server): a WatchJob resumes with after_event_id set to the last event id "
    "received, and misses nothing"
)
MAX_RETRY_HINT = 5.0  # seconds; the longest retry hint a refusal sends, as the batcher's
STREAM_RETRY_HINT = 1.0  # seconds; the retry hint of a refusal past a stream bound
REFUSAL_LOG_SECONDS = 10.0  # one log line per kind of refusal in this long at most
SHED_LOG_SECONDS = REFUSAL_LOG_SECONDS


@dataclass
class StreamBound:
    """At most ``limit`` calls of one kind open at once; ``setting`` raises it."""

    limit: int
    what: str  # "streaming calls"
    setting: str  # "FITSERVE_MAX_STREAMS"
    open: int = 0

    def refusal(self) -> errors.ResourceExhausted:
        return errors.ResourceExhausted(
            f"too many {self.what} open on this server ({self.open}, the most it holds at "
            f"once: {self.setting}={self.limit}); retry when some have ended, or raise "
            f"{self.setting}",
            STREAM_RETRY_HINT,
        )


@dataclass(eq=False)  # one per call, in a set by identity
class OpenStream:
    """An endless stream's call, for ``CallGate.end_streams``: its task, and whether it is
    inside the handler now (not in gRPC sending a message, where a cancellation would end
    the call CANCELLED rather than with our status)."""

    task: asyncio.Task[Any]
    inside: bool = False


class CallGate(grpc.aio.ServerInterceptor):
    """The size and parse checks on every request message, the bounds on open streams, and
    shedding of Predict calls.

    ``backlog`` is None when shedding is off (``max_wait`` unset, or no channelz); a bound
    of None is no bound.
    """

    def __init__(
        self,
        limit: int,
        outcomes: RpcOutcomes,
        backlog: Backlog | None = None,
        max_wait: float | None = None,
        *,
        max_streams: int | None = None,
        max_job_watchers: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._limit, self._outcomes, self._clock = limit, outcomes, clock
        self.backlog, self.max_wait = backlog, max_wait
        self.streams = StreamBound(max_streams or 2**62, "streaming calls", "FITSERVE_MAX_STREAMS")
        self.watchers = StreamBound(
            max_job_watchers or 2**62, "WatchJob streams", "FITSERVE_MAX_JOB_WATCHERS"
        )
        self._shed_count = 0
        self._logged: dict[str, float] = {}
        self._wrapped: dict[str, Handler] = {}
        self.closing = False  # the server is stopping: endless streams end with UNAVAILABLE
        self._endless: set[OpenStream] = set()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        """The method's handler behind the gate, wrapped once and reused for every call."""
        method: str = handler_call_details.method
        if (wrapped := self._wrapped.get(method)) is not None:
            return wrapped
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        wrapped = self._wrap(handler, method)
        self._wrapped[method] = wrapped
        return wrapped

    def too_big(self, size: int) -> errors.ResourceExhausted:
        """The error of a request message of ``size`` bytes over the limit."""
        return errors.ResourceExhausted(
            f"request message is {size} bytes, over this server's limit of {self._limit} "
            f"bytes; send less per call (fewer rows, smaller chunks), or raise the server's "
            f"FITSERVE_MAX_MESSAGE_BYTES (and the client's max_message_bytes)"
        )

    def overloaded(self) -> Overloaded | None:
        """The refusal of a sheddable call now, or None to admit it."""
        if self.backlog is None or self.max_wait is None:
            return None
        wait = self.backlog.wait_at(self._clock())  # measured: never shed under the bound
        if wait <= self.max_wait or random.random() >= shed_share(wait, self.max_wait):
            return None
        return Overloaded(
            f"server overloaded: calls now wait about {wait * 1000:.0f} ms in gRPC's queue "
            f"before a handler (the oldest of {self.backlog.waiting} waiting calls has waited "
            "that long), over this server's "
            f"{self.max_wait * 1000:.0f} ms (FITSERVE_INFERENCE__MAX_QUEUE_WAIT_MS); retry "
            "with backoff, or add replicas",
            min(wait, MAX_RETRY_HINT),
        )

    def end_streams(self) -> int:
        """End every endless stream (WatchJob, health Watch, reflection) with UNAVAILABLE
        saying the server is shutting down, and any that opens from now on; returns how many
        were open. Called as the server stops accepting calls."""
        self.closing = True
        for stream in self._endless:
            if stream.inside:  # else it ends as it comes back from sending
                stream.task.cancel()
        return len(self._endless)

    def bounds_of(self, method: str) -> tuple[StreamBound, ...]:
        """The stream bounds a call of a streaming ``method`` takes a slot of."""
        return (self.watchers, self.streams) if method == WATCH_METHOD else (self.streams,)

    def admit(self, context: Context, bounds: tuple[StreamBound, ...]) -> Callable[[], None]:
        """Take a slot of each bound and count the call inside a handler; returns ``leave``,
        which gives them back once (also run by gRPC when the call ends). Raises
        ResourceExhausted past a bound, holding nothing."""
        for i, bound in enumerate(bounds):
            if bound.open >= bound.limit:
                for held in bounds[:i]:
                    held.open -= 1
                raise bound.refusal()
            bound.open += 1
        backlog = self.backlog
        if backlog is not None:
            backlog.active += 1
        left = False

        def leave(*_: object) -> None:
            nonlocal left
            if left:
                return
            left = True
            if backlog is not None:
                backlog.active -= 1
            for bound in bounds:
                bound.open -= 1

        context.add_done_callback(leave)  # type: ignore[arg-type]  # stubs: a class, no protocol
        return leave

    def _log_refusal(self, kind: str, text: str) -> None:
        """One log line per ``REFUSAL_LOG_SECONDS`` and kind at most, not one per call."""
        now = time.monotonic()
        if now - self._logged.get(kind, -REFUSAL_LOG_SECONDS) >= REFUSAL_LOG_SECONDS:
            log.warning("%s: %s", kind, text)
            self._logged[kind] = now

    def _shed(self, refusal: Overloaded) -> None:
        """Count a refusal; log it now and then."""
        self._outcomes.metrics.rejections.labels("", "", "overloaded").inc()
        self._shed_count += 1
        self._log_refusal(f"shedding Predict calls ({self._shed_count} so far)", refusal.message)

    def _arrived(self) -> None:
        if self.backlog is not None:
            self.backlog.arrived += 1

    def _enter(self) -> None:
        if self.backlog is not None:
            self.backlog.active += 1

    def _leave(self) -> None:
        if self.backlog is not None:
            self.backlog.active -= 1

    def _wrap(self, handler: Handler, method: str) -> Handler:
        """``handler`` taking raw request messages, each checked and parsed here; Predict
        shed; streaming calls bounded; every call counted for the backlog."""
        serialize = handler.response_serializer
        name = method.rsplit("/", 1)[-1]
        parse = request_parser(handler.request_deserializer)
        if handler.unary_unary is not None:
            shed = method in SHED_METHODS and self.backlog is not None
            return grpc.unary_unary_rpc_method_handler(
                self._unary(handler.unary_unary, name, parse, shed), response_serializer=serialize
            )
        bounds = self.bounds_of(method)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._client_stream(handler.stream_unary, name, parse, bounds),
                response_serializer=serialize,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._server_stream(handler.unary_stream, method, parse, bounds, streamed=False),
                response_serializer=serialize,
            )
        return grpc.stream_stream_rpc_method_handler(
            self._server_stream(handler.stream_stream, method, parse, bounds, streamed=True),
            response_serializer=serialize,
        )

    def _parsed(self, raw: bytes, parse: Parse) -> Any:
        """One request message from its raw bytes; the refusal when it is too big or does
        not parse."""
        if len(raw) > self._limit:
            raise self.too_big(len(raw))
        return parse(raw)

    def _unary(
        self, inner: Any, name: str, parse: Parse, shed: bool
    ) -> Callable[..., Awaitable[Any]]:
        """A unary handler taking the raw request: refused over the size limit, shed, or
        refused when it does not parse."""

        async def unary_unary(raw: bytes, context: Context) -> Any:
            self._arrived()
            self._enter()
            try:
                if len(raw) > self._limit:
                    await self._outcomes.fail(context, name, self.too_big(len(raw)))
                if shed and (refusal := self.overloaded()) is not None:
                    self._shed(refusal)
                    await self._outcomes.fail(context, name, refusal, quiet=True)
                try:
                    request = parse(raw)
                except errors.InvalidRequest as exc:
                    await self._outcomes.fail(context, name, exc)
                return await inner(request, context)
            finally:
                self._leave()

        return unary_unary

    async def _refuse(self, context: Context, name: str, exc: errors.ResourceExhausted) -> NoReturn:
        """Refuse a call past a stream bound: counted, logged now and then."""
        self._log_refusal(f"refusing {name} calls", exc.message)
        await self._outcomes.fail(context, name, exc, quiet=True)

    def _client_stream(
        self, inner: Any, name: str, parse: Parse, bounds: tuple[StreamBound, ...]
    ) -> Callable[..., Awaitable[Any]]:
        """A client-streaming handler taking raw messages, each checked as it arrives."""

        async def stream_unary(requests: AsyncIterator[bytes], context: Context) -> Any:
            self._arrived()
            try:
                leave = self.admit(context, bounds)
            except errors.ResourceExhausted as exc:
                await self._refuse(context, name, exc)
            try:
                return await inner(self._checked_stream(requests, parse), context)
            except errors.FitserveError as exc:  # a handler that maps no errors itself
                await self._outcomes.fail(context, name, exc)
            finally:
                leave()

        return stream_unary

    def _server_stream(
        self,
        inner: Any,
        method: str,
        parse: Parse,
        bounds: tuple[StreamBound, ...],
        *,
        streamed: bool,
    ) -> Callable[..., AsyncIterator[Any]]:
        """A response-streaming handler (async generator or coroutine writing with
        ``context.write``), with one raw request message (``streamed``: a stream of them).
        An endless one ends with UNAVAILABLE when the server stops (``end_streams``)."""
        generator = inspect.isasyncgenfunction(inner)
        name = method.rsplit("/", 1)[-1]
        endless = method in ENDLESS_STREAMS

        async def stream(request: Any, context: Context) -> AsyncIterator[Any]:
            self._arrived()
            try:
                request = (
                    self._checked_stream(request, parse)
                    if streamed
                    else self._parsed(request, parse)
                )
            except errors.FitserveError as exc:
                await self._outcomes.fail(context, name, exc)
            try:
                leave = self.admit(context, bounds)
            except errors.ResourceExhausted as exc:
                await self._refuse(context, name, exc)
            task = asyncio.current_task() if endless else None
            open_stream = None if task is None else OpenStream(task)
            try:
                if open_stream is not None:
                    self._endless.add(open_stream)
                if not generator:
                    await self._inside(open_stream, inner(request, context))
                else:
                    responses = aiter(inner(request, context))
                    try:
                        while True:
                            try:
                                item = await self._inside(open_stream, anext(responses))
                            except StopAsyncIteration:
                                break
                            yield item
                    finally:
                        await responses.aclose()
            except asyncio.CancelledError:
                if task is None or not self.closing:
                    raise  # the client cancelled, or gRPC ended the call
                task.uncancel()
                await self._outcomes.fail(
                    context, name, errors.Unavailable(SHUTTING_DOWN), quiet=True
                )
            except errors.FitserveError as exc:  # a handler that maps no errors itself
                await self._outcomes.fail(context, name, exc)
            finally:
                if open_stream is not None:
                    self._endless.discard(open_stream)
                leave()

        return stream

    async def _inside(self, stream: OpenStream | None, step: Awaitable[Any]) -> Any:
        """Await ``step`` of a stream's handler, marked as inside it so ``end_streams`` may
        cancel it there; refused UNAVAILABLE once the server is stopping."""
        if stream is None:
            return await step
        if self.closing:
            if inspect.iscoroutine(step):
                step.close()
            raise errors.Unavailable(SHUTTING_DOWN)
        stream.inside = True
        try:
            return await step
        finally:
            stream.inside = False

    async def _checked_stream(
        self, requests: AsyncIterator[bytes], parse: Parse
    ) -> AsyncIterator[Any]:
        """The parsed messages of a request stream; the handler's edge maps the refusal."""
        async for raw in requests:
            yield self._parsed(raw, parse)


def request_parser(deserialize: Parse | None) -> Parse:
    """``deserialize`` (a message class's ``FromString``) raising InvalidRequest, with a
    short reason and the message's name, for bytes that are not that message."""
    if deserialize is None:
        return lambda raw: raw
    descriptor = getattr(getattr(deserialize, "__self__", None), "DESCRIPTOR", None)
    what = getattr(descriptor, "full_name", "") or "request message"

    def parse(raw: bytes) -> Any:
        try:
            return deserialize(raw)
        except (message.DecodeError, RecursionError) as exc:
            raise errors.InvalidRequest(f"request is not a valid {what}: {_why(exc)}") from None

    return parse


def _why(exc: Exception) -> str:
    """What was wrong with bytes that did not parse, in a caller's terms."""
    text = str(exc).lower()
    if isinstance(exc, RecursionError) or "depth" in text or "recursion" in text:
        return (
            "its messages are nested deeper than protobuf's recursion limit of 100 levels "
            "(each list or object in a Struct value takes 2); send a shallower message"
        )
    if "utf-8" in text or "utf8" in text:
        return "a string field is not valid UTF-8; strings must be UTF-8 text"
    return "its bytes are not a serialized protobuf message of that type"


def transport_limit(limit: int) -> int:
    """gRPC's own receive limit: room above ``limit`` so CallGate sees the oversize
    requests (up to twice the limit) and names the setting; beyond that, gRPC refuses by
    itself before the message reaches Python. gRPC takes a signed 32-bit int."""
    return min(2 * limit, 2**31 - 1)
