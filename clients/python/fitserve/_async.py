"""`AsyncClient` and `AsyncJob`: the `Client` and `Job` calls for asyncio services, over
grpc.aio. Requests are built and responses converted by the same functions as `Client`'s
(`fitserve._client`), retries follow the same service config (`fitserve._calls`) and the
progress bar is the same (`fitserve._progress`); only the awaiting differs here.

Calls take `timeout=` as `Client`'s and grpc.aio's own stubs do: it is the call's gRPC
deadline, sent to the server, which `asyncio.timeout` around the call would not be.
"""

# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import os
import pathlib
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar, Unpack

import grpc
import grpc.aio
import numpy.typing as npt

from fitserve import _specs
from fitserve._calls import retry_pause, service_config
from fitserve._client import (
    MAX_RECONNECT_BACKOFF_MS,
    RETRY_BUFFER_BYTES,
    Prediction,
    artifact_target,
    dataset_key,
    evaluate_request,
    feedback_request,
    file_upload_header,
    fine_tune_request,
    first_output,
    list_jobs_request,
    predict_request,
    prediction,
    train_request,
    upload_parts,
)
from fitserve._credentials import (
    TlsOptions,
    auth_metadata,
    resolve_target,
    resolve_tls,
    resolve_token,
)
from fitserve._errors import (
    DeadlineExceededError,
    FitserveError,
    ResourceExhaustedError,
    from_rpc_error,
)
from fitserve._job import (
    WATCH_RETRY_SECONDS,
    JobRecord,
    _is_terminal_event,
    _Outage,
    _outcome,
    _status_code,
)
from fitserve._options import TrainingOptions
from fitserve._progress import ProgressBar, Verbose, resolve_verbose, total_epochs
from fitserve._specs import DatasetLike, KerasModel
from fitserve._states import JobState
from fitserve.v1 import (
    dataset_pb2,
    dataset_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
    model_pb2,
    model_pb2_grpc,
    training_pb2,
    training_pb2_grpc,
)

__all__ = ["AsyncClient", "AsyncJob"]

_Response = TypeVar("_Response")
_Item = TypeVar("_Item")
_PREDICT = "/fitserve.v1.InferenceService/Predict"
_DEFAULT_CHUNK_BYTES = 1024 * 1024
_CHUNK_OVERHEAD_BYTES = 16


class AsyncClient:
    """`fitserve.Client` for asyncio: the same calls, awaited (`await client.train(...)`),
    listings as async iterators (`async for job in client.list_jobs()`).

    Deadlines, retries, tokens, TLS and the message size limit work as `Client`'s (see
    its docstring); `channel` takes an existing `grpc.aio.Channel`, which the caller
    then closes. Use it from one event loop, as grpc.aio requires.
    """

    def __init__(
        self,
        target: str | None = None,
        *,
        channel: grpc.aio.Channel | None = None,
        timeout: float | None = 60.0,
        max_message_bytes: int = 256 * 1024 * 1024,
        metadata: Sequence[tuple[str, str]] = (),
        credentials: grpc.ChannelCredentials | None = None,
        predict_attempts: int | None = None,
        retry_attempts: int = 3,
        token: str | None = None,
        tls: bool | TlsOptions | None = None,
        watch_retry_seconds: float | None = WATCH_RETRY_SECONDS,
    ) -> None:
        token = resolve_token(token)
        if token is not None and any(key.lower() == "authorization" for key, _ in metadata):
            raise ValueError("pass the token once: as token=, or as authorization metadata")
        if credentials is not None and tls not in (None, False):
            raise ValueError("pass credentials= or tls=, not both")
        if retry_attempts < 1 or (predict_attempts is not None and predict_attempts < 1):
            raise ValueError("retry_attempts and predict_attempts must be >= 1 (1: no retries)")
        if watch_retry_seconds is not None and watch_retry_seconds < 0:
            raise ValueError("watch_retry_seconds must be >= 0 (or None: retry for ever)")
        self._retry_attempts = min(retry_attempts, 5)
        self._owns_channel = channel is None
        if channel is None:
            target = resolve_target(target)
            options: list[tuple[str, Any]] = [
                ("grpc.max_send_message_length", max_message_bytes),
                ("grpc.max_receive_message_length", max_message_bytes),
                (
                    "grpc.service_config",
                    service_config(
                        retry_attempts,
                        retry_attempts if predict_attempts is None else predict_attempts,
                    ),
                ),
                ("grpc.per_rpc_retry_buffer_size", min(max_message_bytes, RETRY_BUFFER_BYTES)),
                ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
            ]
            tls_options = None if credentials is not None else resolve_tls(tls)
            if credentials is None and tls_options is not None:
                credentials = tls_options.channel_credentials()
                options += tls_options.channel_options()
            channel = (
                grpc.aio.insecure_channel(target, options=options)
                if credentials is None
                else grpc.aio.secure_channel(target, credentials, options=options)
            )
        self._channel = channel
        self._timeout = timeout
        self._watch_retry_seconds = watch_retry_seconds
        self._max_message_bytes = max_message_bytes
        self._metadata: tuple[tuple[str, str | bytes], ...] = (
            *tuple(metadata),
            *auth_metadata(token),
        )
        self._datasets = dataset_pb2_grpc.DatasetServiceStub(channel)
        self._training = training_pb2_grpc.TrainingServiceStub(channel)
        self._models = model_pb2_grpc.ModelServiceStub(channel)
        self._inference = inference_pb2_grpc.InferenceServiceStub(channel)
        self._predict_raw: grpc.aio.UnaryUnaryMultiCallable[
            bytes, inference_pb2.PredictResponse
        ] = channel.unary_unary(
            _PREDICT, response_deserializer=inference_pb2.PredictResponse.FromString
        )

    async def close(self) -> None:
        """Close the channel, unless it was passed in (its owner closes it)."""
        if self._owns_channel:
            await self._channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def timeout(self) -> float | None:
        """Seconds each call may take unless it is given its own `timeout=`."""
        return self._timeout

    @property
    def watch_retry_seconds(self) -> float | None:
        """How long following a job retries through an outage before it gives up."""
        return self._watch_retry_seconds

    # -- plumbing ------------------------------------------------------------------

    def _timeout_for(self, timeout: float | None) -> float | None:
        return self._timeout if timeout is None else timeout

    def _check_size(self, size: int) -> None:
        if size > self._max_message_bytes:
            raise ResourceExhaustedError(
                f"request message is {size} bytes, over this client's max_message_bytes of "
                f"{self._max_message_bytes}; send fewer rows per call, or raise "
                "AsyncClient(max_message_bytes=...) and the server's FITSERVE_MAX_MESSAGE_BYTES"
            )

    async def _call(
        self, method: Any, request: Any, timeout: float | None, *, retry: bool = False
    ) -> Any:
        """One unary call, its error translated; `retry`: retried here on UNAVAILABLE and
        RESOURCE_EXHAUSTED after the server's hint, within the one deadline (for calls
        made idempotent by their idempotency key; the others retry by service config)."""
        self._check_size(len(request) if isinstance(request, bytes) else request.ByteSize())
        budget = self._timeout_for(timeout)
        deadline = None if budget is None else time.monotonic() + budget
        attempt = 1
        while True:
            left = None if deadline is None else max(deadline - time.monotonic(), 0.001)
            try:
                return await method(request, timeout=left, metadata=self._metadata)
            except grpc.RpcError as error:
                pause = (
                    retry_pause(error, attempt)
                    if retry and attempt < self._retry_attempts
                    else None
                )
                if pause is None or (deadline is not None and time.monotonic() + pause >= deadline):
                    raise from_rpc_error(error) from error
                attempt += 1
                await asyncio.sleep(pause)

    async def _pages(
        self, fetch: Callable[[str], Any], items: Callable[[Any], Iterable[_Item]]
    ) -> AsyncIterator[_Item]:
        token = ""
        while True:
            response = await fetch(token)
            for item in items(response):
                yield item
            token = response.next_page_token
            if not token:
                return

    # -- datasets ------------------------------------------------------------------

    async def upload_dataset(
        self,
        name: str,
        *,
        x: npt.ArrayLike | None = None,
        y: npt.ArrayLike | None = None,
        sample_weight: npt.ArrayLike | None = None,
        chunk_bytes: int = _DEFAULT_CHUNK_BYTES,
        timeout: float | None = None,
        **arrays: npt.ArrayLike,
    ) -> dataset_pb2.Dataset:
        """`Client.upload_dataset`, awaited."""
        self._check_size(chunk_bytes + _CHUNK_OVERHEAD_BYTES)
        parts = {"x": x, "y": y, "sample_weight": sample_weight, **arrays}
        header, chunks = upload_parts(name, chunk_bytes, parts)
        return await self._upload(header, chunks, timeout)

    async def upload_dataset_file(
        self,
        name: str,
        path: str | os.PathLike[str],
        *,
        chunk_bytes: int = _DEFAULT_CHUNK_BYTES,
        timeout: float | None = None,
    ) -> dataset_pb2.Dataset:
        """`Client.upload_dataset_file`, awaited: streamed from disk, never loaded whole."""
        self._check_size(chunk_bytes + _CHUNK_OVERHEAD_BYTES)
        header = await asyncio.to_thread(file_upload_header, name, path)
        return await self._upload(header, _specs.file_chunks(path, chunk_bytes), timeout)

    async def _upload(
        self, header: dataset_pb2.DatasetHeader, chunks: Iterable[bytes], timeout: float | None
    ) -> dataset_pb2.Dataset:
        requests = _specs.upload_requests(header, chunks)
        try:
            response: dataset_pb2.Dataset = await self._datasets.UploadDataset(
                iter(requests),
                timeout=self._timeout_for(timeout),
                metadata=self._metadata,
            )
        except grpc.RpcError as error:
            raise from_rpc_error(error) from error
        return response

    async def get_dataset(
        self, dataset: str | dataset_pb2.Dataset, *, timeout: float | None = None
    ) -> dataset_pb2.Dataset:
        """`Client.get_dataset`, awaited."""
        request = dataset_pb2.GetDatasetRequest(dataset=dataset_key(dataset))
        result: dataset_pb2.Dataset = await self._call(self._datasets.GetDataset, request, timeout)
        return result

    def list_datasets(
        self, *, page_size: int = 0, timeout: float | None = None
    ) -> AsyncIterator[dataset_pb2.Dataset]:
        """`Client.list_datasets`, as an async iterator."""

        def fetch(token: str) -> Any:
            request = dataset_pb2.ListDatasetsRequest(page_size=page_size, page_token=token)
            return self._call(self._datasets.ListDatasets, request, timeout)

        return self._pages(fetch, lambda response: response.datasets)

    async def delete_dataset(
        self, dataset: str | dataset_pb2.Dataset, *, timeout: float | None = None
    ) -> None:
        """`Client.delete_dataset`, awaited."""
        request = dataset_pb2.DeleteDatasetRequest(dataset=dataset_key(dataset))
        await self._call(self._datasets.DeleteDataset, request, timeout)

    # -- jobs ----------------------------------------------------------------------

    async def train(
        self,
        model_name: str,
        *,
        layers: Sequence[Mapping[str, Any]] | None = None,
        model: str | KerasModel | None = None,
        dataset: DatasetLike,
        initial_epoch: int = 0,
        steps_per_epoch: int = 0,
        timeout: float | None = None,
        **options: Unpack[TrainingOptions],
    ) -> AsyncJob:
        """`Client.train`, awaited: queue a job and return its `AsyncJob` at once."""
        request = train_request(
            model_name, layers, model, dataset, initial_epoch, steps_per_epoch, options
        )
        response = await self._call(
            self._training.Train, request, timeout, retry=bool(request.idempotency_key)
        )
        return AsyncJob(self, response.job)

    async def fine_tune(
        self,
        base_model: str,
        *,
        version: int | None = None,
        alias: str | None = None,
        model_name: str = "",
        train_last_n_layers: int | None = None,
        new_head: int | Mapping[str, Any] | None = None,
        freeze_layers: Sequence[str | int] | None = None,
        head_layers: Sequence[Mapping[str, Any]] | None = None,
        drop_last: int = 0,
        train_base: bool = False,
        unfreeze_top_k: int = 0,
        unfreeze_learning_rate: float = 0.0,
        unfreeze_epochs: int = 0,
        dataset: DatasetLike,
        timeout: float | None = None,
        **options: Unpack[TrainingOptions],
    ) -> AsyncJob:
        """`Client.fine_tune`, awaited: queue the job and return its `AsyncJob` at once."""
        request = fine_tune_request(
            base_model,
            version,
            alias,
            model_name,
            _specs.freeze_options(
                train_last_n_layers=train_last_n_layers,
                new_head=new_head,
                freeze_layers=freeze_layers,
                head_layers=head_layers,
                drop_last=drop_last,
                train_base=train_base,
                unfreeze_top_k=unfreeze_top_k,
                unfreeze_learning_rate=unfreeze_learning_rate,
                unfreeze_epochs=unfreeze_epochs,
            ),
            dataset,
            options,
        )
        response = await self._call(
            self._training.FineTune, request, timeout, retry=bool(request.idempotency_key)
        )
        return AsyncJob(self, response.job)

    async def evaluate(
        self,
        model_name: str,
        *,
        dataset: DatasetLike,
        version: int | None = None,
        alias: str | None = None,
        batch_size: int = 32,
        queue: str = "",
        labels: Mapping[str, str] | None = None,
        time_limit_seconds: int | None = None,
        timeout: float | None = None,
    ) -> AsyncJob:
        """`Client.evaluate`, awaited: queue the job and return its `AsyncJob` at once."""
        request = evaluate_request(
            model_name, dataset, version, alias, batch_size, queue, labels, time_limit_seconds
        )
        response = await self._call(self._training.Evaluate, request, timeout)
        return AsyncJob(self, response.job)

    async def get_job(self, job_id: str, *, timeout: float | None = None) -> AsyncJob:
        """A handle on an existing job."""
        return AsyncJob(self, await self.job_record(job_id, timeout=timeout))

    async def job_record(self, job_id: str, *, timeout: float | None = None) -> training_pb2.Job:
        """The job's record as the server has it now."""
        request = training_pb2.GetJobRequest(job_id=job_id)
        result: training_pb2.Job = await self._call(self._training.GetJob, request, timeout)
        return result

    def watch_job(
        self, job_id: str, after_event_id: str = "", *, timeout: float | None = None
    ) -> grpc.aio.UnaryStreamCall[training_pb2.WatchJobRequest, training_pb2.JobEvent]:
        """The raw WatchJob stream (errors untranslated); `AsyncJob.events()` adds
        resuming, retries and translated errors."""
        request = training_pb2.WatchJobRequest(job_id=job_id, after_event_id=after_event_id)
        return self._training.WatchJob(
            request, timeout=self._timeout_for(timeout), metadata=self._metadata
        )

    def list_jobs(
        self,
        state: JobState | str | int | None = None,
        model_name: str = "",
        kind: str | int | None = None,
        *,
        view: str | int | None = None,
        page_size: int = 0,
        timeout: float | None = None,
    ) -> AsyncIterator[training_pb2.Job]:
        """`Client.list_jobs`, as an async iterator; bad filters raise ValueError here."""
        list_jobs_request(state, model_name, kind, view, page_size, "")  # fail early

        def fetch(token: str) -> Any:
            request = list_jobs_request(state, model_name, kind, view, page_size, token)
            return self._call(self._training.ListJobs, request, timeout)

        return self._pages(fetch, lambda response: response.jobs)

    async def cancel_job(self, job_id: str, *, timeout: float | None = None) -> training_pb2.Job:
        """Ask a job to stop; a finished job raises `FailedPreconditionError`."""
        request = training_pb2.CancelJobRequest(job_id=job_id)
        result: training_pb2.Job = await self._call(self._training.CancelJob, request, timeout)
        return result

    async def list_artifacts(
        self, job_id: str, *, timeout: float | None = None
    ) -> list[training_pb2.JobArtifact]:
        """`Client.list_artifacts`, awaited."""
        request = training_pb2.ListJobArtifactsRequest(job_id=job_id)
        response = await self._call(self._training.ListJobArtifacts, request, timeout)
        return list(response.artifacts)

    async def download_artifact(
        self,
        job_id: str,
        path: str,
        destination: str | os.PathLike[str] | None = None,
        *,
        timeout: float | None = None,
    ) -> bytes | pathlib.Path:
        """`Client.download_artifact`, awaited: the bytes, or written to `destination`
        chunk by chunk (a partly written file is removed when the download fails)."""
        request = training_pb2.DownloadJobArtifactRequest(job_id=job_id, path=path)
        chunks = self._training.DownloadJobArtifact(
            request, timeout=self._timeout_for(timeout), metadata=self._metadata
        )
        try:
            if destination is None:
                return b"".join([chunk.data async for chunk in chunks])
            target = artifact_target(path, destination)
            partial = target.with_name(target.name + ".part")
            try:
                with partial.open("wb") as file:
                    async for chunk in chunks:
                        file.write(chunk.data)
                partial.replace(target)
            finally:
                partial.unlink(missing_ok=True)
            return target
        except grpc.RpcError as error:
            raise from_rpc_error(error) from error

    async def list_plugins(
        self, kind: str | None = None, *, timeout: float | None = None
    ) -> training_pb2.ListPluginsResponse:
        """`Client.list_plugins`, awaited."""
        request = training_pb2.ListPluginsRequest(kind=kind or "")
        result: training_pb2.ListPluginsResponse = await self._call(
            self._training.ListPlugins, request, timeout
        )
        return result

    # -- inference and models --------------------------------------------------------

    async def predict(
        self,
        model_name: str,
        x: npt.ArrayLike | None = None,
        *,
        version: int | None = None,
        alias: str | None = None,
        inputs: Mapping[str, npt.ArrayLike] | None = None,
        timeout: float | None = None,
    ) -> npt.NDArray[Any] | dict[str, npt.NDArray[Any]]:
        """`Client.predict`, awaited."""
        full = await self.predict_full(
            model_name, x, version=version, alias=alias, inputs=inputs, timeout=timeout
        )
        return first_output(full.outputs)

    async def predict_full(
        self,
        model_name: str,
        x: npt.ArrayLike | None = None,
        *,
        version: int | None = None,
        alias: str | None = None,
        inputs: Mapping[str, npt.ArrayLike] | None = None,
        output_filter: Sequence[str] = (),
        timeout: float | None = None,
    ) -> Prediction:
        """`Client.predict_full`, awaited."""
        raw = predict_request(model_name, x, version, alias, inputs, output_filter)
        return prediction(await self._call(self._predict_raw, raw, timeout))

    async def feedback(
        self,
        request_id: str,
        labels: npt.ArrayLike,
        *,
        output: str = "",
        timeout: float | None = None,
    ) -> inference_pb2.FeedbackResponse:
        """`Client.feedback`, awaited."""
        request = feedback_request(request_id, labels, output)
        result: inference_pb2.FeedbackResponse = await self._call(
            self._inference.Feedback, request, timeout
        )
        return result

    def list_models(
        self, *, page_size: int = 0, timeout: float | None = None
    ) -> AsyncIterator[model_pb2.ModelSummary]:
        """`Client.list_models`, as an async iterator."""

        def fetch(token: str) -> Any:
            request = model_pb2.ListModelsRequest(page_size=page_size, page_token=token)
            return self._call(self._models.ListModels, request, timeout)

        return self._pages(fetch, lambda response: response.models)

    async def get_model(self, name: str, *, timeout: float | None = None) -> model_pb2.Model:
        """`Client.get_model`, awaited."""
        request = model_pb2.GetModelRequest(name=name)
        result: model_pb2.Model = await self._call(self._models.GetModel, request, timeout)
        return result

    async def set_alias(
        self, model_name: str, alias: str, version: int, *, timeout: float | None = None
    ) -> model_pb2.SetAliasResponse:
        """`Client.set_alias`, awaited."""
        request = model_pb2.SetAliasRequest(model_name=model_name, alias=alias, version=version)
        result: model_pb2.SetAliasResponse = await self._call(
            self._models.SetAlias, request, timeout
        )
        return result

    async def delete_alias(
        self, model_name: str, alias: str, *, timeout: float | None = None
    ) -> None:
        """`Client.delete_alias`, awaited."""
        request = model_pb2.DeleteAliasRequest(model_name=model_name, alias=alias)
        await self._call(self._models.DeleteAlias, request, timeout)

    async def delete_version(
        self, model_name: str, version: int, *, timeout: float | None = None
    ) -> None:
        """`Client.delete_version`, awaited."""
        request = model_pb2.DeleteVersionRequest(model_name=model_name, version=version)
        await self._call(self._models.DeleteVersion, request, timeout)

    async def model_status(
        self, model_name: str, version: int = 0, *, timeout: float | None = None
    ) -> inference_pb2.GetModelStatusResponse:
        """`Client.model_status`, awaited."""
        request = inference_pb2.GetModelStatusRequest(model_name=model_name, version=version)
        result: inference_pb2.GetModelStatusResponse = await self._call(
            self._inference.GetModelStatus, request, timeout
        )
        return result


class AsyncJob(JobRecord):
    """`fitserve.Job` for asyncio: `await job.wait()`, `async for event in job.events()`;
    `state`, `history`, `epochs` and `plot()` as `Job`'s."""

    def __init__(self, client: AsyncClient, info: training_pb2.Job) -> None:
        super().__init__(info)
        self._client = client

    async def refresh(self, *, timeout: float | None = None) -> training_pb2.Job:
        """Fetch the job record again, and return it."""
        self._info = await self._client.job_record(self.id, timeout=timeout)
        return self._info

    async def cancel(self, *, timeout: float | None = None) -> training_pb2.Job:
        """Ask the job to stop; it ends CANCELLED at its next batch end."""
        self._info = await self._client.cancel_job(self.id, timeout=timeout)
        return self._info

    async def events(
        self, after_event_id: str = "", *, timeout: float | None = None
    ) -> AsyncIterator[training_pb2.JobEvent]:
        """`Job.events()`: every event until the job ends, outages ridden out the same way
        (resumed from the last event seen)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        outage = self._outage(deadline)
        async for event in self._follow(after_event_id, deadline, outage):
            yield event

    async def wait(
        self, timeout: float | None = None, *, verbose: Verbose = "auto"
    ) -> training_pb2.Job:
        """`Job.wait()`, awaited: the final record, the same progress bar on stdout, the
        same errors (`JobFailedError`, `JobCancelledError`, `TimeoutError`)."""
        level = resolve_verbose(verbose, sys.stdout)
        deadline = None if timeout is None else time.monotonic() + timeout
        bar = ProgressBar(level, epochs=total_epochs(self._info.request_json))
        outage = self._outage(deadline)
        try:
            while True:
                saw_events = False
                async for event in self._follow(self._last_event_id, deadline, outage):
                    saw_events = True
                    bar.update(event)
                    if _is_terminal_event(event):
                        break
                info = await self._refreshed(deadline, outage)
                if info.state in (
                    training_pb2.JOB_STATE_SUCCEEDED,
                    training_pb2.JOB_STATE_FAILED,
                    training_pb2.JOB_STATE_CANCELLED,
                ):
                    return _outcome(info)
                if not saw_events:
                    await asyncio.sleep(0.2)
        except DeadlineExceededError as error:
            if deadline is None or time.monotonic() < deadline:
                raise
            raise TimeoutError(self._timeout_message()) from error
        finally:
            bar.close()

    async def _refreshed(self, deadline: float | None, outage: _Outage) -> training_pb2.Job:
        while True:
            try:
                info = await self.refresh(timeout=self._call_timeout(deadline))
            except FitserveError as error:
                await asyncio.sleep(outage.next_pause(error.__cause__, error))
                continue
            outage.ended()
            return info

    async def _follow(
        self, after_event_id: str, deadline: float | None, outage: _Outage
    ) -> AsyncIterator[training_pb2.JobEvent]:
        while True:
            call = self._client.watch_job(
                self.id, after_event_id, timeout=self._call_timeout(deadline)
            )
            try:
                async for event in call:
                    after_event_id = self._last_event_id = event.event_id
                    outage.ended()
                    yield event
                return
            except grpc.RpcError as error:
                self._call_timeout(deadline)  # TimeoutError once the deadline has passed
                if _status_code(error) == grpc.StatusCode.DEADLINE_EXCEEDED:
                    continue
                await asyncio.sleep(outage.next_pause(error, from_rpc_error(error)))
            finally:
                call.cancel()

    def _outage(self, deadline: float | None) -> _Outage:
        return _Outage(self._client.watch_retry_seconds, deadline, self._timeout_message)

    def _call_timeout(self, deadline: float | None) -> float | None:
        default = self._client.timeout
        if deadline is None:
            return default
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(self._timeout_message())
        return remaining if default is None else min(default, remaining)
