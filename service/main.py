"""Server-side commands: ``serve``, ``worker`` and ``up`` (run by the ``fitserve`` CLI).

``python -m service.main serve`` runs one gRPC server; ``worker`` runs a Celery worker;
``up`` runs the whole stack on this machine (see ``service.stack``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from service.config import Settings
from service.logs import configure_logging

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
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(
        f"fitserve server listening on {settings.host}:{port} (roles: {','.join(settings.roles)}; "
        f"metrics: http://{settings.host}:{server.metrics_port}/metrics)",
        flush=True,
    )
    await stop.wait()
    log.info("shutting down", extra={"grace_seconds": settings.grace_seconds})
    await server.stop()


def worker_argv(queues: str, concurrency: int, loglevel: str) -> list[str]:
    """The Celery command line of one fitserve worker process."""
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
        f"fitserve-{os.getpid()}@%h",
        "--loglevel",
        loglevel,
        "--without-gossip",
        "--without-mingle",
    ]


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
    w = sub.add_parser("worker", help="run a Celery worker")
    w.add_argument("--queues", default="train,cpu")
    w.add_argument("--concurrency", type=int, default=1)
    args = parser.parse_args(argv)
    if args.command == "worker":
        settings = Settings()
        os.execv(sys.executable, worker_argv(args.queues, args.concurrency, settings.log_level))
    settings = _settings(args)
    configure_logging(settings.log_format, settings.log_level)
    if args.command == "up":
        from service.stack import run_stack

        return run_stack(settings, explicit_redis="FITSERVE_REDIS_URL" in os.environ)
    asyncio.run(serve(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
