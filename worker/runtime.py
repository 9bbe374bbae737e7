"""What a worker child needs to run jobs: the stores its settings name, and the job lifecycle."""

from __future__ import annotations

import functools
import logging
import os
import socket
import traceback
from collections.abc import Callable
from typing import assert_never

import redis

from service.config import Settings
from service.domain import job_records, leases
from service.domain.datasets.store import DatasetStore
from service.domain.job_store import JobStore, StartOutcome
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
REDIS_RETRY_SECONDS = 60.0
"""How long a job's start, finish or hand-back retries while Redis is unreachable."""


class NotStarted(Exception):
    """The job could not even be started (Redis unreachable): its message goes back."""


Resubmit = Callable[[str, str, str], None]
"""Sends a job's Celery message again: (kind, job id, queue)."""


def lease_owner(pid: int | None = None) -> str:
    """Who holds a lease: this host and the worker child's pid."""
    return f"{socket.gethostname()}/{os.getpid() if pid is None else pid}"


def _dead_here(owner: str) -> bool:
    """Whether ``owner`` is a process of this host that no longer runs."""
    host, _, pid = owner.rpartition("/")
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class Runtime:
    """One worker child's settings, stores and job lifecycle.

    Built by the composition root (``worker.app``) from its settings; the stores are made
    at the first job, in the child, so no Redis connection is ever shared across a fork.
    """

    def __init__(self, settings: Settings, resubmit: Resubmit | None = None) -> None:
        self.settings = settings
        self._resubmit = resubmit
        self.stopping = ""  # why this process stops (set by SIGUSR2: worker.shutdown)

    @functools.cached_property
    def workspace(self) -> Workspace:
        """The stores every job of this child uses."""
        settings = self.settings
        # Timeouts: a Redis that stops answering must not hang the lease's heartbeat.
        client = redis.Redis.from_url(
            settings.redis_url, decode_responses=True, socket_timeout=10, socket_connect_timeout=5
        )
        return Workspace(
            jobs=JobStore(
                client,
                retention_seconds=settings.job_retention_seconds,
                hidden=self.hidden,
                retry_seconds=REDIS_RETRY_SECONDS,
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
        finds the traceback in this log (``service.training.failures``).

        While it runs, the job's lease is renewed from a thread (``leases.Heartbeat``). A
        job this worker must stop without finishing is handed back (the worker stops:
        ``hand_back``) or left to the attempt that took its lease."""
        ws = self.workspace
        _ = self.plugins
        token = job_id_var.set(job_id)
        try:
            try:
                job = self._start(ws, job_id)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                raise NotStarted(f"Redis is unreachable: {exc}") from exc
            if job is None:
                return
            log.info("job started", extra={"attempt": job.attempt, "kind": job.kind.value})
            _keep_record(ws, job)
            owner = lease_owner()
            lease = self.settings.job_lease_seconds
            control = leases.JobControl()
            beat = leases.Heartbeat(ws.jobs, job.id, job.attempt, owner, lease, control)
            control.renew = beat.confirm
            if self.stopping:
                control.hand_back(self.stopping)
            try:
                with beat, leases.running(control):
                    self._run_caught(job, ws)
                _drop_record(ws, job.id)  # finished: nothing left to recover
            except leases.Stopped as exc:
                traceback.clear_frames(exc.__traceback__)
                if control.lost:
                    log.warning("job left to the attempt holding its lease: %s", exc)
                else:
                    self._hand_back(job, ws, owner, str(exc))
        finally:
            ws.jobs.forget(job_id)
            job_id_var.reset(token)

    def hand_back_running(self, reason: str) -> None:
        """The worker is stopping: the job running now (and any that starts later) stops at
        its next batch end and is handed back. Called from the SIGUSR2 handler."""
        self.stopping = self.stopping or reason
        control = leases.current()
        if control is not None:
            control.hand_back(reason)

    def _start(self, ws: Workspace, job_id: str) -> Job | None:
        """The job moved to RUNNING with this child's lease, or None when it must not run
        here (said in the log)."""
        owner = ws.jobs.lease_owner(job_id)
        outcome, job = ws.jobs.start_outcome(
            job_id,
            self.settings.job_max_attempts,
            owner=lease_owner(),
            lease_seconds=self.settings.job_lease_seconds,
            dead_owner=owner if owner and _dead_here(owner) else "",
        )
        if outcome is not StartOutcome.STARTED:
            log.info("job not started: %s", _NOT_STARTED[outcome])
        if outcome in (StartOutcome.CANCELLED, StartOutcome.FAILED, StartOutcome.DONE):
            _drop_record(ws, job_id)
        return job

    def _run_caught(self, job: Job, ws: Workspace) -> None:
        """Run the job; a failure fails it (fenced to this attempt). ``leases.Stopped``
        passes through."""
        try:
            _run(job, ws)
            log.info("job finished")
        except leases.Stopped:
            raise
        except FitserveError as exc:
            from service.training import failures

            log.info("job failed: %s", exc.message)
            ws.jobs.fail(job.id, failures.reason_of(exc), exc.message)
        except Exception as exc:
            from service.training import failures

            if (known := failures.classified(exc)) is not None:
                log.warning("job failed: %s", known.message, exc_info=True)
                ws.jobs.fail(job.id, failures.reason_of(known), known.message)
            else:
                error_id = failures.new_error_id()
                log.exception("job crashed (error id %s)", error_id, extra={"error_id": error_id})
                ws.jobs.fail(job.id, failures.INTERNAL, failures.internal_message(error_id))
            traceback.clear_frames(exc.__traceback__)

    def _hand_back(self, job: Job, ws: Workspace, owner: str, reason: str) -> None:
        """Give the job back to the queue: QUEUED (or CANCELLED when a cancel came), and
        its Celery message sent again; were that to fail, the reaper sends it."""
        lease = self.settings.job_lease_seconds
        outcome, token = ws.jobs.hand_back(job.id, owner, reason, dispatch_seconds=lease)
        log.info("job handed back: %s (%s)", outcome, reason)
        if outcome != "queued" or self._resubmit is None:
            return
        try:
            self._resubmit(job.kind.value, job.id, job.queue)
            ws.jobs.dispatched(job.id, token)
        except Exception:
            log.warning("could not queue the job again; the reaper will", exc_info=True)


def _keep_record(ws: Workspace, job: Job) -> None:
    """The job's record file, rewritten at this attempt (``service.domain.job_records``):
    what rebuilds it should Redis lose its data. A disk that refuses it does not stop the
    job (the export would say so)."""
    try:
        job_records.write(ws.jobs_dir, job)
    except OSError as exc:
        log.warning("could not write the job's record file (%s)", exc)


def _drop_record(ws: Workspace, job_id: str) -> None:
    try:
        job_records.remove(ws.jobs_dir, job_id)
    except OSError as exc:
        log.warning("could not remove the job's record file (%s)", exc)


_NOT_STARTED = {
    StartOutcome.BUSY: "another attempt holds its lease (a duplicate message)",
    StartOutcome.CANCELLED: "cancelled",
    StartOutcome.FAILED: "out of attempts",
    StartOutcome.DONE: "finished already",
    StartOutcome.GONE: "its record is gone",
}


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
