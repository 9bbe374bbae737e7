"""What every call passes before its handler: the message size limit and load shedding.

One server interceptor (``CallGate``) wraps every handler once per method:

* **Size.** Request messages over ``FITSERVE_MAX_MESSAGE_BYTES`` are refused with a status
  that names the limit and the setting; gRPC's own refusal ("received message larger than
  max") names neither. The transport is configured with headroom (``transport_limit``) so
  the check, on the raw bytes before they are parsed, sees them.
* **Load shedding.** While the wait in gRPC's own queue (estimated by
  ``service.api.backlog.Backlog``, which the gate feeds with the calls inside handlers) is
  over ``FITSERVE_INFERENCE__MAX_QUEUE_WAIT_MS``, a share of Predict calls (fitserve's and
  TF Serving's; ``shed_share``) is refused with RESOURCE_EXHAUSTED and a RetryInfo, before
  the request is parsed. Control-plane calls (health, jobs, uploads) are never shed.
"""

from __future__ import annotations

import inspect
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeAlias

import grpc

from service import errors
from service.api.backlog import Backlog, Overloaded, shed_share
from service.api.status import Context, RpcOutcomes

log = logging.getLogger(__name__)

Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"  # generic in the stubs only

SHED_METHODS = frozenset(
    {
        "/fitserve.v1.InferenceService/Predict",
        "/tensorflow.serving.PredictionService/Predict",
    }
)
MAX_RETRY_HINT = 5.0  # seconds; the longest retry hint a refusal sends, as the batcher's
SHED_LOG_SECONDS = 10.0


class CallGate(grpc.aio.ServerInterceptor):
    """The size limit on every request message, and shedding of Predict calls.

    ``backlog`` is None when shedding is off (``max_wait`` unset, or no channelz).
    """

    def __init__(
        self,
        limit: int,
        outcomes: RpcOutcomes,
        backlog: Backlog | None = None,
        max_wait: float | None = None,
    ) -> None:
        self._limit, self._outcomes = limit, outcomes
        self.backlog, self.max_wait = backlog, max_wait
        self._shed_count, self._shed_logged = 0, -SHED_LOG_SECONDS
        self._wrapped: dict[str, Handler] = {}

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
        self._outcomes.metrics.rejections.labels("", "", "overloaded").inc()
        self._shed_count += 1
        now = time.monotonic()
        if now - self._shed_logged >= SHED_LOG_SECONDS:
            log.warning("shedding Predict calls (%d so far): %s", self._shed_count, refusal.message)
            self._shed_logged = now

    def _wrap(self, handler: Handler, method: str) -> Handler:
        """``handler`` with its request messages checked on the raw bytes (unary and
        client-streaming requests), Predict shed, and the call counted for the backlog."""
        serialize = handler.response_serializer
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._counted(self._gated(handler, method)), response_serializer=serialize
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._counted(self._gated_stream(handler)), response_serializer=serialize
            )
        parse = handler.request_deserializer
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._counted_stream(handler.unary_stream),
                request_deserializer=parse,
                response_serializer=serialize,
            )
        return grpc.stream_stream_rpc_method_handler(
            self._counted_stream(handler.stream_stream),
            request_deserializer=parse,
            response_serializer=serialize,
        )

    def _gated(self, handler: Handler, method: str) -> Callable[..., Awaitable[Any]]:
        """A unary handler taking the raw request: refused over the size limit, or shed."""
        name = method.rsplit("/", 1)[-1]
        shed = method in SHED_METHODS and self.backlog is not None
        parse = handler.request_deserializer or (lambda raw: raw)
        inner: Any = handler.unary_unary

        async def unary_unary(raw: bytes, context: Context) -> Any:
            if len(raw) > self._limit:
                await self._outcomes.fail(context, name, self.too_big(len(raw)))
            if shed and (refusal := self.overloaded()) is not None:
                self._shed(refusal)
                await self._outcomes.fail(context, name, refusal, quiet=True)
            return await inner(parse(raw), context)

        return unary_unary

    def _gated_stream(self, handler: Handler) -> Callable[..., Awaitable[Any]]:
        """A client-streaming handler taking raw messages, each checked as it arrives."""
        parse = handler.request_deserializer or (lambda raw: raw)
        inner: Any = handler.stream_unary

        async def stream_unary(requests: AsyncIterator[bytes], context: Context) -> Any:
            return await inner(self._checked_stream(requests, parse), context)

        return stream_unary

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


def transport_limit(limit: int) -> int:
    """gRPC's own receive limit: room above ``limit`` so CallGate sees the oversize
    requests (up to twice the limit) and names the setting; beyond that, gRPC refuses by
    itself before the message reaches Python. gRPC takes a signed 32-bit int."""
    return min(2 * limit, 2**31 - 1)
