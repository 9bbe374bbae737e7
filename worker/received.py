"""The worker's main process marks each job whose message it receives.

Celery's main process takes a job's message (``task_received``) before a pool child
starts the job, and a lease exists only from that start (``service.domain.leases``). A
worker killed in between would leave the job QUEUED with no lease and its message in
kombu's ``unacked`` hash until the visibility timeout (48 h). So here, as the message
arrives, the job is marked received by this worker process (its Celery hostname and pid,
``JobStore.mark_received``); the api's reaper then sends the job's message again once this
process's heartbeat is gone (``service.domain.reaper``). A pool child starting the job
clears the mark. Marking is best effort: when Redis does not answer, the child cannot
start the job either, and gives its message back.

``FITSERVE_TEST_PAUSE_AFTER_RECEIVED_SECONDS`` (tests only) holds the main process that
long after each mark, so a test can kill it between receiving a job and starting it.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import redis
from celery.signals import task_received

from service.config import Settings
from service.domain.job_store import JobStore
from service.domain.jobs import worker_process

log = logging.getLogger(__name__)
PAUSE_ENV = "FITSERVE_TEST_PAUSE_AFTER_RECEIVED_SECONDS"


class ReceivedMarks:
    """Connects to ``task_received`` in the worker's main process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._store: JobStore | None = None
        self._pause = float(os.environ.get(PAUSE_ENV) or 0)

    def install(self) -> None:
        task_received.connect(self._on_received, weak=False)

    @property
    def store(self) -> JobStore:
        """Made at the first message, in the main process (short timeouts: this runs on
        Celery's event loop, which must not hang on a Redis that does not answer)."""
        if self._store is None:
            client = redis.Redis.from_url(
                self.settings.redis_url,
                decode_responses=True,
                socket_timeout=2,
                socket_connect_timeout=2,
            )
            self._store = JobStore(client)
        return self._store

    def _on_received(self, sender: Any = None, request: Any = None, **_: Any) -> None:
        job_id = str(getattr(request, "id", "") or "")
        hostname = str(getattr(sender, "hostname", "") or "")
        if not job_id or not hostname:
            return
        process = worker_process(hostname, os.getpid())
        try:
            marked = self.store.mark_received(job_id, process, self.settings.heartbeat_ttl_seconds)
        except redis.RedisError as exc:
            log.warning("job %s: could not mark it received (%s)", job_id, exc)
            return
        if marked:
            log.debug("job %s: marked received by %s", job_id, process)
        if self._pause > 0:
            log.warning("test hook: holding the received job %s for %g s", job_id, self._pause)
            time.sleep(self._pause)
