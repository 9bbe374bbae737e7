"""The hard backstop of job time limits: Celery's ``time_limit`` on every job task.

A job stops at its own limit in its fit (``service.training.callbacks.TimeLimit``, at a
batch end). What that cannot stop (a batch, a data read or a plugin callback that never
returns) the pool stops: ``max_seconds + backstop_grace_seconds`` after a task started,
the parent kills its child, acknowledges the message (Celery's ``acks_on_failure_or_timeout``,
so the job is not redelivered) and, since Celery 5.7, calls the task's ``on_failure`` in
the parent, where the job is marked FAILED (TIME_LIMIT). A child lost any other way is
unchanged: its message is redelivered (``acks_late``, ``reject_on_worker_lost``) and the
job resumes from its backup.
"""

from __future__ import annotations

import contextlib
import logging

import celery
import redis

from service.config import Settings
from service.domain import job_records
from service.domain.job_store import JobStore

log = logging.getLogger(__name__)

# Before 5.7 Celery ran no failure hook in the parent on a hard time limit: the job would
# stay RUNNING for ever, so there is no backstop with those.
HOOKS_SINCE = (5, 7)


def hard_time_limit(settings: Settings) -> int | None:
    """Seconds after which the pool kills a job task's child, or None for no backstop (no
    maximum set, or a Celery that would leave the job's record RUNNING)."""
    limits = settings.job_time_limit
    if limits.max_seconds is None or tuple(celery.VERSION[:2]) < HOOKS_SINCE:
        return None
    return limits.max_seconds + limits.backstop_grace_seconds


def fail_timed_out(settings: Settings, job_id: str, seconds: float) -> None:
    """Mark a job whose child the hard time limit killed FAILED (run in the worker's
    parent process: a Redis connection of its own, closed again, so no child inherits it)."""
    message = (
        f"the job ran past this worker's hard time limit of {seconds:g} s "
        "(FITSERVE_JOB_TIME_LIMIT__MAX_SECONDS plus "
        "FITSERVE_JOB_TIME_LIMIT__BACKSTOP_GRACE_SECONDS) "
        "without stopping at its own time limit (a batch, a data read or a callback that "
        "did not return), so its worker process was killed; nothing was published"
    )
    client = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    try:
        JobStore(client, retention_seconds=settings.job_retention_seconds).fail(
            job_id, "TIME_LIMIT", message
        )
    except Exception:
        log.exception("could not mark job %s FAILED after its hard time limit", job_id)
    finally:
        client.close()
    with contextlib.suppress(OSError):
        job_records.remove(settings.jobs_dir, job_id)  # finished: nothing to recover
    log.warning("job %s killed at the hard time limit of %g s", job_id, seconds)
