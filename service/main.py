"""Server-side commands: ``serve``, ``worker`` and ``up`` (run by the ``fitserve`` CLI).

``python -m service.main serve`` runs one gRPC server (``--processes N``: N of them on one
port, supervised); ``worker`` runs a Celery worker
(``--gpus``: one per GPU, supervised); ``up`` runs the whole stack on this
machine (see ``service.stack``).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from service.config import Settings
from service.logs import configure_logging

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

log = logging.getLogger("fitserve")


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {
        k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None
    }
    return Settings(**overrides)


async def serve(settings: Settings) -> None:
    """Run one server until SIGTERM or SIGINT, then stop gracefully."""
    from service.api.server import create_server

    server, port = await create_server(settings)
    aggregated = "PROMETHEUS_MULTIPROC_DIR" in os.environ  # a child of serve_processes
    await server.start(serve_metrics_http=not aggregated)
    # What is alive now (TensorFlow, gRPC, the whole import graph) lives as long as the
    # process: keep it out of the cyclic GC, whose full passes over it paused the server
    # for ~190 ms at a time under load (measured; none with the freeze).
    gc.collect()
    gc.freeze()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    metrics = (
        f"metrics in {os.environ['PROMETHEUS_MULTIPROC_DIR']}"
        if aggregated
        else f"metrics: http://{settings.host}:{server.metrics_port}/metrics"
    )
    print(
        f"fitserve server listening on {settings.host}:{port} (roles: {','.join(settings.roles)}; "
        f"pid {os.getpid()}; {metrics})",
        flush=True,
    )
    await stop.wait()
    log.info("shutting down", extra={"grace_seconds": settings.grace_seconds})
    await server.stop()


def serve_processes(settings: Settings) -> int:
    """Run ``settings.processes`` servers on one port until SIGTERM/SIGINT (exit 0) or
    until one of them dies (exit 1); this process serves their aggregated /metrics.

    The port is shared with SO_REUSEPORT (set by create_server), so the kernel spreads
    connections over the processes. Each child writes its metrics into a folder that only
    this run uses (PROMETHEUS_MULTIPROC_DIR), so counts never carry over from an old run.
    """
    from service.metrics import serve_metrics, stop_metrics
    from service.stack import free_port, supervise, terminate

    stopping = _stop_flag()
    port = settings.port or free_port()
    with tempfile.TemporaryDirectory(prefix="fitserve-metrics-") as metrics_dir:
        n = settings.processes
        children = [(f"server {i}", _serve_child(settings, port, metrics_dir)) for i in range(n)]
        try:
            registry = _aggregated_metrics(settings, metrics_dir)
            http, metrics_port = serve_metrics(registry, settings.host, settings.metrics_port)
            print(
                f"fitserve serve: {n} processes on {settings.host}:{port} (pids "
                f"{', '.join(str(p.pid) for _, p in children)}); aggregated metrics: "
                f"http://{settings.host}:{metrics_port}/metrics (from {metrics_dir})",
                flush=True,
            )
            code = supervise(children, stopping, "fitserve serve", "every server process")
            stop_metrics(http)
            return code
        finally:
            terminate([proc for _, proc in children])


def _aggregated_metrics(settings: Settings, metrics_dir: str) -> CollectorRegistry:
    """The children's metrics files, plus the evaluations the api role reads from the store
    at scrape time (a collector, so no child writes them to a file)."""
    from service.job_metrics import register_store_collectors
    from service.metrics import aggregate_registry

    registry = aggregate_registry(metrics_dir)
    if "api" in settings.roles:
        register_store_collectors(registry, settings)
    return registry


def _stop_flag() -> Callable[[], bool]:
    """Turn SIGINT/SIGTERM into a flag the supervision loop polls."""
    received: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: received.append(signum))
    return lambda: bool(received)


def _serve_child(settings: Settings, port: int, metrics_dir: str) -> subprocess.Popen[bytes]:
    """One server process of ``serve_processes``, in its own session (Ctrl-C reaches only
    the supervisor, which then stops the children)."""
    argv = [sys.executable, "-m", "service.main", "serve", "--processes", "1"]
    argv += ["--data-dir", str(settings.data_dir.resolve()), "--host", settings.host]
    argv += ["--port", str(port), "--roles", ",".join(settings.roles)]
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=metrics_dir)
    return subprocess.Popen(argv, env=env, start_new_session=True)


def worker_argv(queues: str, concurrency: int, loglevel: str, node: str = "") -> list[str]:
    """The Celery command line of one fitserve worker process; ``node`` names it in
    Celery (default ``fitserve-<pid>``), which must differ between processes of a host."""
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.app",
        "worker",
        "-Q",
        queues,
        "-c",
        str(concurrency),
        "--pool",
        "prefork",
        "-n",
        f"{node or f'fitserve-{os.getpid()}'}@%h",
        "--loglevel",
        loglevel,
        "--without-gossip",
        "--without-mingle",
    ]


class GpuChoiceError(ValueError):
    """``--gpus`` names GPUs this machine does not have; the message says what to do."""


NO_GPUS = "no GPUs found; run without --gpus for a CPU worker"


def chosen_gpus(gpus: str, discovered: list[str]) -> list[str]:
    """The GPU ids ``--gpus`` selects: ``all``, a count ``N`` (the first N), or ids
    ``0,1`` (a single id with a trailing comma: ``3,``)."""
    if not discovered:
        raise GpuChoiceError(NO_GPUS)
    if gpus == "all":
        return list(discovered)
    if gpus.isdigit():
        count = int(gpus)
        if not 1 <= count <= len(discovered):
            raise GpuChoiceError(
                f"--gpus {count}: this machine has {len(discovered)} GPUs "
                f"({', '.join(discovered)}); give a count from 1 to {len(discovered)}"
            )
        return discovered[:count]
    ids = [part.strip() for part in gpus.split(",") if part.strip()]
    unknown = [i for i in ids if i not in discovered]
    if not ids or unknown:
        raise GpuChoiceError(
            f"--gpus {gpus}: no GPU {', '.join(unknown) or '(none given)'} here; "
            f"give all, a count, or ids among {', '.join(discovered)}"
        )
    return list(dict.fromkeys(ids))


def plan_gpu_workers(
    gpus: str,
    discovered: list[str],
    queues: str,
    concurrency: int,
    loglevel: str,
    env: dict[str, str],
    supervisor_pid: int,
) -> list[tuple[dict[str, str], list[str]]]:
    """(environment, argv) of one worker process per chosen GPU, each seeing only its
    GPU (CUDA_VISIBLE_DEVICES) and with its own Celery node name."""
    return [
        (
            env | {"CUDA_VISIBLE_DEVICES": gpu},
            worker_argv(queues, concurrency, loglevel, f"fitserve-gpu{gpu}-{supervisor_pid}"),
        )
        for gpu in chosen_gpus(gpus, discovered)
    ]


def discover_gpus() -> list[str]:
    """GPU indexes ``nvidia-smi -L`` lists; none when it is missing or fails."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return re.findall(r"^GPU (\d+):", out, flags=re.MULTILINE)


def gpu_workers(gpus: str, queues: str, concurrency: int, settings: Settings) -> int:
    """Run one worker per GPU until SIGTERM/SIGINT (exit 0) or until one dies (exit 1)."""
    from service.stack import supervise, terminate

    try:
        plan = plan_gpu_workers(
            gpus,
            discover_gpus(),
            queues,
            concurrency,
            settings.log_level,
            dict(os.environ),
            os.getpid(),
        )
    except GpuChoiceError as exc:
        print(f"fitserve worker: {exc}", file=sys.stderr, flush=True)
        return 2
    stopping = _stop_flag()
    children = [
        (
            f"worker gpu {env['CUDA_VISIBLE_DEVICES']}",
            subprocess.Popen(argv, env=env, start_new_session=True),
        )
        for env, argv in plan
    ]
    try:
        print(
            "fitserve worker: " + ", ".join(f"{name} pid {proc.pid}" for name, proc in children),
            flush=True,
        )
        return supervise(children, stopping, "fitserve worker", "every worker process")
    finally:
        terminate([proc for _, proc in children])


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fitserve-server`` and of ``fitserve serve|worker|up``."""
    parser = argparse.ArgumentParser(prog="fitserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, helptext in (("serve", "run a gRPC server"), ("up", "run the whole stack here")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--data-dir", dest="data_dir", type=Path)
        p.add_argument("--host")
        p.add_argument("--port", type=int)
        p.add_argument("--metrics-port", dest="metrics_port", type=int)
    sub.choices["serve"].add_argument("--roles", type=lambda s: s.split(","))
    sub.choices["serve"].add_argument(
        "--processes", type=int, help="server processes on one port (default 1)"
    )
    w = sub.add_parser("worker", help="run a Celery worker")
    w.add_argument("--queues", default="train,cpu")
    w.add_argument("--concurrency", type=int, default=1)
    w.add_argument(
        "--gpus",
        help="one worker process per GPU: all, a count N, or ids such as 0,1 "
        "(default: one CPU worker)",
    )
    args = parser.parse_args(argv)
    if args.command == "worker":
        settings = Settings()
        if args.gpus:
            return gpu_workers(args.gpus, args.queues, args.concurrency, settings)
        os.execv(sys.executable, worker_argv(args.queues, args.concurrency, settings.log_level))
    settings = _settings(args)
    configure_logging(settings.log_format, settings.log_level)
    if args.command == "up":
        from service.stack import run_stack

        return run_stack(settings, explicit_redis="FITSERVE_REDIS_URL" in os.environ)
    if settings.processes > 1:
        return serve_processes(settings)
    asyncio.run(serve(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
