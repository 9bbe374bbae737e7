"""A worker's bounded stop: on SIGTERM its running job is handed back, and it exits within
``worker_stop_grace_seconds``.

Celery's warm shutdown (SIGTERM, a first Ctrl-C) waits for the running task however long
it runs, and its soft shutdown needs SIGQUIT and always sleeps its whole timeout. So a
worker's main process, as the warm shutdown begins (``worker_shutting_down``), sends
``HAND_BACK_SIGNAL`` to the pool children running a job; in a child the handler
(installed as a job starts, ``install_child``) tells the running job to stop at its next
batch end and hand itself back (``worker.runtime.Runtime.hand_back_running``): the job
goes back to QUEUED, not counted as a lost attempt, its Celery message is sent again,
and the task returns, so the warm shutdown ends. A job still running when the grace is
over (a batch, a data read or an export that takes longer) has its child killed, and its
lease ended, so another worker takes it over at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from typing import Any

import redis
from celery.signals import worker_shutting_down

from service.config import Settings
from service.domain.job_store import JobStore

log = logging.getLogger(__name__)
HAND_BACK_SIGNAL = signal.SIGUSR2  # billiard uses SIGUSR1 for soft time limits
STOPPING = "the worker is shutting down"

_settings: Settings | None = None


def install_parent(settings: Settings) -> None:
    """Arm the bounded stop in the worker's main process."""
    global _settings
    _settings = settings
    worker_shutting_down.connect(_on_shutting_down, weak=False)


def install_child(hand_back: Any) -> None:
    """In a pool child: ``HAND_BACK_SIGNAL`` calls ``hand_back(reason)`` (no logging in
    the handler: it runs between any two bytecodes of the main thread)."""
    signal.signal(HAND_BACK_SIGNAL, lambda _signum, _frame: hand_back(STOPPING))


def _on_shutting_down(how: str = "", **_: Any) -> None:
    """Runs in the main process's signal handler: the work happens in a thread."""
    if how != "Warm" or _settings is None:
        return  # a cold shutdown is Celery's (its soft shutdown, bounded as well)
    grace = _settings.worker_stop_grace_seconds
    threading.Thread(target=_stop, args=(grace,), name="bounded-stop", daemon=True).start()


def _running() -> list[tuple[str, int]]:
    """(job id, child pid) of the tasks running now."""
    from celery.worker import state

    for _ in range(3):
        try:
            return [(r.id, r.worker_pid) for r in tuple(state.active_requests) if r.worker_pid]
        except RuntimeError:  # the set changed while copied
            continue
    return []


def _stop(grace: float) -> None:
    """Signal every child running a job (also one that starts meanwhile), wait for them
    to hand their job back, kill those still running at the deadline."""
    deadline = time.monotonic() + grace
    signalled: set[int] = set()
    while running := _running():
        for _job_id, pid in running:
            if pid not in signalled:
                signalled.add(pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, HAND_BACK_SIGNAL)
                log.warning("stopping: the running job is handed back within %g s", grace)
        if time.monotonic() >= deadline:
            for job_id, pid in running:
                _kill(job_id, pid)
            return
        time.sleep(0.2)


def _kill(job_id: str, pid: int) -> None:
    """Kill a child whose job did not stop within the grace, and end its lease."""
    from worker.runtime import lease_owner

    log.warning("job %s did not stop within the grace; killing its worker child %d", job_id, pid)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    assert _settings is not None
    client = redis.Redis.from_url(_settings.redis_url, decode_responses=True, socket_timeout=5)
    try:
        JobStore(client).release(job_id, lease_owner(pid))
    except redis.RedisError:
        log.warning("could not end the lease of job %s; it runs out by itself", job_id)
    finally:
        client.close()
