"""What every call passes before its handler: the message size limit and load shedding.

One server interceptor (``CallGate``) wraps every handler once per method:

* **Size.** Request messages over ``FITSERVE_MAX_MESSAGE_BYTES`` are refused with a status
  that names the limit and the setting; gRPC's own refusal ("received message larger than
  max") names neither. The transport is configured with headroom (``transport_limit``) so
  the check, on the raw bytes before they are parsed, sees them.
* **Load shedding.** Under overload a grpc.aio server does not queue calls where Python can
  see them: gRPC's C core holds the calls that have arrived until the server's accept loop
  takes them, one per event-loop turn. The batcher's queue stays short, the event loop's lag
  stays under a millisecond, and yet each call waits ~100 ms before any handler runs (256
  closed-loop callers, measured with ``make bench``). ``Backlog`` measures that hidden queue:
  gRPC's channelz counts the calls the core has started and finished; calls that reached a
  handler and have not returned are counted here; the difference is the calls still waiting
  in the core. Divided by the rate calls reach the handlers (Little's law), it is how long a
  call arriving now waits. While that is over ``FITSERVE_INFERENCE__MAX_QUEUE_WAIT_MS``,
  a share of Predict calls (fitserve's and TF Serving's; ``shed_share``) is refused with
  RESOURCE_EXHAUSTED and a RetryInfo, before the request is parsed. Control-plane calls
  (health, jobs, uploads) are never shed.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeAlias

import grpc

from service import errors
from service.api.status import Context, Edge
from service.metrics import Metrics

log = logging.getLogger(__name__)

Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"  # generic in the stubs only

SHED_METHODS = frozenset(
    {
        "/fitserve.v1.InferenceService/Predict",
        "/tensorflow.serving.PredictionService/Predict",
    }
)
DRAIN_SMOOTHING = 0.1  # weight of each interval's drain rate in the moving average
MAX_SHED_SHARE = 0.95
MAX_RETRY_HINT = 5.0  # seconds; the longest retry hint a refusal sends, as the batcher's
SHED_LOG_SECONDS = 10.0
RATE_TTL = 1.0  # seconds a measured drain rate is trusted without a new measurement
MIN_DRAIN_RATE = 1.0  # calls/s: a server draining slower than this counts as this slow


class Overloaded(errors.ResourceExhausted):
    """Calls wait too long in gRPC's queue; ``retry_after_seconds`` is that wait."""


def _cygrpc() -> Any:
    """grpcio's core binding: what grpcio-channelz's servicer reads channelz from, too
    (that package is not published for every grpcio release)."""
    return importlib.import_module("grpc._cython.cygrpc")


def channelz_counts(server_id: int) -> tuple[int, int, int]:
    """Calls started, succeeded and failed of one gRPC server, from channelz."""
    data = json.loads(_cygrpc().channelz_get_server(server_id))["server"]["data"]
    return (
        int(data.get("callsStarted", 0)),
        int(data.get("callsSucceeded", 0)),
        int(data.get("callsFailed", 0)),
    )


def channelz_server_ids() -> set[int]:
    """The ids of the gRPC servers of this process (empty when channelz is unavailable)."""
    try:
        found = json.loads(_cygrpc().channelz_get_servers(0)).get("server", [])
    except Exception:  # an unexpected grpcio build: shedding turns itself off
        return set()
    return {int(s["ref"]["serverId"]) for s in found}


class Backlog:
    """How many calls wait in gRPC's core before a handler, and for how long.

    The wait is the calls waiting divided by the rate calls leave the core's queue while it
    stays busy. An interval is measured only when calls still wait at its end and the
    calls waiting at its start were enough for all it took: then the server was taking
    calls all along, and the rate is its capacity, not the rate callers happen to send at
    (a lightly loaded server, or the interval in which a burst lands, is not measured).
    A rate older than ``RATE_TTL`` is forgotten; without a rate nothing is estimated, so a
    burst on a server that has not been saturated lately is not shed.
    """

    def __init__(self, read_counts: Callable[[], tuple[int, int, int]]) -> None:
        self._read = read_counts
        self.active = 0  # calls inside a handler
        self.arrived = 0  # calls that have reached a handler, ever
        self.waiting = 0  # calls in the core, not yet at a handler
        self.wait_seconds = 0.0
        self.drain_rate: float | None = None  # calls/s reaching handlers while some wait
        self._rate_at = 0.0  # when drain_rate was last measured
        self._last: tuple[float, int] | None = None

    def count_waiting(self) -> int:
        """Calls in the core not at a handler yet, read now (any thread; ~0.1 ms; 0 when
        the counts cannot be read, e.g. once the server has stopped)."""
        try:
            started, succeeded, failed = self._read()
        except Exception:
            return 0
        return max(0, started - succeeded - failed - self.active)

    def update(self, now: float | None = None) -> None:
        """Read the core's counts and re-estimate the wait (called every few ms)."""
        now = time.monotonic() if now is None else now
        started, succeeded, failed = self._read()
        waiting = max(0, started - succeeded - failed - self.active)
        then, arrived = self._last or (now, self.arrived)
        taken = self.arrived - arrived
        # Busy the whole interval: the calls waiting at its start were enough for all it
        # took, and calls still wait at its end.
        if now > then and waiting and self.waiting and self.waiting >= taken:
            sample = taken / (now - then)
            rate = self.drain_rate
            self.drain_rate = sample if rate is None else rate + DRAIN_SMOOTHING * (sample - rate)
            self._rate_at = now
        elif self.drain_rate is not None and now - self._rate_at > RATE_TTL:
            self.drain_rate = None
        self._last = (now, self.arrived)
        self.waiting = waiting
        rate = self.drain_rate
        if not self.waiting or rate is None:
            self.wait_seconds = 0.0
        else:
            self.wait_seconds = self.waiting / max(rate, MIN_DRAIN_RATE)


def shed_share(wait: float, max_wait: float) -> float:
    """The share of sheddable calls refused at an estimated ``wait``: none up to
    ``max_wait``, rising to ``MAX_SHED_SHARE`` at 1.5 x ``max_wait``.

    Never all: callers that retry at once without backing off keep gRPC's queue full
    however fast refusals are, so refusing everything would serve no one. Refusing a share
    settles the wait a little over ``max_wait`` and keeps serving the rest.
    """
    return min(MAX_SHED_SHARE, max(0.0, 2 * (wait - max_wait) / max_wait))


class CallGate(grpc.aio.ServerInterceptor):
    """The size limit on every request message, and shedding of Predict calls.

    ``backlog`` is None when shedding is off (``max_wait`` unset, or no channelz).
    """

    def __init__(
        self,
        limit: int,
        edge: Edge,
        backlog: Backlog | None = None,
        max_wait: float | None = None,
    ) -> None:
        self._limit, self._edge = limit, edge
        self.backlog, self.max_wait = backlog, max_wait
        self._shed_count, self._shed_logged = 0, -SHED_LOG_SECONDS
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
        wait = self.backlog.wait_seconds
        if wait <= self.max_wait or random.random() >= shed_share(wait, self.max_wait):
            return None
        return Overloaded(
            f"server overloaded: calls now wait about {wait * 1000:.0f} ms in gRPC's queue "
            f"({self.backlog.waiting} calls) before a handler, over this server's "
            f"{self.max_wait * 1000:.0f} ms (FITSERVE_INFERENCE__MAX_QUEUE_WAIT_MS); retry "
            "with backoff, or add replicas",
            min(wait, MAX_RETRY_HINT),
        )

    def _shed(self, refusal: Overloaded) -> None:
        """Count a refusal; log one line per ``SHED_LOG_SECONDS`` at most, not one per call."""
        self._edge.metrics.rejections.labels("", "", "overloaded").inc()
        self._shed_count += 1
        now = time.monotonic()
        if now - self._shed_logged >= SHED_LOG_SECONDS:
            log.warning("shedding Predict calls (%d so far): %s", self._shed_count, refusal.message)
            self._shed_logged = now

    def _wrap(self, handler: Handler, method: str) -> Handler:
        name = method.rsplit("/", 1)[-1]
        shed = method in SHED_METHODS and self.backlog is not None
        parse = handler.request_deserializer or (lambda raw: raw)
        serialize = handler.response_serializer
        counted = self._counted
        if handler.unary_unary is not None:
            inner: Any = handler.unary_unary

            async def unary_unary(raw: bytes, context: Context) -> Any:
                if len(raw) > self._limit:
                    await self._edge.fail(context, name, self.too_big(len(raw)))
                if shed and (refusal := self.overloaded()) is not None:
                    self._shed(refusal)
                    await self._edge.fail(context, name, refusal, quiet=True)
                return await inner(parse(raw), context)

            return grpc.unary_unary_rpc_method_handler(
                counted(unary_unary), response_serializer=serialize
            )
        if handler.stream_unary is not None:
            inner_stream: Any = handler.stream_unary

            async def stream_unary(requests: AsyncIterator[bytes], context: Context) -> Any:
                return await inner_stream(self._checked_stream(requests, parse), context)

            return grpc.stream_unary_rpc_method_handler(
                counted(stream_unary), response_serializer=serialize
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._counted_stream(handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=serialize,
            )
        return grpc.stream_stream_rpc_method_handler(
            self._counted_stream(handler.stream_stream),
            request_deserializer=handler.request_deserializer,
            response_serializer=serialize,
        )

    def _counted(self, fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        """``fn``, counted as a call inside a handler while it runs."""
        backlog = self.backlog
        if backlog is None:
            return fn

        async def call(request: Any, context: Context) -> Any:
            backlog.arrived += 1
            backlog.active += 1
            try:
                return await fn(request, context)
            finally:
                backlog.active -= 1

        return call

    def _counted_stream(self, fn: Any) -> Any:
        """A response-streaming handler (async generator or coroutine), counted."""
        backlog = self.backlog
        if backlog is None:
            return fn
        if not inspect.isasyncgenfunction(fn):
            return self._counted(fn)

        async def stream(request: Any, context: Context) -> AsyncIterator[Any]:
            backlog.arrived += 1
            backlog.active += 1
            try:
                async for item in fn(request, context):
                    yield item
            finally:
                backlog.active -= 1

        return stream

    async def _checked_stream(
        self, requests: AsyncIterator[bytes], parse: Callable[[bytes], Any]
    ) -> AsyncIterator[Any]:
        """The parsed messages of a request stream; the handler's edge maps the refusal."""
        async for raw in requests:
            if len(raw) > self._limit:
                raise self.too_big(len(raw))
            yield parse(raw)


async def watch_backlog(backlog: Backlog, metrics: Metrics, interval: float = 0.01) -> None:
    """Keep ``backlog`` and its gauges current until cancelled."""
    while True:
        await asyncio.sleep(interval)  # a sampling period, not a wait for a condition
        try:
            backlog.update()
        except Exception as exc:  # channelz changed shape: stop shedding, keep serving
            log.warning("load shedding is off: cannot read gRPC's channelz counts (%s)", exc)
            backlog.wait_seconds = 0.0
            return
        metrics.grpc_queued_calls.set(backlog.waiting)
        metrics.grpc_queue_wait.set(backlog.wait_seconds)


def transport_limit(limit: int) -> int:
    """gRPC's own receive limit: room above ``limit`` so CallGate sees the oversize
    requests (up to twice the limit) and names the setting; beyond that, gRPC refuses by
    itself before the message reaches Python. gRPC takes a signed 32-bit int."""
    return min(2 * limit, 2**31 - 1)
