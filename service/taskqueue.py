"""Celery configuration shared by the api (sends tasks by name) and the worker (runs them).

The api never imports ``worker/``: it sends ``fitserve.<kind>`` by name with the job id as
the only argument. Settings follow what long GPU jobs need; see docs/architecture.md.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Collection
from typing import Any

import redis.asyncio as aioredis
from celery import Celery
from kombu import Exchange, Queue

from service.config import Settings

TRAIN_QUEUE = "train"
CPU_QUEUE = "cpu"
TASK_TRAIN = "fitserve.train"
TASK_EVALUATE = "fitserve.evaluate"
TASK_FINE_TUNE = "fitserve.fine_tune"
TASK_BY_KIND = {"TRAIN": TASK_TRAIN, "EVALUATE": TASK_EVALUATE, "FINE_TUNE": TASK_FINE_TUNE}
"""The task of each job kind (``JobKind`` values), for a job sent again (``resubmit``)."""


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings for fitserve's queues."""
    timeout = settings.job_visibility_timeout_seconds
    transport = {
        "visibility_timeout": timeout,
        # Kombu sweeps for unacknowledged messages older than the timeout only every
        # interval x throttle seconds (100 s by default) and once at worker start; sweep
        # every min(timeout, 10 s) so a lost job is redelivered soon after it is due.
        "unacked_restore_interval": min(timeout, 10),
        "unacked_restore_throttle": 1,
    }
    return {
        **_redis_tls(settings.redis_url),
        "broker_url": settings.redis_url,
        "broker_connection_retry_on_startup": True,
        # The visibility timeout must be set in all three places Celery reads it.
        "visibility_timeout": timeout,
        "broker_transport_options": transport,
        "result_backend_transport_options": transport,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_ignore_result": True,  # results live in the job record
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_max_tasks_per_child": settings.worker_max_jobs_per_child or None,
        # A child imports TensorFlow at start (worker.app); Celery's 4 s default for a
        # child to come up is too short for that on a busy machine.
        "worker_proc_alive_timeout": 120.0,
        # A broker blip (a Redis restart, a network cut) must not kill a training job: the
        # child keeps training and renews its lease once Redis answers again, its epoch
        # records buffered meanwhile (service.domain.leases). Its message is acknowledged
        # on the new connection, or comes back after the visibility timeout to a worker
        # that finds the job finished and drops it.
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        # A worker fetches a message only when its child is free, also after a reconnect
        # (when Celery would otherwise fetch one more while the child still trains): a
        # busy worker never holds a job an idle one could run.
        "worker_disable_prefetch": True,
        # SIGTERM is fitserve's own bounded stop (worker.shutdown): the job is handed back
        # within FITSERVE_WORKER_STOP_GRACE_SECONDS. Celery's soft shutdown covers the
        # cold path (SIGQUIT, a second Ctrl-C) with the same bound.
        "worker_soft_shutdown_timeout": settings.worker_stop_grace_seconds,
        "worker_enable_soft_shutdown_on_idle": True,
        "worker_hijack_root_logger": False,
        "task_queues": [Queue(q, Exchange(q), routing_key=q) for q in (TRAIN_QUEUE, CPU_QUEUE)],
        "task_default_queue": TRAIN_QUEUE,
    }


def _redis_tls(url: str) -> dict[str, Any]:
    """Certificate checks for a rediss:// broker. Kombu given a rediss URL and no TLS
    options connects without checking the server's certificate (it logs "defaulting to
    insecure SSL behaviour"); Celery's result backend refuses such a URL. So require the
    check here; ``ssl_*`` parameters in the URL (``ssl_cert_reqs``, ``ssl_ca_certs``,
    ``ssl_certfile``, ``ssl_keyfile``) take precedence, as redis-py reads the same ones."""
    if not url.startswith("rediss://"):
        return {}
    options = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    return {"broker_use_ssl": options, "redis_backend_use_ssl": options}


def create_celery(settings: Settings, name: str = "fitserve") -> Celery:
    """A Celery app configured for fitserve (no tasks registered)."""
    app = Celery(name)
    app.conf.update(celery_config(settings))
    return app


class TaskQueue:
    """Sends job tasks by name; the api's only contact with Celery."""

    def __init__(self, app: Celery, broker: aioredis.Redis | None = None) -> None:
        self._app, self._broker = app, broker

    async def position(self, queue: str, job_id: str) -> int:
        """Jobs ahead of ``job_id`` in its queue (0: next), or -1 when it is not waiting there."""
        return (await self.positions(queue, [job_id]))[job_id]

    async def positions(self, queue: str, job_ids: Collection[str]) -> dict[str, int]:
        """Each job's place in ``queue`` as ``position`` tells it, from one read of the queue.

        Kombu's Redis transport keeps a queue as a list: producers LPUSH, workers BRPOP,
        so the oldest message is at the right end. A message's headers carry its task id,
        which is the job id. O(queue length): a GetJob or ListJobs, not a hot path.
        """
        found = dict.fromkeys(job_ids, -1)
        if self._broker is None or not found:
            return found
        messages = await self._broker.lrange(queue, 0, -1)
        for index, message in enumerate(messages):
            if (task_id := _task_id(message)) in found:
                found[task_id] = len(messages) - 1 - index
        return found

    def submit(self, task_name: str, job_id: str, queue: str) -> None:
        """Queue a job; the Celery task id is the job id."""
        self._app.send_task(task_name, args=[job_id], task_id=job_id, queue=queue)

    def resubmit(self, kind: str, job_id: str, queue: str) -> None:
        """Queue a job of ``kind`` (a ``JobKind`` value) again: requeued by the reaper or
        handed back by a stopping worker."""
        self.submit(TASK_BY_KIND[kind], job_id, queue)


def _task_id(message: str | bytes) -> str:
    """The task id of a kombu message (Celery's message protocol 2 puts it in the
    headers), or "" for one that is not a Celery task."""
    try:
        envelope = json.loads(message)
        task_id = envelope["headers"]["id"]
    except (ValueError, KeyError, TypeError):
        return ""
    return task_id if isinstance(task_id, str) else ""
