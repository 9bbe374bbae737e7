"""Child processes under a supervisor: started in their own session, watched, stopped.

Each child runs in its own session, so a Ctrl-C in the terminal reaches only the supervisor,
which then stops the children in the order it chooses (and a SIGKILL of the session reaches
what the child started, such as a Celery worker's pool). A child that dies brings its
supervisor down with exit code 1, naming the child.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeAlias

STOP_TIMEOUT = 30.0
"""Seconds a child gets between SIGTERM and SIGKILL: a worker finishing its warm shutdown."""

POLL_SECONDS = 0.2
"""The supervision polling period: quick enough to report a dead child."""

Child: TypeAlias = tuple[str, subprocess.Popen[bytes]]
"""A child process and the name its supervisor reports it by."""


class ChildExited(RuntimeError):
    """A child exited while its supervisor still needed it."""

    def __init__(self, name: str, code: int, detail: str = "") -> None:
        super().__init__(f"{name} exited with code {code}{detail}")
        self.name, self.code = name, code


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived while the children were still starting."""


def never() -> bool:
    """A stop flag that is never raised: for callers with no signal to honour."""
    return False


def spawn(
    argv: Sequence[str],
    env: Mapping[str, str] | None = None,
    log: Path | int | None = None,
    cwd: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in its own session, its output in ``log`` (a file, or a file
    descriptor such as a pipe's write end; else on ours)."""
    if log is None:
        return subprocess.Popen(argv, env=env, cwd=cwd, start_new_session=True)
    if isinstance(log, int):
        return subprocess.Popen(
            argv, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    with log.open("wb") as out:
        return subprocess.Popen(
            argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def stop_flag() -> Callable[[], bool]:
    """Turn SIGINT/SIGTERM into a flag the supervision loop polls."""
    received: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: received.append(signum))
    return lambda: bool(received)


def exited(children: Sequence[Child]) -> ChildExited | None:
    """The first of ``children`` that has exited, as the error to report; None while all run."""
    for name, proc in children:
        if proc.poll() is not None:
            return ChildExited(name, proc.returncode)
    return None


def supervise(children: Sequence[Child], stopping: Callable[[], bool], who: str, what: str) -> int:
    """Watch ``children`` until ``stopping()`` (0) or until one of them exits (1).

    Polling, not waitpid: the supervisor must also notice its own stop signal. ``who`` and
    ``what`` name the supervisor and what it stops in its messages.
    """
    while not stopping():
        dead = exited(children)
        if dead is not None:
            print(f"{who}: {dead}; stopping {what}", file=sys.stderr, flush=True)
            return 1
        time.sleep(POLL_SECONDS)
    print(f"{who}: stopping", flush=True)
    return 0


def terminate(procs: Sequence[subprocess.Popen[bytes]], timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM ``procs`` together; SIGKILL whichever has not exited after ``timeout``."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _kill(proc)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL ``proc`` and, when it leads its own session (``spawn``), all of it."""
    try:
        if os.getpgid(proc.pid) == proc.pid:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
    except ProcessLookupError:
        pass  # it exited meanwhile
    proc.wait()


def log_tail(log: Path | int | None, chars: int = 2000) -> str:
    """The end of a child's log, for an error that says why it died ("" without one)."""
    if not isinstance(log, Path) or not log.exists():
        return ""
    return f"; its log {log} ends:\n{log.read_text(errors='replace')[-chars:]}"
