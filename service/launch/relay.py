"""The output of the stack's children, relayed into this process's log (``fitserve up``).

Each child writes its stdout and stderr into a pipe of ours; a thread per child reads it
line by line and emits each line in the one log format (``service.logs.Relayed``). Lines are
held until ``release``: the stack prints where everything listens first, then the log.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import TextIO

from service.logs import Relayed


class Relay:
    """Pipes for children; their lines held until ``release``, then written as they come."""

    def __init__(self, level: str, native_min_level: int, out: TextIO | None = None) -> None:
        self._level, self._native_min = level, native_min_level
        self._out = out or sys.stderr
        self._lock = threading.Lock()
        self._held: list[tuple[Relayed, str, float]] | None = []
        self._threads: list[threading.Thread] = []

    def pipe(self, child: str) -> int:
        """A write end for ``child``'s output (close it here once the child has it)."""
        read, write = os.pipe()
        relayed = Relayed(child, self._level, self._native_min)
        thread = threading.Thread(
            target=self._read, args=(read, relayed), name=f"relay-{child}", daemon=True
        )
        thread.start()
        self._threads.append(thread)
        return write

    def release(self) -> None:
        """Write what was held, and from now on every line as it comes."""
        with self._lock:
            held, self._held = self._held or [], None
            for relayed, line, created in held:
                relayed.emit(line, self._out, created)

    def join(self, timeout: float = 5.0) -> None:
        """Wait for the children's last lines (their pipes close as they exit)."""
        self.release()
        for thread in self._threads:
            thread.join(timeout)

    def _read(self, fd: int, relayed: Relayed) -> None:
        with open(fd, encoding="utf-8", errors="replace") as lines:
            for line in lines:
                with self._lock:
                    if self._held is not None:
                        self._held.append((relayed, line, time.time()))
                    else:
                        relayed.emit(line, self._out)
