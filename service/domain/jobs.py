"""Jobs: their kinds, states and records, and the Redis keys that hold them.

Per job: a hash ``fitserve:job:<id>`` (state, attempt, request, result, lease), a list
``...:history`` (one JSON entry per epoch) and a stream ``...:events``; and one sorted set
for all jobs, ``fitserve:leases``, of the jobs whose lease the reaper watches (running or
cancelling ones, requeued ones until their new Celery message is sent, and queued ones a
worker has received but not started yet), scored by when the reaper looks at it next.
The store that reads and writes them is ``service.domain.job_store``; leases are
described in ``service.domain.leases``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

PREFIX = "fitserve:"
INDEX = f"{PREFIX}jobs"
IDEMPOTENCY = f"{PREFIX}jobs:idempotency:"
STREAM_MAXLEN = 10_000
SWEEP = 16  # index entries a new job checks for expired records


class JobState(enum.StrEnum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLING = "CANCELLING"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


class JobKind(enum.StrEnum):
    TRAIN = "TRAIN"
    EVALUATE = "EVALUATE"
    FINE_TUNE = "FINE_TUNE"


@dataclass
class Job:
    """A job record as stored in Redis."""

    id: str
    kind: JobKind
    model_name: str
    queue: str
    request: dict[str, Any]
    state: JobState = JobState.QUEUED
    attempt: int = 0
    created_at: float = 0.0
    started_at: float = 0.0
    finished_at: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    model_version: int = 0
    error_reason: str = ""
    error_message: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    owner: str = ""  # the name of the token that submitted it ("": auth was off)
    # The lease of the attempt running it (service.domain.leases): until when (Redis's
    # clock, seconds since the epoch; 0: none) and who holds it ("host/pid" of the worker
    # child). A requeued job waiting for its new Celery message holds a dispatch lease.
    lease_until: float = 0.0
    lease_owner: str = ""
    handbacks: int = 0  # attempts handed back by a stopping worker: not counted as lost


@dataclass(frozen=True)
class JobEvent:
    """One entry of a job's event stream."""

    id: str
    type: str  # state | epoch | batch | log
    data: dict[str, Any]
    time: float


JOB_PREFIX = f"{PREFIX}job:"


def job_key(job_id: str) -> str:
    return f"{JOB_PREFIX}{job_id}"


def history_key(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}:history"


def events_key(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}:events"


LEASES = f"{PREFIX}leases"

ALIVE_PREFIX = f"{PREFIX}worker-alive:"


def worker_process(hostname: str, pid: int) -> str:
    """One worker main process: its Celery hostname and pid. Workers started by one
    launcher may share a Celery hostname (``fitserve-<launcher pid>@host``); never a
    hostname and a pid."""
    return f"{hostname}/{pid}"


def alive_key(process: str) -> str:
    """The key a worker's main process (``worker_process``) keeps alive beside its
    heartbeat keys (``service.job_metrics.heartbeat_key``, same TTL): how the reaper knows
    that the worker which received a job's message still runs. Not counted in
    ``fitserve_queue_workers`` (its prefix is not a queue's heartbeat prefix)."""
    return f"{ALIVE_PREFIX}{process}"


STATS = f"{PREFIX}jobstats"
JOB_BUCKETS = (1, 5, 10, 30, 60, 300, 900, 1800, 3600, 4 * 3600, 12 * 3600, 48 * 3600)
