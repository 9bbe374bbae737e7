"""A job's record on disk: what rebuilds its Redis record if Redis loses its data.

Redis holds every job record; a Redis that loses its data (FLUSHALL, a restart without
its AOF or RDB) loses them all, and with them the Celery messages of queued jobs. So each
job not yet finished also has ``<jobs dir>/<id>/job.json`` on the shared data disk: what
it is (kind, model, queue, the whole request, labels, owner, when it was created) and the
attempt a worker last started. The api writes it when it queues the job; the worker
rewrites it when it starts an attempt; whoever finishes the job removes it (a finished
job has nothing to recover: its version is published or it is not).

What reads it back:

- the worker running the job, which holds the same record in memory, rebuilds the Redis
  record (RUNNING, its attempt, its lease) as soon as it finds it gone
  (``JobStore._ensure_record``), then finishes and publishes once;
- the reaper (``service.domain.reaper``), which, for a folder whose job has had no record
  for a grace, recreates it FAILED with reason ``RECORD_LOST`` (queued jobs, whose message
  is gone too, and running ones whose worker is gone too), so GetJob answers what happened
  rather than NOT_FOUND; and removes job folders and model staging folders left with no
  record at all.

TF-free: the api, the worker and the reaper all use it.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from service.domain.files import read_json, write_json_atomic
from service.domain.jobs import Job, JobKind

RECORD_FILE = "job.json"


def path(jobs_dir: Path, job_id: str) -> Path:
    return jobs_dir / job_id / RECORD_FILE


def write(jobs_dir: Path, job: Job) -> None:
    """Write (or rewrite) the job's record file, atomically."""
    write_json_atomic(path(jobs_dir, job.id), encode(job))


def encode(job: Job) -> dict[str, Any]:
    return {
        "id": job.id,
        "kind": job.kind.value,
        "model_name": job.model_name,
        "queue": job.queue,
        "request": job.request,
        "labels": job.labels,
        "owner": job.owner,
        "created_at": job.created_at,
        "attempt": job.attempt,
    }


def read(jobs_dir: Path, job_id: str) -> Job | None:
    """The job its record file describes (state QUEUED, no history), or None when there is
    no readable one."""
    try:
        data = read_json(path(jobs_dir, job_id))
        return decode(data) if data.get("id") == job_id else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def decode(data: dict[str, Any]) -> Job:
    return Job(
        id=str(data["id"]),
        kind=JobKind(data["kind"]),
        model_name=str(data["model_name"]),
        queue=str(data["queue"]),
        request=dict(data["request"]),
        labels={str(k): str(v) for k, v in dict(data.get("labels") or {}).items()},
        owner=str(data.get("owner") or ""),
        created_at=float(data.get("created_at") or 0.0),
        attempt=int(data.get("attempt") or 0),
    )


def remove(jobs_dir: Path, job_id: str) -> None:
    """The job is finished (or was never queued): nothing to recover any more. Removes the
    folder too when nothing else is in it."""
    path(jobs_dir, job_id).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        (jobs_dir / job_id).rmdir()  # only when empty


__all__ = ["RECORD_FILE", "decode", "encode", "path", "read", "remove", "write"]
