"""What a worker child needs to run jobs: the stores its settings name, and the job lifecycle."""

from __future__ import annotations

import functools
import logging
import traceback
from typing import assert_never

import redis

from service.config import Settings
from service.domain.datasets.store import DatasetStore
from service.domain.job_store import JobStore
from service.domain.jobs import Job, JobKind
from service.domain.model_events import Publisher
from service.domain.model_store import ModelStore
from service.domain.workspace import Workspace
from service.errors import FitserveError
from service.logs import job_id_var
from service.plugins import discovery
from service.plugins.registry import Registry

log = logging.getLogger(__name__)
DATA_FOLDER = "<data folder>"


class Runtime:
    """One worker child's settings, stores and job lifecycle.

    Built by the composition root (``worker.app``) from its settings; the stores are made
    at the first job, in the child, so no Redis connection is ever shared across a fork.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @functools.cached_property
    def workspace(self) -> Workspace:
        """The stores every job of this child uses."""
        settings = self.settings
        client = redis.Redis.from_url(settings.redis_url, decode_responses=True)
        return Workspace(
            jobs=JobStore(
                client, retention_seconds=settings.job_retention_seconds, hidden=self.hidden
            ),
            datasets=DatasetStore(settings.datasets_dir, settings.max_dataset_bytes),
            models=ModelStore(settings.models_dir),
            jobs_dir=settings.jobs_dir,
            dataset_roots=tuple(settings.dataset_roots),
            keras_datasets_dir=settings.data_dir / "keras_datasets",
            dataset_url_schemes=tuple(settings.dataset_url_schemes),
            dataset_cache_bytes=settings.dataset_cache_bytes,
            dataset_cache_dir=settings.data_dir / "dataset_cache",
            model_events=Publisher(settings.redis_url),
        )

    @property
    def hidden(self) -> dict[str, str]:
        """The server folders no message to a caller spells out: the data folder (as
        configured and resolved), named instead."""
        data = self.settings.data_dir
        return {str(data): DATA_FOLDER, str(data.resolve()): DATA_FOLDER}

    @functools.cached_property
    def plugins(self) -> Registry:
        """This child's plugins, installed for the request checks and registered with
        Keras; loaded in the child, since plugin modules import Keras."""
        from service.training.plugins import register_with_keras

        registry = discovery.load(self.settings.plugins)
        register_with_keras(registry)
        return registry

    def run_job(self, job_id: str) -> None:
        """Start, run and finish one job; every failure ends as a FAILED job, never a
        lost one. A user error fails it with its reason and message (an exception raised
        in plugin code names the plugin); anything else is INTERNAL with an error id that
        finds the traceback in this log (``service.training.failures``)."""
        ws = self.workspace
        _ = self.plugins
        token = job_id_var.set(job_id)
        try:
            job = ws.jobs.start(job_id, self.settings.job_max_attempts)
            if job is None:
                log.info("job not started: cancelled or out of attempts")
                return
            log.info("job started", extra={"attempt": job.attempt, "kind": job.kind.value})
            _run(job, ws)
            log.info("job finished")
        except FitserveError as exc:
            from service.training import failures

            log.info("job failed: %s", exc.message)
            ws.jobs.fail(job_id, failures.reason_of(exc), exc.message)
        except Exception as exc:
            from service.training import failures

            if (known := failures.classified(exc)) is not None:
                log.warning("job failed: %s", known.message, exc_info=True)
                ws.jobs.fail(job_id, failures.reason_of(known), known.message)
            else:
                error_id = failures.new_error_id()
                log.exception("job crashed (error id %s)", error_id, extra={"error_id": error_id})
                ws.jobs.fail(job_id, failures.INTERNAL, failures.internal_message(error_id))
            traceback.clear_frames(exc.__traceback__)
        finally:
            job_id_var.reset(token)


def _run(job: Job, ws: Workspace) -> None:
    """The domain function of the job's kind (imported here: TensorFlow loads in the child)."""
    try:
        _dispatch(job, ws)
    finally:
        import keras

        # The child lives for many jobs: drop Keras's global graph state and name
        # counters of this one, or every job leaves a few MB behind.
        keras.backend.clear_session(free_memory=True)


def _dispatch(job: Job, ws: Workspace) -> None:
    match job.kind:
        case JobKind.TRAIN:
            from service.domain.job_specs import TrainSpec
            from service.training.train import run_train

            run_train(job, TrainSpec.model_validate(job.request), ws)
        case JobKind.EVALUATE:
            from service.domain.job_specs import EvaluateSpec
            from service.training.evaluate import run_evaluate

            run_evaluate(job, EvaluateSpec.model_validate(job.request), ws)
        case JobKind.FINE_TUNE:
            from service.domain.job_specs import FineTuneSpec
            from service.training.fine_tune import run_fine_tune

            run_fine_tune(job, FineTuneSpec.model_validate(job.request), ws)
        case _:
            assert_never(job.kind)
