"""The ready-file handshake: a child binds its own ports and reports them to its parent.

A parent that picks a free port and hands it to a child chooses, releases, and hopes: between
the two, another process (another test session on the machine, say) can take it. So the
child binds (port 0 picks a free one), and once it listens writes
``{"port": ..., "metrics_port": ..., "pid": ...}`` to the path its parent gave it with
``--ready-file``. The parent polls for the file with a deadline, failing fast when the child
exits first. The file is written under another name and renamed into place, so whoever sees
it sees all of it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from service.launch.supervision import Child, Interrupted, exited, never

READY_TIMEOUT = 120.0
"""Seconds a server gets to report: it may import TensorFlow on a busy machine."""

POLL_SECONDS = 0.05


@dataclass(frozen=True)
class Ready:
    """What a child reported once it listened."""

    port: int
    metrics_port: int | None  # None: it serves no /metrics of its own
    pid: int


def write_ready(path: Path, port: int, metrics_port: int | None) -> None:
    """Report this process's ports at ``path``, atomically (rename into place)."""
    report = {"port": port, "metrics_port": metrics_port, "pid": os.getpid()}
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_text(json.dumps(report))
    os.replace(partial, path)


def read_ready(path: Path) -> Ready:
    """The report ``write_ready`` left at ``path``."""
    report = json.loads(path.read_text())
    return Ready(int(report["port"]), report["metrics_port"], int(report["pid"]))


def wait_ready(
    paths: Sequence[Path],
    children: Sequence[Child],
    timeout: float = READY_TIMEOUT,
    stopping: Callable[[], bool] = never,
) -> list[Ready]:
    """The reports at ``paths``, once all are there.

    Raises ChildExited as soon as any of ``children`` exits first, Interrupted when
    ``stopping()``, and TimeoutError after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while not all(path.exists() for path in paths):
        dead = exited(children)
        if dead is not None:
            raise dead
        if stopping():
            raise Interrupted
        if time.monotonic() > deadline:
            missing = ", ".join(str(p) for p in paths if not p.exists())
            raise TimeoutError(f"no ready report in {missing} within {timeout} s")
        time.sleep(POLL_SECONDS)
    return [read_ready(path) for path in paths]
