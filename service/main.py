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
import time
from pathlib import Path

from service.config import Settings, TlsFileError
from service.logs import configure_logging


def _settings(args: argparse.Namespace) -> Settings:
    """Settings from FITSERVE_* and the command line; a bad value exits 2 naming it."""
    from pydantic import ValidationError

    overrides = {
        k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None
    }
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        for error in exc.errors():
            where = "__".join(str(p) for p in error["loc"] if not isinstance(p, int)).upper()
            print(
                f"fitserve {args.command}: FITSERVE_{where}: {error['msg']} "
                f"(got {str(error.get('input'))[:80]!r})",
                file=sys.stderr,
            )
        raise SystemExit(2) from None


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
    _token_options(sub.add_parser("tokens", help="create, list and revoke API tokens"))
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


def _token_options(tokens: argparse.ArgumentParser) -> None:
    tokens.add_argument(
        "--data-dir",
        dest="data_dir",
        type=Path,
        help="without FITSERVE_REDIS_URL: the Redis of `fitserve up` on this data folder",
    )
    actions = tokens.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="make a token; it is printed once, never stored")
    create.add_argument("--name", required=True, help="who or what holds it (unique)")
    create.add_argument(
        "--role", required=True, choices=["admin", "trainer", "predictor", "viewer"]
    )
    create.add_argument("--max-queued-jobs", type=int, help="quota (default: the server's)")
    create.add_argument(
        "--max-dataset-bytes", type=_size, help="quota, e.g. 10G (default: the server's)"
    )
    actions.add_parser("list", help="every token's name, role and quotas (never the token)")
    revoke = actions.add_parser("revoke", help="remove a token; servers refuse it within seconds")
    revoke.add_argument("name")


def _size(text: str) -> int:
    """'10G', '512M', '2048' -> bytes."""
    units = {"K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    factor = units.get(text[-1:], 1)
    number = float(text[:-1] if text[-1:] in units else text)
    if number <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return int(number * factor)


def _tokens(args: argparse.Namespace, settings: Settings) -> int:
    """The operator's token commands: straight to Redis, as every server reads it."""
    import logging

    import redis

    from service.domain.tokens import Role, TokenStore
    from service.errors import FitserveError

    audit = logging.getLogger("fitserve.audit")
    store = TokenStore(redis.Redis.from_url(_operator_redis(settings), decode_responses=True))
    try:
        if args.action == "create":
            token, record = store.create(
                args.name,
                Role(args.role),
                max_queued_jobs=args.max_queued_jobs,
                max_dataset_bytes=args.max_dataset_bytes,
            )
            audit.info(
                "token.create by operator: name=%s role=%s",
                record.name,
                record.role.value,
                extra={"audit": "token.create", "target_name": record.name},
            )
            print(token)
            print(
                f"token {record.name!r} ({record.role.value}) created; it is shown only now: "
                "keep it in a secret store (clients read FITSERVE_TOKEN)",
                file=sys.stderr,
            )
        elif args.action == "list":
            print(f"{'NAME':<24} {'ROLE':<10} {'CREATED':<20} MAX_JOBS  MAX_DATASET_BYTES")
            for r in store.list():
                created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r.created_at))
                print(
                    f"{r.name:<24} {r.role.value:<10} {created:<20} "
                    f"{_or_default(r.max_queued_jobs):<9} {_or_default(r.max_dataset_bytes)}"
                )
        else:
            record = store.revoke(args.name)
            audit.info(
                "token.revoke by operator: name=%s",
                record.name,
                extra={"audit": "token.revoke", "target_name": record.name},
            )
            print(f"token {record.name!r} revoked", file=sys.stderr)
    except FitserveError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    except redis.RedisError as exc:
        print(f"error: Redis at FITSERVE_REDIS_URL did not answer ({exc})", file=sys.stderr)
        return 1
    return 0


def _operator_redis(settings: Settings) -> str:
    """FITSERVE_REDIS_URL; else the embedded Redis of `fitserve up` on this data folder."""
    embedded = settings.data_dir / "redis" / "url"
    if "FITSERVE_REDIS_URL" not in os.environ and embedded.exists():
        return embedded.read_text().strip()
    return settings.redis_url


def _or_default(value: int | None) -> str:
    return "default" if value is None else str(value)


def _worker(args: argparse.Namespace) -> int:
    from service.launch.workers import gpu_workers, worker_argv

    settings = _settings(args)
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
    if args.command == "tokens":
        return _tokens(args, settings)
    set_umask(settings)
    if not _check_tls(args.command, settings):
        return 2
    if args.command == "up":
        from service.launch.stack import run_stack

        return run_stack(settings, explicit_redis="FITSERVE_REDIS_URL" in os.environ)
    from service.launch.serving import serve, serve_processes

    if settings.processes > 1:
        return serve_processes(settings, args.ready_file)
    from service.api.auth import AuthNotConfigured

    try:
        asyncio.run(serve(settings, args.ready_file))
    except AuthNotConfigured as exc:
        print(f"fitserve serve: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
