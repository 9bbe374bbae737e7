"""The embedded stack: Redis, a server and a worker on this machine, as one object.

``fitserve up`` runs all three supervised; the tests and the benchmarks start the parts they
need (a Redis alone, a worker on a Redis of theirs, a pinned server). The server binds its own
ports and reports them (``service.launch.ready``), so nothing picks a port it then hopes is
still free. Stopping takes the server and the worker down together first and Redis last, so
neither loses its Redis while it shuts down.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import redis

from service.config import Settings
from service.domain.files import write_private
from service.domain.model_store import ModelStore
from service.domain.tokens import TokenStore
from service.errors import FitserveError
from service.launch.ready import READY_TIMEOUT, Ready
from service.launch.redis_server import (
    PASSWORD_FILE,
    RedisRefused,
    RedisServer,
    masked_url,
    start_redis,
    wait_for_redis,
)
from service.launch.relay import Relay
from service.launch.serving import serve_argv, start_server
from service.launch.supervision import (
    Child,
    ChildExited,
    Interrupted,
    exited,
    never,
    stop_flag,
    supervise,
    terminate,
)
from service.launch.workers import start_worker
from service.logs import is_debug, quiet_environment, resolved_format


@dataclass(frozen=True)
class ServerPart:
    """How a Stack runs its server (``python -m service.main serve``)."""

    host: str = "127.0.0.1"
    port: int = 0  # 0: the server binds a free port and reports it
    metrics_port: int = 0
    args: Sequence[str] = ()  # more ``serve`` options, e.g. ("--roles", "api")
    env: Mapping[str, str] = field(default_factory=dict)  # this child's own variables
    prefix: Sequence[str] = ()  # before the command, e.g. ("taskset", "-c", "1")


@dataclass(frozen=True)
class WorkerPart:
    """How a Stack runs its worker (one Celery worker process, prefork, one child)."""

    queues: str = "train,cpu"
    loglevel: str = "INFO"
    env: Mapping[str, str] = field(default_factory=dict)
    prefix: Sequence[str] = ()
    quiet: bool = False  # without Celery's start banner


URL_FILE = "url"  # in the embedded Redis's folder
ADMIN_TOKEN_FILE = "admin.token"  # in the data folder: the first admin token of `fitserve up`
SERVER = ServerPart()
log = logging.getLogger("fitserve.up")
WORKER = WorkerPart()


class Stack:
    """Redis, a server and a worker, each optional; a context manager that starts them
    and stops them (server and worker together, then Redis).

    ``work`` holds Redis's folder (``work/redis``, with its log) and, with ``logs``, each
    child's output (``work/server.log``, ``work/worker.log``; else on this process's). With
    ``redis_url`` no Redis is started. Every child gets ``env`` (default: this process's
    environment) with FITSERVE_DATA_DIR and FITSERVE_REDIS_URL set, then its part's ``env``.
    ``stopping`` is polled while the server starts: when it turns true, start raises
    Interrupted. With ``relay`` (and no ``logs``), the server's and the worker's output
    go through it into this process's log.
    """

    def __init__(
        self,
        work: Path,
        *,
        data_dir: Path | None = None,
        redis_url: str | None = None,
        server: ServerPart | None = SERVER,
        worker: WorkerPart | None = WORKER,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        logs: bool = True,
        ready_timeout: float = READY_TIMEOUT,
        stopping: Callable[[], bool] = never,
        after_redis: Callable[[str], None] | None = None,
        relay: Relay | None = None,
    ) -> None:
        self._relay = relay if not logs else None
        self._after_redis = after_redis  # called with Redis's URL before the others start
        self.work, self.data_dir = work, data_dir or work / "data"
        self.redis_url = redis_url or ""
        self._parts, self._base_env, self._cwd = (server, worker), env, cwd
        self._timeout, self._stopping = ready_timeout, stopping
        self.logs = {name: work / f"{name}.log" for name in ("server", "worker")} if logs else {}
        self.redis: RedisServer | None = None
        self.server: subprocess.Popen[bytes] | None = None
        self.worker: subprocess.Popen[bytes] | None = None
        self.ready: Ready | None = None  # what the server reported

    def start(self) -> Stack:
        """Start the parts; on any failure, stop what started and raise."""
        self.work.mkdir(parents=True, exist_ok=True)
        try:
            self._start_redis()
            if self._after_redis is not None:
                self._after_redis(self.redis_url)
            self._start_worker()
            self._start_server()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """SIGTERM the server and the worker together, Redis after them, each with a deadline."""
        terminate([p for p in (self.server, self.worker) if p is not None])
        if self.redis is not None:
            terminate([self.redis.proc])

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def children(self) -> list[Child]:
        """The processes started, by name: what a supervisor watches."""
        procs = (
            ("redis", self.redis.proc if self.redis else None),
            ("server", self.server),
            ("worker", self.worker),
        )
        return [(name, proc) for name, proc in procs if proc is not None]

    def dead(self) -> ChildExited | None:
        """The first child that has exited, naming it; None while all run."""
        return exited(self.children)

    @property
    def target(self) -> str:
        """host:port of the server."""
        return f"{self._server_part().host}:{self._ready().port}"

    @property
    def port(self) -> int:
        return self._ready().port

    @property
    def metrics_port(self) -> int | None:
        return self._ready().metrics_port

    def _ready(self) -> Ready:
        if self.ready is None:
            raise RuntimeError("this stack runs no server (or it has not started)")
        return self.ready

    def _server_part(self) -> ServerPart:
        if self._parts[0] is None:
            raise RuntimeError("this stack runs no server")
        return self._parts[0]

    def _env(self, own: Mapping[str, str]) -> dict[str, str]:
        base = dict(os.environ if self._base_env is None else self._base_env)
        base |= {"FITSERVE_DATA_DIR": str(self.data_dir), "FITSERVE_REDIS_URL": self.redis_url}
        return base | dict(own)

    def _start_redis(self) -> None:
        if self.redis_url:
            wait_for_redis(self.redis_url)
            return
        self.redis = start_redis(self.work / "redis")
        self.redis_url, self.logs["redis"] = self.redis.url, self.redis.log
        # For the operator's commands on this machine (fitserve tokens --data-dir): the
        # URL with its password, owner-only like the password file beside it.
        write_private(self.work / "redis" / URL_FILE, self.redis_url + "\n")

    def _start_worker(self) -> None:
        part = self._parts[1]
        if part is None:
            return
        out = self._output("worker")
        try:
            self.worker = start_worker(
                self._env(part.env),
                out,
                self._cwd,
                queues=part.queues,
                loglevel=part.loglevel,
                prefix=part.prefix,
                quiet=part.quiet,
            )
        finally:
            self._close(out)

    def _output(self, name: str) -> Path | int | None:
        """Where a child writes: its log file, a pipe of the relay, or our own output."""
        return self._relay.pipe(name) if self._relay is not None else self.logs.get(name)

    @staticmethod
    def _close(out: Path | int | None) -> None:
        if isinstance(out, int):
            os.close(out)  # the child holds its own copy

    def _start_server(self) -> None:
        part = self._parts[0]
        if part is None:
            return
        argv = serve_argv("--host", part.host, "--port", str(part.port))
        argv += ["--metrics-port", str(part.metrics_port), *part.args]
        out = self._output("server")
        try:
            self.server, self.ready = start_server(
                argv,
                self._env(part.env),
                out,
                self._cwd,
                prefix=part.prefix,
                timeout=self._timeout,
                stopping=self._stopping,
            )
        finally:
            self._close(out)


def run_stack(settings: Settings, *, explicit_redis: bool) -> int:
    """Run the stack until Ctrl-C/SIGTERM (exit 0) or until a child dies (exit 1).

    It prints where everything listens, then the log of every process in one format: the
    children's output is relayed (``service.launch.relay``), held until that banner is out,
    with the start-up notices of TensorFlow, CUDA and Celery nobody can act on left out
    (all of it back with FITSERVE_LOG_LEVEL=debug).
    """
    stopping = stop_flag()
    data_dir = settings.data_dir.resolve()
    token_file = data_dir / ADMIN_TOKEN_FILE
    admin: list[bool] = []
    root = os.geteuid() == 0
    env = quiet_environment(
        os.environ, settings.log_level, resolved_format(settings.log_format), root=root
    )
    relay = Relay(settings.log_level, _native_min_level(env))

    def first_token(redis_url: str) -> None:
        """Auth on from the first start: an admin token for the operator, unless tokens
        are managed already (or FITSERVE_AUTH=none)."""
        if settings.auth.mode != "none":
            client = redis.Redis.from_url(redis_url, decode_responses=True)
            with client:
                admin.append(TokenStore(client).bootstrap_admin(token_file))

    stack = Stack(
        data_dir,
        data_dir=data_dir,
        redis_url=settings.redis_url if explicit_redis else None,
        server=ServerPart(settings.host, settings.port, settings.metrics_port),
        worker=WorkerPart(loglevel=settings.log_level, quiet=not is_debug(settings.log_level)),
        env=env,
        logs=False,
        stopping=stopping,
        after_redis=first_token,
        relay=relay,
    )
    try:
        with stack:
            print(_banner(stack, settings, token_file if admin == [True] else None), flush=True)
            if root:
                log.info(
                    "running as root: Celery's C_FORCE_ROOT set for the embedded worker "
                    "(run fitserve up as another user to have the worker run as that user)"
                )
            relay.release()
            return supervise(stack.children, stopping, "fitserve up", "the stack")
    except (ChildExited, RedisRefused) as exc:  # RedisRefused: FITSERVE_REDIS_URL's password
        relay.release()  # what the children said before, which tells why
        print(f"fitserve up: {exc}; stopping the stack", file=sys.stderr, flush=True)
        return 1
    except Interrupted:
        print("fitserve up: stopping", flush=True)
        return 0
    finally:
        relay.join()


def _native_min_level(env: Mapping[str, str]) -> int:
    """TF_CPP_MIN_LOG_LEVEL as a number (0: all TensorFlow's C++ lines)."""
    try:
        return int(env.get("TF_CPP_MIN_LOG_LEVEL", "0"))
    except ValueError:
        return 0


def _auth_line(settings: Settings, token_file: Path | None) -> str:
    if settings.auth.mode == "none":
        return "authentication is OFF (FITSERVE_AUTH=none): anyone may call"
    if token_file is None:
        return "calls need a token (fitserve tokens create ...; clients: FITSERVE_TOKEN)"
    return (
        f"calls need a token; an admin one is in {token_file}: "
        f"export FITSERVE_TOKEN=$(cat {token_file})"
    )


def _models(settings: Settings) -> str:
    """The models the server serves: each one's version (its alias ``stable``, else its
    latest) among how many it has."""
    store = ModelStore(settings.data_dir.resolve() / "models")
    served = []
    for name in store.models():
        versions = store.versions(name)
        try:
            version = store.resolve(name)
        except FitserveError:
            version = versions[-1]
        served.append(f"{name} v{version} (of {len(versions)})")
    return ", ".join(served) or "none yet (train one: see README.md)"


def _banner(stack: Stack, settings: Settings, token_file: Path | None) -> str:
    """Where everything is; the Redis password only as the file that holds it."""
    pids = ", ".join(f"{name} pid {proc.pid}" for name, proc in stack.children)
    redis = masked_url(stack.redis_url)
    if stack.redis is not None and stack.redis.password:
        redis += f" (password in {stack.work / 'redis' / PASSWORD_FILE}; log {stack.redis.log})"
    grpc = stack.target + (f" ({settings.tls.mode})" if settings.tls.enabled else "")
    rows = (
        ("gRPC", grpc),
        ("metrics", f"http://{settings.host}:{stack.metrics_port}/metrics"),
        ("Redis", redis),
        ("data", str(stack.data_dir)),
        ("auth", _auth_line(settings, token_file)),
        ("models", _models(settings)),
        ("processes", pids),
    )
    lines = [f"  {name:<10} {value}" for name, value in rows]
    return "\n".join(["fitserve up: ready; Ctrl-C stops the stack", *lines])
