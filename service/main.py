"""Server-side commands: ``serve``, ``worker`` and ``up`` (run by the ``fitserve`` CLI).

``python -m service.main serve`` runs one gRPC server (``--processes N``: N of them on one
port, supervised); ``worker`` runs a Celery worker (``--gpus``: one per GPU, supervised);
``up`` runs the whole stack on this machine. This module is the command line only; the
processes are started and supervised by ``service.launch``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from service.config import Settings, TlsFileError
from service.logs import configure_logging


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {
        k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None
    }
    return Settings(**overrides)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fitserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, helptext in (("serve", "run a gRPC server"), ("up", "run the whole stack here")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--data-dir", dest="data_dir", type=Path)
        p.add_argument("--host")
        p.add_argument("--port", type=int)
        p.add_argument("--metrics-port", dest="metrics_port", type=int)
    _serve_options(sub.choices["serve"])
    w = sub.add_parser("worker", help="run a Celery worker")
    w.add_argument("--queues", default="train,cpu")
    w.add_argument("--concurrency", type=int, default=1)
    w.add_argument(
        "--gpus",
        help="one worker process per GPU: all, a count N, or ids such as 0,1 "
        "(default: one CPU worker)",
    )
    return parser


def _serve_options(serve: argparse.ArgumentParser) -> None:
    serve.add_argument("--roles", type=lambda s: s.split(","))
    serve.add_argument("--processes", type=int, help="server processes on one port (default 1)")
    serve.add_argument(
        "--ready-file",
        dest="ready_file",
        type=Path,
        help="once listening, write JSON {port, metrics_port, pid} here (for a parent that "
        "started the server with --port 0)",
    )


def _worker(args: argparse.Namespace) -> int:
    from service.launch.workers import gpu_workers, worker_argv

    settings = Settings()
    set_umask(settings)
    if not args.gpus:
        os.execv(sys.executable, worker_argv(args.queues, args.concurrency, settings.log_level))
    return gpu_workers(args.gpus, args.queues, args.concurrency, settings)


def set_umask(settings: Settings) -> None:
    """Apply FITSERVE_UMASK (default 077) to this process and what it starts: files and
    folders made under the data dir are then owner-only."""
    if settings.umask is not None:
        os.umask(settings.umask)


def _check_tls(command: str, settings: Settings) -> bool:
    """Whether the TLS files load; else say which setting is wrong, before anything starts."""
    if not settings.tls.enabled:
        return True
    try:
        settings.tls.read()
    except TlsFileError as exc:
        print(f"fitserve {command}: {exc}", file=sys.stderr, flush=True)
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fitserve-server`` and of ``fitserve serve|worker|up``."""
    args = _parser().parse_args(argv)
    if args.command == "worker":
        return _worker(args)
    settings = _settings(args)
    configure_logging(settings.log_format, settings.log_level)
    set_umask(settings)
    if not _check_tls(args.command, settings):
        return 2
    if args.command == "up":
        from service.launch.stack import run_stack

        return run_stack(settings, explicit_redis="FITSERVE_REDIS_URL" in os.environ)
    from service.launch.serving import serve, serve_processes

    if settings.processes > 1:
        return serve_processes(settings, args.ready_file)
    asyncio.run(serve(settings, args.ready_file))
    return 0


if __name__ == "__main__":
    sys.exit(main())
