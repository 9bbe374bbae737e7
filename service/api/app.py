"""The running server: the grpc.aio server plus everything that must start and close with it."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any
from wsgiref.simple_server import WSGIServer

import grpc
from grpc_health.v1 import health

from service.api.backlog import Backlog, watch_backlog
from service.config import Settings
from service.metrics import Metrics, serve_metrics, stop_metrics

log = logging.getLogger(__name__)
CLOSE_SECONDS = 10.0  # the longest one part (Redis, models, feedback) may take to close


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
    backlog: Backlog | None = None
    _watch: asyncio.Task[None] | None = None

    async def start(self, *, serve_metrics_http: bool = True) -> None:
        """Start serving gRPC (and /metrics over HTTP unless told not to)."""
        await self.grpc_server.start()
        if self.backlog is not None:
            self._watch = asyncio.get_running_loop().create_task(
                watch_backlog(self.backlog, self.metrics)
            )
        if serve_metrics_http:
            self.metrics_server, self.metrics_port = serve_metrics(
                self.metrics.registry, self.settings.host, self.settings.metrics_port
            )

    async def stop(self, grace: float | None = None) -> None:
        """Refuse new calls, let in-flight ones finish for ``grace`` seconds, close the rest."""
        await self.health.enter_graceful_shutdown()
        await self.grpc_server.stop(self.settings.grace_seconds if grace is None else grace)
        if self._watch is not None:
            self._watch.cancel()
        await self.close_parts()
        if self.metrics_server is not None:
            stop_metrics(self.metrics_server)

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
