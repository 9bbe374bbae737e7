"""TrainingService: validates job requests, records them, and sends them to workers."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from google.protobuf.message import Message

from fitserve.v1 import training_pb2, training_pb2_grpc
from service.api import converters
from service.api.access import Access
from service.api.auth import audit
from service.api.paging import enum_filter, next_token, page
from service.api.status import Context, RpcOutcomes, Servicer, stream_out, unary
from service.config import JobTimeLimitSettings
from service.domain import job_artifacts, job_records
from service.domain.config_check import check_model_spec
from service.domain.datasets import sources
from service.domain.datasets.store import DatasetStore
from service.domain.job_specs import (
    MISSING_LOSS,
    DatasetRef,
    EvaluateSpec,
    FineTuneSpec,
    FreezeSpec,
    RunSpec,
    parse_evaluate,
    parse_fine_tune,
    parse_train,
)
from service.domain.job_store import AsyncJobStore
from service.domain.jobs import Job, JobKind, JobState
from service.domain.model_store import ModelStore
from service.errors import DiskFull, InvalidRequest, Unavailable, shown, storage_full
from service.metrics import Metrics
from service.plugins.registry import Kind, Registry, check_recorded
from service.taskqueue import TASK_EVALUATE, TASK_FINE_TUNE, TASK_TRAIN, TaskQueue

ARTIFACT_CHUNK_BYTES = 1024 * 1024
MAX_JOB_REQUEST_BYTES = 1024 * 1024  # Settings.max_job_request_bytes's default
EVENT_ID = re.compile(r"\d{1,20}(-\d{1,20})?")
WATCH_WAIT_SECONDS = 2.0  # a watcher re-reads the job's state at least this often


class TrainingServicer(Servicer, training_pb2_grpc.TrainingServiceServicer):
    """Thin handlers over the job store and the task queue."""

    def __init__(
        self,
        outcomes: RpcOutcomes,
        jobs: AsyncJobStore,
        queue: TaskQueue,
        datasets: DatasetStore,
        models: ModelStore,
        metrics: Metrics,
        dataset_roots: Sequence[Path] = (),
        dataset_url_schemes: Sequence[str] = sources.DEFAULT_URL_SCHEMES,
        plugins: Registry | None = None,
        jobs_dir: Path | None = None,
        access: Access | None = None,
        *,
        max_job_request_bytes: int = MAX_JOB_REQUEST_BYTES,
        time_limits: JobTimeLimitSettings | None = None,
    ) -> None:
        super().__init__(outcomes)
        self._max_request_bytes = max_job_request_bytes
        self._time_limits = time_limits or JobTimeLimitSettings()
        self._plugins = plugins or Registry()
        # Settings.jobs_dir; its default, when the composition root passes none.
        self._jobs_dir = jobs_dir or datasets.root.parent / "jobs"
        self._jobs, self._queue, self._metrics = jobs, queue, metrics
        self._datasets, self._models = datasets, models
        # Settings.dataset_roots; its default, when the composition root passes none.
        self._dataset_roots = list(dataset_roots) or [datasets.root.parent / "external"]
        self._dataset_url_schemes = tuple(dataset_url_schemes)
        self._access = access  # ownership and quotas; None: every caller may do anything

    @unary
    async def Train(
        self, request: training_pb2.TrainRequest, context: Context
    ) -> training_pb2.TrainResponse:
        """Validate a training request and queue it as a job (idempotent per
        idempotency_key); INVALID_ARGUMENT names the first bad field."""
        self._check_size(request, "Train")
        spec = parse_train(converters.train_request_data(request))
        spec = spec.model_copy(update={"run": self._time_limited(spec.run)})
        check_model_spec(spec.model)
        await self._check_datasets(spec.dataset, spec.fit.validation_data)
        job = _new_job(JobKind.TRAIN, spec.model_name, spec.run, spec.model_dump(mode="json"))
        stored = await self._queue_job(TASK_TRAIN, job, spec.idempotency_key)
        return training_pb2.TrainResponse(job=converters.job_to_proto(stored))

    @unary
    async def FineTune(
        self, request: training_pb2.FineTuneRequest, context: Context
    ) -> training_pb2.FineTuneResponse:
        """Queue a job that continues training a stored version (last N layers, or a new
        head on a frozen base); NOT_FOUND when the base version does not exist."""
        self._check_size(request, "FineTune")
        spec = parse_fine_tune(converters.fine_tune_request_data(request))
        spec = spec.model_copy(update={"run": self._time_limited(spec.run)})
        spec = await asyncio.to_thread(self._resolve_base, spec)
        await self._check_datasets(spec.dataset, spec.fit.validation_data)
        job = _new_job(JobKind.FINE_TUNE, spec.model_name, spec.run, spec.model_dump(mode="json"))
        stored = await self._queue_job(TASK_FINE_TUNE, job, spec.idempotency_key)
        return training_pb2.FineTuneResponse(job=converters.job_to_proto(stored))

    @unary
    async def Evaluate(
        self, request: training_pb2.EvaluateRequest, context: Context
    ) -> training_pb2.EvaluateResponse:
        """Queue a job that evaluates a stored version on a dataset, its metrics recorded on
        the version; NOT_FOUND for an unknown model, version, alias or dataset."""
        self._check_size(request, "Evaluate")
        spec = parse_evaluate(converters.evaluate_request_data(request))
        spec = spec.model_copy(update={"run": self._time_limited(spec.run)})
        spec = await asyncio.to_thread(self._resolve, spec)
        await self._check_datasets(spec.dataset)
        job = _new_job(JobKind.EVALUATE, spec.model_name, spec.run, spec.model_dump(mode="json"))
        stored = await self._queue_job(TASK_EVALUATE, job)
        return training_pb2.EvaluateResponse(job=converters.job_to_proto(stored))

    @unary
    async def GetJob(
        self, request: training_pb2.GetJobRequest, context: Context
    ) -> training_pb2.Job:
        """A job's record, with its place in its queue while QUEUED; NOT_FOUND when unknown
        or expired."""
        job = await self._jobs.get(_job_id(request.job_id))
        positions = await self._queue_positions([job])
        return converters.job_to_proto(job, positions.get(job.id, -1))

    @unary
    async def ListJobs(
        self, request: training_pb2.ListJobsRequest, context: Context
    ) -> training_pb2.ListJobsResponse:
        """Jobs, newest first, filtered by state, kind and model, a page at a time, with
        their request bodies only for view FULL; INVALID_ARGUMENT for a page_size over the
        maximum, a page_token not issued here or an unknown view."""
        full = _full_view(request.view)
        filters = _list_filters(request)
        jobs, next_offset = await self._jobs.query(**filters)
        positions = await self._queue_positions(jobs)
        return training_pb2.ListJobsResponse(
            jobs=[_listed(j, positions.get(j.id, -1), full) for j in jobs],
            next_page_token=next_token(next_offset),
        )

    @stream_out
    async def WatchJob(
        self, request: training_pb2.WatchJobRequest, context: Context
    ) -> AsyncIterator[training_pb2.JobEvent]:
        """Stream a job's events after after_event_id until it ends, so a client that lost
        the stream resumes where it left off; NOT_FOUND for an unknown job."""
        job_id = _job_id(request.job_id)
        after = _event_id(request.after_event_id)
        while True:
            # Read the state first: once it is terminal, every event is already in the
            # stream, so end when nothing is left to read.
            finished = (await self._jobs.state(job_id)).terminal
            events = await self._jobs.events(job_id, after)
            for event in events:
                after = event.id
                yield converters.event_to_proto(job_id, event)
                if event.type == "state" and JobState(event.data["state"]).terminal:
                    return
            if finished and not events:
                return
            if not events:  # wait without holding a Redis connection (one read per process)
                await self._jobs.wait_for_events(job_id, after, WATCH_WAIT_SECONDS)

    @unary
    async def CancelJob(
        self, request: training_pb2.CancelJobRequest, context: Context
    ) -> training_pb2.Job:
        """Ask a job to stop (a queued one never starts); FAILED_PRECONDITION once it has
        finished."""
        job_id = _job_id(request.job_id)
        if self._access is not None:
            self._access.check_job(await self._jobs.get(job_id))
        cancelled = await self._jobs.cancel(job_id)
        if cancelled.state.terminal:  # cancelled while queued: nothing left to recover
            await asyncio.to_thread(job_records.remove, self._jobs_dir, job_id)
        audit("job.cancel", job=job_id, model=cancelled.model_name)
        return converters.job_to_proto(cancelled)

    @unary
    async def ListPlugins(
        self, request: training_pb2.ListPluginsRequest, context: Context
    ) -> training_pb2.ListPluginsResponse:
        """Every plugin object requests may name, with its parameters, and every plugin
        source that failed to load; INVALID_ARGUMENT for an unknown kind."""
        kinds = [k.value for k in Kind]
        if request.kind and request.kind not in kinds:
            raise InvalidRequest(
                f"kind {request.kind[:64]!r} is not a plugin kind; valid: {', '.join(kinds)} "
                "(or empty for all)",
                field="kind",
            )
        return converters.plugins_to_proto(self._plugins, request.kind)

    @unary
    async def ListJobArtifacts(
        self, request: training_pb2.ListJobArtifactsRequest, context: Context
    ) -> training_pb2.ListJobArtifactsResponse:
        """The files a job wrote (checkpoints, TensorBoard logs, history.csv); NOT_FOUND
        for an unknown job."""
        job = await self._jobs.get(_job_id(request.job_id))
        found = await asyncio.to_thread(job_artifacts.list_artifacts, self._jobs_dir / job.id)
        return training_pb2.ListJobArtifactsResponse(
            artifacts=[
                training_pb2.JobArtifact(
                    path=a.path,
                    size_bytes=a.size_bytes,
                    modified_at=converters.timestamp(a.modified_at),
                )
                for a in found
            ]
        )

    @stream_out
    async def DownloadJobArtifact(
        self, request: training_pb2.DownloadJobArtifactRequest, context: Context
    ) -> AsyncIterator[training_pb2.ArtifactChunk]:
        """One artifact's bytes in chunks; NOT_FOUND for an unknown job or a path it did
        not write, INVALID_ARGUMENT for a path outside its folder."""
        job = await self._jobs.get(_job_id(request.job_id))
        if self._access is not None:
            self._access.check_job(job)
        path = job_artifacts.artifact_path(self._jobs_dir / job.id, request.path)
        chunks = job_artifacts.read_chunks(path, ARTIFACT_CHUNK_BYTES)
        try:
            while chunk := await asyncio.to_thread(next, chunks, b""):
                yield training_pb2.ArtifactChunk(data=chunk)
        finally:
            chunks.close()  # the file, also when the caller goes away mid-stream

    def _check_size(self, request: Message, method: str) -> None:
        """INVALID_ARGUMENT for a job request over the cap, naming its largest field: the
        request is stored with the job (and much of it with the version it publishes)."""
        size = request.ByteSize()
        if size <= self._max_request_bytes:
            return
        largest, largest_size = max(
            ((f.name, _field_size(v)) for f, v in request.ListFields()), key=lambda e: e[1]
        )
        raise InvalidRequest(
            f"the {method} request is {size} bytes, over this server's limit of "
            f"{self._max_request_bytes} bytes for a job request (FITSERVE_MAX_JOB_REQUEST_BYTES); "
            f"its largest field is {largest} ({largest_size} bytes). A request holds names, "
            "options and labels; data goes in a dataset (UploadDataset, or a uri)",
            field=largest,
        )

    def _time_limited(self, run: RunSpec) -> RunSpec:
        """The run options with the job's time limit pinned: the request's, else this
        server's default; INVALID_ARGUMENT for more than the server's maximum."""
        requested, most = run.time_limit_seconds, self._time_limits.max_seconds
        if requested is not None and most is not None and requested > most:
            raise InvalidRequest(
                f"run.time_limit_seconds: {requested} is over this server's maximum of "
                f"{most} seconds (FITSERVE_JOB_TIME_LIMIT__MAX_SECONDS); ask for at most "
                f"{most}, or leave it unset for the default",
                field="run.time_limit_seconds",
            )
        return run.model_copy(update={"time_limit_seconds": self._time_limits.resolve(requested)})

    async def _queue_positions(self, jobs: Sequence[Job]) -> dict[str, int]:
        """The place of each QUEUED job among ``jobs`` in its queue, from one read of each
        queue involved; other jobs are left out (their position is unknown: -1)."""
        waiting: dict[str, list[str]] = {}
        for job in jobs:
            if job.state is JobState.QUEUED:
                waiting.setdefault(job.queue, []).append(job.id)
        positions: dict[str, int] = {}
        for queue, ids in waiting.items():
            positions |= await self._queue.positions(queue, ids)
        return positions

    def _resolve(self, spec: EvaluateSpec) -> EvaluateSpec:
        """Pin the version now: NOT_FOUND for an unknown model, version or alias."""
        version = self._models.resolve(spec.model_name, spec.version, spec.alias)
        meta = self._models.metadata(spec.model_name, version)
        check_recorded(
            meta.get("plugins"), self._plugins, f"version {version} of {spec.model_name!r}"
        )
        return spec.model_copy(update={"version": version})

    def _resolve_base(self, spec: FineTuneSpec) -> FineTuneSpec:
        """Pin the base version now (NOT_FOUND for an unknown model, version or alias)
        and check the layer counts against it where its fitserve.json tells them."""
        base = spec.base
        version = self._models.resolve(base.name, base.version, base.alias)
        meta = self._models.metadata(base.name, version)
        check_recorded(meta.get("plugins"), self._plugins, f"version {version} of {base.name!r}")
        check_layer_counts(spec.freeze, layer_count(meta))
        check_loss(spec, meta)
        return spec.model_copy(update={"base": base.model_copy(update={"version": version})})

    async def _check_datasets(self, *refs: DatasetRef | None) -> None:
        """NOT_FOUND (or INVALID_ARGUMENT for a uri) now rather than a failed job later."""
        for ref, field in zip(refs, ("dataset", "fit.validation_data"), strict=False):
            if ref is not None:
                await asyncio.to_thread(self._check_dataset, ref, field)

    def _check_dataset(self, ref: DatasetRef, field: str) -> None:
        if ref.dataset:
            self._datasets.get(ref.dataset)
        elif ref.uri:
            sources.check_uri(ref, self._dataset_roots, field, self._dataset_url_schemes)

    async def _queue_job(self, task: str, job: Job, idempotency_key: str = "") -> Job:
        """Record the job and send its task; a repeated idempotency key returns the first
        job and sends nothing."""
        if self._access is not None:
            await self._access.admit_job(job)
        stored = await self._jobs.create(job, idempotency_key)
        if stored.id == job.id:
            await self._keep_record(stored)
            await self._submit(task, stored)
            if self._access is not None:
                await self._access.job_recorded(stored)
        return stored

    async def _keep_record(self, job: Job) -> None:
        """The job's record file on the data disk (``service.domain.job_records``): what
        tells the reaper the job existed should Redis lose its data. A disk that refuses
        it refuses the job: nothing of it is kept."""
        try:
            await asyncio.to_thread(job_records.write, self._jobs_dir, job)
        except OSError as exc:
            await self._jobs.delete(job.id)
            await asyncio.to_thread(job_records.remove, self._jobs_dir, job.id)
            message = (
                f"could not queue the job: the server's disk refused its record under "
                f"<data folder>/jobs ({exc.strerror}); nothing of it was kept"
            )
            if storage_full(exc) is not None:
                raise DiskFull(
                    message + "; free space in the data folder, then submit again"
                ) from None
            raise Unavailable(message) from None

    async def _submit(self, task: str, job: Job) -> None:
        try:
            await asyncio.to_thread(self._queue.submit, task, job.id, job.queue)
        except Exception as exc:
            await self._jobs.delete(job.id)
            await asyncio.to_thread(job_records.remove, self._jobs_dir, job.id)
            raise Unavailable(
                f"could not queue the job: the broker is unavailable ({exc})"
            ) from None
        self._metrics.jobs_submitted.labels(job.kind.value).inc()


def _new_job(kind: JobKind, model_name: str, run: RunSpec, request: dict[str, Any]) -> Job:
    return Job(
        id=uuid.uuid4().hex,
        kind=kind,
        model_name=model_name,
        queue=run.queue,
        request=request,
        labels=run.labels,
    )


def layer_count(meta: dict[str, Any]) -> int | None:
    """Layers of a stored version as freezing counts them (InputLayers excluded), from
    its fitserve.json: recorded since fine-tuning exists, else read from a layer-list
    spec; None when unknown (the worker checks then)."""
    if isinstance(count := meta.get("num_layers"), int):
        return count
    spec = meta.get("spec") or {}
    layers = spec.get("layers") if isinstance(spec, dict) else None
    return len(layers) if layers else None


def check_loss(spec: FineTuneSpec, meta: dict[str, Any]) -> None:
    """INVALID_ARGUMENT now for a fine-tune without a loss, unless the base was trained
    without one too (its loss layers add their own)."""
    if spec.compile.has_loss:
        return
    base_compile = meta.get("compile")
    if (
        isinstance(base_compile, dict)
        and not base_compile.get("loss")
        and not base_compile.get("output_losses")
    ):
        return
    raise InvalidRequest(MISSING_LOSS, field="compile.loss")


def check_layer_counts(freeze: FreezeSpec, count: int | None) -> None:
    """INVALID_ARGUMENT now for more layers than the base has."""
    if count is None:
        return
    if freeze.train_last_n_layers is not None and freeze.train_last_n_layers > count:
        raise InvalidRequest(
            f"freeze.train_last_n_layers is {freeze.train_last_n_layers}, but the base model "
            f"has only {count} layers",
            field="freeze.train_last_n_layers",
        )
    if (selection := freeze.freeze_layers) is not None:
        wrong = [i for i in selection.indices if not -count <= i < count]
        if wrong:
            raise InvalidRequest(
                f"freeze.freeze_layers.indices: {wrong[0]} is out of range; the base has "
                f"{count} layers (0 to {count - 1}, or -1 to -{count})",
                field="freeze.freeze_layers.indices",
            )
    head = freeze.head_layers
    if head is not None and head.drop_last >= count:
        raise InvalidRequest(
            f"freeze.head_layers.drop_last is {head.drop_last}, but the base has only "
            f"{count} layers",
            field="freeze.head_layers.drop_last",
        )
    below_head = count
    if freeze.new_head is not None:
        below_head = count - 1
    elif head is not None:
        below_head = count - head.drop_last
    if freeze.unfreeze_top_k > below_head:
        raise InvalidRequest(
            f"freeze.unfreeze_top_k is {freeze.unfreeze_top_k}, but the part of the model "
            f"below the head has only {below_head} layers",
            field="freeze.unfreeze_top_k",
        )


def _job_id(value: str) -> str:
    if not value:
        raise InvalidRequest("job_id is required", field="job_id")
    if len(value) > 64 or not value.isalnum():
        raise InvalidRequest(f"job_id {shown(value)} is not a job id", field="job_id")
    return value


def _event_id(value: str) -> str:
    """An event id a client saw (``<ms>-<seq>``), or "" for the start."""
    if value and not (
        value.isascii() and EVENT_ID.fullmatch(value) and max(map(int, value.split("-"))) < 2**64
    ):
        raise InvalidRequest(
            f"after_event_id {value[:64]!r} is not an event id; send the event_id of the "
            "last event you received (like '1700000000000-0', each part at most "
            f"{2**64 - 1}), or nothing to start from the first event",
            field="after_event_id",
        )
    return value


def _field_size(value: Any) -> int:
    """The serialized size of one field's value (a message, a string, a repeated or map
    field), near enough to name the largest."""
    if isinstance(value, Message):
        return value.ByteSize()
    if isinstance(value, str | bytes):
        return len(value.encode() if isinstance(value, str) else value)
    try:
        items = list(value.values()) if hasattr(value, "values") else list(value)
    except TypeError:
        return 8  # a number
    return sum(_field_size(item) for item in items)


def _full_view(view: int) -> bool:
    """Whether ListJobs returns request bodies: only for JOB_VIEW_FULL (AIP-157)."""
    if view not in training_pb2.JobView.values():
        valid = ", ".join(training_pb2.JobView.keys())
        raise InvalidRequest(f"view {view} is not a JobView; valid: {valid}", field="view")
    return view == training_pb2.JOB_VIEW_FULL


def _listed(job: Job, queue_position: int, full: bool) -> training_pb2.Job:
    """A job as ListJobs returns it: without its request body unless ``full``."""
    if full:
        return converters.job_to_proto(job, queue_position)
    out = converters.job_to_proto(dataclasses.replace(job, request={}), queue_position)
    out.ClearField("request_json")
    return out


def _list_filters(request: training_pb2.ListJobsRequest) -> dict[str, Any]:
    wanted = page(request.page_size, request.page_token)
    state = enum_filter(training_pb2.JobState, request.state, "state", "JOB_STATE_", "job state")
    kind = enum_filter(training_pb2.JobKind, request.kind, "kind", "JOB_KIND_", "job kind")
    return {
        "state": state,
        "kind": kind,
        "model_name": request.model_name,
        "offset": wanted.offset,
        "limit": wanted.size,
    }
