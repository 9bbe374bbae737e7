"""TrainingService: validates job requests, records them, and sends them to workers."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fitserve.v1 import training_pb2, training_pb2_grpc
from service.api import converters
from service.api.status import Context, Edge, Servicer, stream_out, unary
from service.domain.datasets import DatasetStore
from service.domain.jobs import AsyncJobStore, Job, JobKind, JobState
from service.domain.requests import parse_train
from service.domain.specs import check_model_spec
from service.errors import InvalidRequest, Unavailable, Unimplemented
from service.metrics import Metrics
from service.taskqueue import TASK_TRAIN, TaskQueue

MAX_PAGE = 1000
WATCH_BLOCK_MS = 5000


class TrainingServicer(Servicer, training_pb2_grpc.TrainingServiceServicer):
    """Thin handlers over the job store and the task queue."""

    def __init__(
        self,
        edge: Edge,
        jobs: AsyncJobStore,
        queue: TaskQueue,
        datasets: DatasetStore,
        metrics: Metrics,
    ) -> None:
        super().__init__(edge)
        self._jobs, self._queue, self._datasets, self._metrics = jobs, queue, datasets, metrics

    @unary
    async def Train(
        self, request: training_pb2.TrainRequest, context: Context
    ) -> training_pb2.TrainResponse:
        spec = parse_train(converters.train_request_data(request))
        check_model_spec(spec.model)
        if spec.dataset.dataset:
            await asyncio.to_thread(self._datasets.get, spec.dataset.dataset)
        job = Job(
            id=uuid.uuid4().hex,
            kind=JobKind.TRAIN,
            model_name=spec.model_name,
            queue=spec.run.queue,
            request=spec.model_dump(mode="json"),
            labels=spec.run.labels,
        )
        stored = await self._jobs.create(job, spec.idempotency_key)
        if stored.id == job.id:
            await self._submit(TASK_TRAIN, stored)
            self._metrics.jobs_submitted.labels(JobKind.TRAIN.value).inc()
        return training_pb2.TrainResponse(job=converters.job_to_proto(stored))

    @unary
    async def FineTune(
        self, request: training_pb2.FineTuneRequest, context: Context
    ) -> training_pb2.FineTuneResponse:
        raise Unimplemented("FineTune is not implemented in this release; it is planned (issue 3)")

    @unary
    async def Evaluate(
        self, request: training_pb2.EvaluateRequest, context: Context
    ) -> training_pb2.EvaluateResponse:
        raise Unimplemented("Evaluate is not implemented in this release; it is planned (issue 3)")

    @unary
    async def GetJob(
        self, request: training_pb2.GetJobRequest, context: Context
    ) -> training_pb2.Job:
        return converters.job_to_proto(await self._jobs.get(_job_id(request.job_id)))

    @unary
    async def ListJobs(
        self, request: training_pb2.ListJobsRequest, context: Context
    ) -> training_pb2.ListJobsResponse:
        filters = _list_filters(request)
        jobs, next_offset = await self._jobs.query(**filters)
        return training_pb2.ListJobsResponse(
            jobs=[converters.job_to_proto(j) for j in jobs],
            next_page_token=str(next_offset) if next_offset else "",
        )

    @stream_out
    async def WatchJob(
        self, request: training_pb2.WatchJobRequest, context: Context
    ) -> AsyncIterator[training_pb2.JobEvent]:
        job_id = _job_id(request.job_id)
        after = request.after_event_id
        job = await self._jobs.get(job_id)
        while True:
            events = await self._jobs.events(job_id, after, WATCH_BLOCK_MS)
            for event in events:
                after = event.id
                yield converters.event_to_proto(job_id, event)
                if event.type == "state" and JobState(event.data["state"]).terminal:
                    return
            if not events:
                job = await self._jobs.get(job_id)
                if job.state.terminal:
                    return

    @unary
    async def CancelJob(
        self, request: training_pb2.CancelJobRequest, context: Context
    ) -> training_pb2.Job:
        return converters.job_to_proto(await self._jobs.cancel(_job_id(request.job_id)))

    async def _submit(self, task: str, job: Job) -> None:
        try:
            await asyncio.to_thread(self._queue.submit, task, job.id, job.queue)
        except Exception as exc:
            await self._jobs.delete(job.id)
            raise Unavailable(
                f"could not queue the job: the broker is unavailable ({exc})"
            ) from None


def _job_id(value: str) -> str:
    if not value:
        raise InvalidRequest("job_id is required", field="job_id")
    if len(value) > 64 or not value.isalnum():
        raise InvalidRequest(f"job_id {value!r} is not a job id", field="job_id")
    return value


def _list_filters(request: training_pb2.ListJobsRequest) -> dict[str, Any]:
    if request.page_size < 0 or request.page_size > MAX_PAGE:
        raise InvalidRequest(f"page_size must be 1..{MAX_PAGE}", field="page_size")
    token = request.page_token
    if token and not token.isdigit():
        raise InvalidRequest("page_token is not one this server issued", field="page_token")
    state = training_pb2.JobState.Name(request.state).removeprefix("JOB_STATE_")
    kind = training_pb2.JobKind.Name(request.kind).removeprefix("JOB_KIND_")
    return {
        "state": "" if state == "UNSPECIFIED" else state,
        "kind": "" if kind == "UNSPECIFIED" else kind,
        "model_name": request.model_name,
        "offset": int(token or 0),
        "limit": request.page_size or 50,
    }
