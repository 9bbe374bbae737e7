"""Serving: one gRPC server (``serve``), N of them on one port under a supervisor
(``serve --processes N``), and starting a server process from a parent (``start_server``).

The N processes share their port with SO_REUSEPORT, so the kernel spreads connections over
them; they are the only servers that set it (create_server's ``share_port``, which the
supervisor asks for in their environment, SHARED_PORT_ENV): any other server on a port in
use fails at start with "address in use". The supervisor reserves that port itself: having
checked that no other process holds it, it binds a SO_REUSEPORT socket (to port 0 unless a
port is given) and holds it, never listening, for the whole run. The kernel hands
connections only to listening sockets, so the reservation takes none; it only keeps the
port ours while children start, stop or are replaced.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from service.config import Settings
from service.launch.ready import READY_TIMEOUT, Ready, wait_ready, write_ready
from service.launch.supervision import (
    STOP_TIMEOUT,
    Child,
    ChildExited,
    Interrupted,
    log_tail,
    never,
    spawn,
    stop_flag,
    supervise,
    terminate,
)

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

log = logging.getLogger("fitserve")
# Set by serve_processes in its children's environment: this server shares its port.
SHARED_PORT_ENV = "FITSERVE_SERVE_SHARED_PORT"
DRAIN_ENV = "FITSERVE_SHUTDOWN__DRAIN_SECONDS"


class PortTaken(SystemExit):
    """A server cannot start: its port is in use (the message names host:port)."""


async def serve(settings: Settings, ready_file: Path | None = None) -> None:
    """Run one server until SIGTERM or SIGINT, then stop gracefully (``shutdown``: health
    NOT_SERVING, the drain, the grace); once it listens, report its ports at
    ``ready_file``."""
    from service.api.server import AddressInUse, create_server

    try:
        server, port = await create_server(settings, share_port=SHARED_PORT_ENV in os.environ)
    except AddressInUse as exc:
        raise PortTaken(f"fitserve serve: {exc.strerror}") from None
    aggregated = "PROMETHEUS_MULTIPROC_DIR" in os.environ  # a child of serve_processes
    await server.start(serve_metrics_http=not aggregated)
    # What is alive now (TensorFlow, gRPC, the whole import graph) lives as long as the
    # process: keep it out of the cyclic GC, whose full passes over it paused the server
    # under load (measured; bench/README.md).
    gc.collect()
    gc.freeze()
    stop, hurry = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()

    def signalled() -> None:  # the first signal drains, a second cuts the drain short
        (hurry if stop.is_set() else stop).set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, signalled)
    if ready_file is not None:
        write_ready(ready_file, port, None if aggregated else server.metrics_port)
    _announce(settings, port, server.metrics_port, aggregated)
    await stop.wait()
    await server.shutdown(hurry)


def _announce(settings: Settings, port: int, metrics_port: int, aggregated: bool) -> None:
    metrics = (
        f"metrics in {os.environ['PROMETHEUS_MULTIPROC_DIR']}"
        if aggregated
        else f"metrics: http://{settings.host}:{metrics_port}/metrics"
    )
    print(
        f"fitserve server listening on {settings.host}:{port} (roles: {','.join(settings.roles)}; "
        f"pid {os.getpid()}; {metrics}){tls_suffix(settings)}",
        flush=True,
    )


def tls_suffix(settings: Settings) -> str:
    """What a banner adds when the gRPC port serves TLS ("" for plaintext)."""
    if not settings.tls.enabled:
        return ""
    return f"; {settings.tls.mode} (certificate {settings.tls.cert_file})"


def serve_argv(*args: str) -> list[str]:
    """The command line of a server process: ``python -m service.main serve`` + ``args``."""
    return [sys.executable, "-m", "service.main", "serve", *args]


def start_server(
    argv: Sequence[str],
    env: Mapping[str, str] | None = None,
    log: Path | int | None = None,
    cwd: Path | None = None,
    *,
    prefix: Sequence[str] = (),
    timeout: float = READY_TIMEOUT,
    stopping: Callable[[], bool] = never,
) -> tuple[subprocess.Popen[bytes], Ready]:
    """Start a server process that takes ``--ready-file`` (``serve_argv``, or a benchmark's
    reference server) and wait until it listens; returns it and what it reported.

    A server that exits first raises ChildExited at once, with the end of its log. Its
    drain on SIGTERM is 0 unless ``env`` sets FITSERVE_SHUTDOWN__DRAIN_SECONDS: what starts
    a server this way (``fitserve up``, the tests, the benchmarks) has no load balancer
    that needs time to move away from it.
    """
    env = dict(os.environ if env is None else env)
    env.setdefault(DRAIN_ENV, "0")
    with tempfile.TemporaryDirectory(prefix="fitserve-ready-") as tmp:
        path = Path(tmp) / "ready.json"
        proc = spawn([*prefix, *argv, "--ready-file", str(path)], env, log, cwd)
        try:
            (ready,) = wait_ready([path], [("server", proc)], timeout, stopping)
        except ChildExited as exc:
            raise ChildExited(exc.name, exc.code, f" before it was ready{log_tail(log)}") from None
        except BaseException:
            terminate([proc])
            raise
    return proc, ready


def reserve_port(host: str, port: int) -> socket.socket:
    """A SO_REUSEPORT socket bound (not listening) to ``host:port``; port 0 picks one.
    PortTaken when another process holds the port, even one that shares it with
    SO_REUSEPORT itself (another ``serve --processes N``)."""
    from service.api.server import address_in_use, in_use_message

    if port and address_in_use(host, port):
        raise PortTaken(f"fitserve serve: {in_use_message(host, port)}")
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def serve_processes(settings: Settings, ready_file: Path | None = None) -> int:
    """Run ``settings.processes`` servers on one port until SIGTERM/SIGINT (exit 0) or
    until one of them dies (exit 1); this process serves their aggregated /metrics and,
    once every child listens, reports the shared port at ``ready_file``.

    Each child writes its metrics into a folder that only this run uses
    (PROMETHEUS_MULTIPROC_DIR), so counts never carry over from an old run.
    """
    stopping = stop_flag()
    with (
        reserve_port(settings.host, settings.port) as held,
        tempfile.TemporaryDirectory(prefix="fitserve-metrics-") as metrics_dir,
    ):
        port: int = held.getsockname()[1]
        children = [
            (f"server {i}", _serve_child(settings, port, Path(metrics_dir), i))
            for i in range(settings.processes)
        ]
        try:
            return _run_servers(settings, port, Path(metrics_dir), children, stopping, ready_file)
        finally:
            stop_children(settings, children)


def stop_timeout(settings: Settings) -> float:
    """How long a stopping server process gets before SIGKILL: its drain and grace, plus
    the time to close its parts, and never less than supervision's STOP_TIMEOUT."""
    from service.api.app import CLOSE_SECONDS

    grace = settings.shutdown.grace_seconds
    grace = settings.grace_seconds if grace is None else grace
    return max(STOP_TIMEOUT, settings.shutdown.drain_seconds + grace + CLOSE_SECONDS)


def stop_children(settings: Settings, children: list[Child]) -> None:
    """SIGTERM every server process at once (each drains: health NOT_SERVING, still
    serving for the drain, then the grace), SIGKILL one still running past its bound."""
    terminate([proc for _, proc in children], stop_timeout(settings))


def _run_servers(
    settings: Settings,
    port: int,
    metrics_dir: Path,
    children: list[Child],
    stopping: Callable[[], bool],
    ready_file: Path | None,
) -> int:
    from service.metrics import serve_metrics, stop_metrics

    registry = _aggregated_metrics(settings, metrics_dir)
    http, metrics_port = serve_metrics(registry, settings.host, settings.metrics_port)
    try:
        print(
            f"fitserve serve: {len(children)} processes on {settings.host}:{port} (pids "
            f"{', '.join(str(p.pid) for _, p in children)}); aggregated metrics: "
            f"http://{settings.host}:{metrics_port}/metrics (from {metrics_dir})"
            f"{tls_suffix(settings)}",
            flush=True,
        )
        if ready_file is not None:
            _report_when_ready(children, metrics_dir, stopping, ready_file, port, metrics_port)
        return supervise(children, stopping, "fitserve serve", "every server process")
    finally:
        stop_children(settings, children)  # /metrics stays up while they drain
        stop_metrics(http)


def _report_when_ready(
    children: list[Child],
    metrics_dir: Path,
    stopping: Callable[[], bool],
    ready_file: Path,
    port: int,
    metrics_port: int,
) -> None:
    """Write ``ready_file`` once every child reported; a child that died or a stop signal
    leaves it unwritten, for ``supervise`` to report at its first look."""
    paths = [_child_ready_file(metrics_dir, i) for i in range(len(children))]
    try:
        wait_ready(paths, children, stopping=stopping)
    except (ChildExited, Interrupted):
        return
    write_ready(ready_file, port, metrics_port)


def _child_ready_file(metrics_dir: Path, index: int) -> Path:
    return metrics_dir / f"ready-{index}.json"


def _aggregated_metrics(settings: Settings, metrics_dir: Path) -> CollectorRegistry:
    """The children's metrics files, plus the evaluations the api role reads from the store
    at scrape time (a collector, so no child writes them to a file)."""
    from service.job_metrics import register_store_collectors
    from service.metrics import aggregate_registry

    registry = aggregate_registry(str(metrics_dir))
    if "api" in settings.roles:
        register_store_collectors(registry, settings)
    return registry


def _serve_child(
    settings: Settings, port: int, metrics_dir: Path, index: int
) -> subprocess.Popen[bytes]:
    """One server process of ``serve_processes`` (in its own session: Ctrl-C reaches only
    the supervisor, which then stops the children)."""
    argv = serve_argv("--processes", "1", "--data-dir", str(settings.data_dir.resolve()))
    argv += ["--host", settings.host, "--port", str(port), "--roles", ",".join(settings.roles)]
    argv += ["--ready-file", str(_child_ready_file(metrics_dir, index))]
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(metrics_dir))
    return spawn(argv, env | {SHARED_PORT_ENV: str(port)})
