"""Task shims: explicit names, the job id as the only argument, one domain call each."""

from __future__ import annotations

from typing import Any

from billiard.einfo import ExceptionInfo
from celery import Task
from celery.exceptions import Reject, TimeLimitExceeded

from service.taskqueue import TASK_EVALUATE, TASK_FINE_TUNE, TASK_TRAIN
from worker import limits, shutdown
from worker.app import app, runtime, settings
from worker.runtime import NotStarted


class JobTask(Task[[str], None]):
    """Base of every job task: acks late, never Celery-retried (attempts are ours), and
    killed by the pool past the longest time limit plus a grace (``worker.limits``)."""

    acks_late = True
    reject_on_worker_lost = True
    max_retries = 0
    time_limit = limits.hard_time_limit(settings)

    def on_failure(
        self,
        exc: Exception,
        task_id: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        einfo: ExceptionInfo,
    ) -> None:
        """On a hard time limit Celery calls this in the parent, once the child is past
        saving: the job is FAILED there. Other failures never reach here (run_job ends
        every job itself)."""
        if isinstance(exc, TimeLimitExceeded) and self.time_limit is not None:
            limits.fail_timed_out(settings, str(args[0]) if args else task_id, self.time_limit)


def _run(job_id: str) -> None:
    """Run the job; its message goes back to the queue when this worker is stopping
    before the job started, or when Redis could not be reached to start it. The signal
    a stopping worker's main process sends is handled from here on (billiard resets
    every handler after the child's initializer runs)."""
    shutdown.install_child(runtime.hand_back_running)
    if runtime.stopping:
        raise Reject(runtime.stopping, requeue=True)
    try:
        runtime.run_job(job_id)
    except NotStarted as exc:
        raise Reject(str(exc), requeue=True) from None


@app.task(name=TASK_TRAIN, base=JobTask)
def train(job_id: str) -> None:
    _run(job_id)


@app.task(name=TASK_EVALUATE, base=JobTask)
def evaluate(job_id: str) -> None:
    _run(job_id)


@app.task(name=TASK_FINE_TUNE, base=JobTask)
def fine_tune(job_id: str) -> None:
    _run(job_id)


__all__: list[Any] = ["evaluate", "fine_tune", "train"]
