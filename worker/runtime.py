"""What a worker child needs to run jobs: settings, stores, and the job lifecycle."""

from __future__ import annotations

import functools
import logging
import traceback

import redis

from service.config import Settings
from service.domain.datasets import DatasetStore
from service.domain.jobs import JobKind, JobStore
from service.domain.model_store import ModelStore
from service.domain.workspace import Workspace
from service.errors import FitserveError
from service.logs import job_id_var

log = logging.getLogger(__name__)


@functools.cache
def workspace() -> tuple[Settings, Workspace]:
    """Settings and the stores, built once per worker child."""
    settings = Settings()
    client = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    ws = Workspace(
        jobs=JobStore(client),
        datasets=DatasetStore(settings.datasets_dir, settings.max_dataset_bytes),
        models=ModelStore(settings.models_dir),
        jobs_dir=settings.jobs_dir,
    )
    return settings, ws


def run_job(job_id: str) -> None:
    """Start, run and finish one job; every failure ends as a FAILED job, never a lost one."""
    from service.domain.requests import TrainSpec
    from service.domain.training import run_train

    settings, ws = workspace()
    token = job_id_var.set(job_id)
    try:
        job = ws.jobs.start(job_id, settings.job_max_attempts)
        if job is None:
            log.info("job not started: cancelled or out of attempts")
            return
        log.info("job started", extra={"attempt": job.attempt, "kind": job.kind.value})
        if job.kind is not JobKind.TRAIN:
            ws.jobs.fail(job_id, "UNIMPLEMENTED", f"{job.kind.value} jobs are not implemented yet")
            return
        run_train(job, TrainSpec.model_validate(job.request), ws)
        log.info("job finished")
    except FitserveError as exc:
        log.info("job failed: %s", exc.message)
        ws.jobs.fail(job_id, type(exc).__name__.upper(), exc.message)
    except Exception as exc:
        log.exception("job crashed")
        ws.jobs.fail(job_id, "INTERNAL", f"{type(exc).__name__}: {exc}".strip()[:2000])
        traceback.clear_frames(exc.__traceback__)
    finally:
        job_id_var.reset(token)
