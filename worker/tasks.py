"""Task shims: explicit names, the job id as the only argument, one domain call each."""

from __future__ import annotations

from typing import Any

from celery import Task

from service.taskqueue import TASK_EVALUATE, TASK_FINE_TUNE, TASK_TRAIN
from worker.app import app, runtime


class JobTask(Task[[str], None]):
    """Base of every job task: acks late, never Celery-retried (attempts are ours)."""

    acks_late = True
    reject_on_worker_lost = True
    max_retries = 0


@app.task(name=TASK_TRAIN, base=JobTask)
def train(job_id: str) -> None:
    runtime.run_job(job_id)


@app.task(name=TASK_EVALUATE, base=JobTask)
def evaluate(job_id: str) -> None:
    runtime.run_job(job_id)


@app.task(name=TASK_FINE_TUNE, base=JobTask)
def fine_tune(job_id: str) -> None:
    runtime.run_job(job_id)


__all__: list[Any] = ["evaluate", "fine_tune", "train"]
