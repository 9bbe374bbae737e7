"""The running server: the grpc.aio server plus everything that must start and close with it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any
from wsgiref.simple_server import WSGIServer

import grpc
from grpc_health.v1 import health

from service.api.backlog import Backlog, watch_backlog
from service.api.gate import CallGate
from service.config import Settings
from service.metrics import Metrics, serve_metrics, stop_metrics

log = logging.getLogger(__name__)
CLOSE_SECONDS = 10.0  # the longest one part (Redis, models, feedback) may take to close
QUEUE_POLL_SECONDS = 0.01  # how often a stopping server looks whether gRPC's queue is empty


@dataclass
class FitserveServer:
    """A grpc.aio server plus what must close with it (Redis, models, /metrics)."""

    grpc_server: grpc.aio.Server
    settings: Settings
    metrics: Metrics
    health: health.aio.HealthServicer
    closers: list[Any] = field(default_factory=list)
    metrics_server: WSGIServer | None = None
    metrics_port: int = 0
    backlog: Backlog | None = None  # the calls waiting in gRPC's queue (None: no channelz)
    gate: CallGate | None = None  # ends the endless streams as the server stops
    watch_backlog: bool = False  # keep the backlog current (shedding, the batcher)
    _watch: asyncio.Task[None] | None = None

    async def start(self, *, serve_metrics_http: bool = True) -> None:
        """Start serving gRPC (and /metrics over HTTP unless told not to)."""
        await self.grpc_server.start()
        if self.backlog is not None and self.watch_backlog:
            self._watch = asyncio.get_running_loop().create_task(
                watch_backlog(self.backlog, self.metrics)
            )
        if serve_metrics_http:
            self.metrics_server, self.metrics_port = serve_metrics(
                self.metrics.registry, self.settings.host, self.settings.metrics_port
            )

    @property
    def grace_seconds(self) -> float:
        """How long calls in flight may finish once the server stops accepting."""
        grace = self.settings.shutdown.grace_seconds
        return self.settings.grace_seconds if grace is None else grace

    async def shutdown(self, hurry: asyncio.Event | None = None) -> None:
        """The stop of SIGTERM/SIGINT: every health entry NOT_SERVING at once, new calls
        still served for ``shutdown.drain_seconds`` (until ``hurry`` is set, by a second
        signal) while load balancers move away, then ``stop`` with the grace."""
        await self.health.enter_graceful_shutdown()
        drain = self.settings.shutdown.drain_seconds
        log.info(
            "shutting down: health NOT_SERVING; serving for %.1f s more while clients move "
            "away, then %.1f s for the calls in flight",
            drain,
            self.grace_seconds,
            extra={"drain_seconds": drain, "grace_seconds": self.grace_seconds},
        )
        if drain > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for((hurry or asyncio.Event()).wait(), drain)
        await self.stop()

    async def stop(self, grace: float | None = None) -> None:
        """Refuse new calls, end the endless streams (WatchJob, health Watch) with
        UNAVAILABLE, let the calls in flight finish for ``grace`` seconds (default: the
        setting), cancel the rest, close the parts.

        gRPC's shutdown cancels the calls still waiting in its core's queue (arrived, not
        yet taken by a handler), so those are taken first, for up to half the grace.
        """
        grace = self.grace_seconds if grace is None else grace
        deadline = time.monotonic() + grace
        await self.health.enter_graceful_shutdown()
        await self._take_queued(time.monotonic() + grace / 2)
        if self.gate is not None:
            # The streams' cancellations run at the next loop turn: by then the server
            # below has stopped accepting, so their retries go elsewhere.
            ended = self.gate.end_streams()
            if ended:
                log.info("ending %d open streams (WatchJob, health Watch) with UNAVAILABLE", ended)
        await self.grpc_server.stop(max(0.0, deadline - time.monotonic()))
        if self._watch is not None:
            self._watch.cancel()
        await self.close_parts()
        if self.metrics_server is not None:
            stop_metrics(self.metrics_server)

    async def _take_queued(self, until: float) -> None:
        """Go on serving until no call waits in gRPC's queue, or ``until`` (monotonic)."""
        backlog = self.backlog
        if backlog is None or time.monotonic() >= until:
            return
        if backlog.rebasing:  # calls cancelled while queued are not waiting
            try:
                lost, took = await asyncio.to_thread(backlog.measure_lost)
                backlog.rebased(lost, took, time.monotonic())
            except Exception:  # the counts cannot be read: nothing to wait for
                return
        while (waiting := backlog.count_waiting()) > 0:
            if time.monotonic() >= until:
                log.warning("%d calls still wait in gRPC's queue; stopping cancels them", waiting)
                return
            await asyncio.sleep(QUEUE_POLL_SECONDS)  # a polling period, bounded by ``until``

    async def close_parts(self) -> None:
        """Close what the server holds (Redis clients, models, feedback), last added first;
        also for a server that failed to start, so nothing it opened is left behind."""
        for close in reversed(self.closers):
            name = getattr(close, "__qualname__", close)
            try:
                await asyncio.wait_for(close(), CLOSE_SECONDS)
            except TimeoutError:  # a stop is bounded: say which part hung, close the rest
                log.error("closing %s took over %.0f s; left behind", name, CLOSE_SECONDS)
            except Exception:  # one part failing to close must not keep the others open
                log.exception("closing %s failed", name)

    async def wait_for_termination(self) -> None:
        """Return once the gRPC server has stopped (``stop``, or a signal's handler)."""
        await self.grpc_server.wait_for_termination()
