"""`Client`, one connection to a fitserve server: datasets, jobs, models, predictions."""

from __future__ import annotations

import contextlib
import hashlib
import os
import pathlib
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self, TypeVar, Unpack

import grpc
import numpy.typing as npt

from fitserve import _specs
from fitserve._calls import retry_pause, service_config
from fitserve._credentials import (
    TlsOptions,
    auth_metadata,
    resolve_target,
    resolve_tls,
    resolve_token,
)
from fitserve._errors import ResourceExhaustedError, from_rpc_error
from fitserve._job import WATCH_RETRY_SECONDS, Job, JobEventStream
from fitserve._options import TrainingOptions, request_fields
from fitserve._specs import DatasetLike, KerasModel
from fitserve._states import JobState
from fitserve._tensors import to_numpy, to_tensor
from fitserve.v1 import (
    dataset_pb2,
    dataset_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
    model_pb2,
    model_pb2_grpc,
    tensor_pb2,
    training_pb2,
    training_pb2_grpc,
)

__all__ = ["Client", "Prediction"]

_Request = TypeVar("_Request")
_Response = TypeVar("_Response")
_Item = TypeVar("_Item")

JobKind = training_pb2.JobKind
JobView = training_pb2.JobView

_DEFAULT_CHUNK_BYTES = 1024 * 1024
_PREDICT = "/fitserve.v1.InferenceService/Predict"
_CHUNK_OVERHEAD_BYTES = 16  # an UploadDatasetRequest's framing around its chunk


@dataclass(frozen=True)
class Prediction:
    """Everything a Predict call answered; keep `request_id` to send `feedback` later."""

    outputs: dict[str, npt.NDArray[Any]]
    model_name: str
    version: int
    request_id: str


@contextlib.contextmanager
def _translated_errors() -> Iterator[None]:
    try:
        yield
    except grpc.RpcError as error:
        raise from_rpc_error(error) from error


RETRY_BUFFER_BYTES = 16 * 1024 * 1024  # larger Predict requests are not retried
# gRPC waits ever longer between attempts to reconnect to a server that went away (1 s,
# 1.6 s, ... up to 120 s), failing calls fast meanwhile: capped here, a server that is back
# is found within 5 s, whatever the outage lasted.
MAX_RECONNECT_BACKOFF_MS = 5000


def _open_channel(
    target: str,
    max_message_bytes: int,
    credentials: grpc.ChannelCredentials | None,
    service_config: str,
    tls: TlsOptions | None = None,
) -> grpc.Channel:
    options: list[tuple[str, Any]] = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.service_config", service_config),
        # gRPC keeps a request for retrying only up to this size (its default: 256 KiB)
        ("grpc.per_rpc_retry_buffer_size", min(max_message_bytes, RETRY_BUFFER_BYTES)),
        ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
    ]
    if credentials is None and tls is not None:
        credentials = tls.channel_credentials()
        options += tls.channel_options()
    if credentials is None:
        return grpc.insecure_channel(target, options=options)
    return grpc.secure_channel(target, credentials, options=options)


def _paginate(fetch: Callable[[str], tuple[Iterable[_Item], str]]) -> Iterator[_Item]:
    token = ""
    while True:
        items, token = fetch(token)
        yield from items
        if not token:
            return


class Client:
    """A connection to a fitserve server: datasets, training jobs, models, predictions.

    Every call has a deadline (`timeout` seconds, per client, overridable per call with
    `timeout=`), so a lost server fails fast instead of hanging. Failed calls raise
    `fitserve.FitserveError` subclasses carrying the server's message. Thread-safe.
    """

    def __init__(
        self,
        target: str | None = None,
        *,
        channel: grpc.Channel | None = None,
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
        """Connect to `target` (None: `FITSERVE_TARGET`, else localhost:50051), or use
        `channel` as given (the caller then closes it).

        `token` goes with every call as `authorization: Bearer <token>` (None: from
        `FITSERVE_TOKEN`; "": none). `tls`: False for plaintext, True for TLS trusting the
        system's root certificates, or `fitserve.TlsOptions(ca=..., cert=..., key=...,
        server_name=...)` for a private CA and client certificates (mutual TLS); None
        (the default) reads `FITSERVE_TLS_CA`, `FITSERVE_TLS_CERT`, `FITSERVE_TLS_KEY` (file
        paths) and `FITSERVE_TLS=1` (system roots), plaintext when none is set. Arguments
        win over the environment. `metadata` goes with every call too; `credentials` (any
        `grpc.ChannelCredentials`) replaces `tls`. A request
        over `max_message_bytes` fails here, before sending, with `ResourceExhaustedError`
        (with `channel`, pass the limit that channel was made with).

        Idempotent calls (reads, Predict, SetAlias; Train and FineTune only with an
        `idempotency_key`) refused as RESOURCE_EXHAUSTED (queue full, server shedding
        load) or UNAVAILABLE (server unreachable) are tried up to `retry_attempts` times
        in all (at most 5; Predict: `predict_attempts`, default the same), after the
        server's retry hint or an exponential backoff, within the call's timeout (1:
        never retried; requests over 16 MiB are not retried; with `channel`, that
        channel's own service config decides, and only Train and FineTune are retried
        by the SDK). Nothing else is ever retried.
        Following a job (`Job.events()`, `Job.wait()`) rides out an outage of up to
        `watch_retry_seconds` (None: for ever), resuming from the last event seen.
        """
        token = resolve_token(token)
        if token is not None and any(key.lower() == "authorization" for key, _ in metadata):
            raise ValueError("pass the token once: as token=, or as authorization metadata")
        if credentials is not None and tls not in (None, False):
            raise ValueError("pass credentials= or tls=, not both")
        if retry_attempts < 1 or (predict_attempts is not None and predict_attempts < 1):
            raise ValueError("retry_attempts and predict_attempts must be >= 1 (1: no retries)")
        self._retry_attempts = min(retry_attempts, 5)
        self._owns_channel = channel is None
        if channel is None:
            tls_options = None if credentials is not None else resolve_tls(tls)
            config = service_config(
                retry_attempts, retry_attempts if predict_attempts is None else predict_attempts
            )
            channel = _open_channel(
                resolve_target(target), max_message_bytes, credentials, config, tls_options
            )
        self._channel = channel
        self._timeout = timeout
        if watch_retry_seconds is not None and watch_retry_seconds < 0:
            raise ValueError("watch_retry_seconds must be >= 0 (or None: retry for ever)")
        self._watch_retry_seconds = watch_retry_seconds
        self._max_message_bytes = max_message_bytes
        # Per-call metadata, not call credentials: gRPC refuses those on plaintext channels.
        self._metadata: tuple[tuple[str, str | bytes], ...] = (
            *tuple(metadata),
            *auth_metadata(token),
        )
        self._datasets = dataset_pb2_grpc.DatasetServiceStub(self._channel)
        self._training = training_pb2_grpc.TrainingServiceStub(self._channel)
        self._models = model_pb2_grpc.ModelServiceStub(self._channel)
        self._inference = inference_pb2_grpc.InferenceServiceStub(self._channel)
        # Predict takes bytes serialized here, so a large request is sized without being
        # serialized twice.
        self._predict_raw: grpc.UnaryUnaryMultiCallable[bytes, inference_pb2.PredictResponse] = (
            self._channel.unary_unary(
                _PREDICT, response_deserializer=inference_pb2.PredictResponse.FromString
            )
        )

    def close(self) -> None:
        """Close the channel, unless it was passed in (its owner closes it)."""
        if self._owns_channel:
            self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

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

    def _call(
        self,
        method: grpc.UnaryUnaryMultiCallable[_Request, _Response],
        request: _Request,
        timeout: float | None,
    ) -> _Response:
        if not isinstance(request, bytes):
            self._check_size(_byte_size(request))
        with _translated_errors():
            return method(request, timeout=self._timeout_for(timeout), metadata=self._metadata)

    def _call_retried(
        self,
        method: grpc.UnaryUnaryMultiCallable[_Request, _Response],
        request: _Request,
        timeout: float | None,
        retry: bool,
    ) -> _Response:
        """`_call`, retried here (not by gRPC's policy) when `retry`: for calls that are
        idempotent only when they carry an idempotency key. The attempts share the one
        deadline."""
        if not retry:
            return self._call(method, request, timeout)
        self._check_size(_byte_size(request))
        budget = self._timeout_for(timeout)
        deadline = None if budget is None else time.monotonic() + budget
        attempt = 1
        while True:
            left = None if deadline is None else max(deadline - time.monotonic(), 0.001)
            try:
                return method(request, timeout=left, metadata=self._metadata)
            except grpc.RpcError as error:
                pause = retry_pause(error, attempt) if attempt < self._retry_attempts else None
                if pause is None or (deadline is not None and time.monotonic() + pause >= deadline):
                    raise from_rpc_error(error) from error
                attempt += 1
                time.sleep(pause)

    def _check_size(self, size: int) -> None:
        """Refuse a request gRPC would refuse, with a message that says which setting."""
        if size > self._max_message_bytes:
            raise ResourceExhaustedError(
                f"request message is {size} bytes, over this client's max_message_bytes of "
                f"{self._max_message_bytes}; send fewer rows per call, or raise "
                "Client(max_message_bytes=...) and the server's FITSERVE_MAX_MESSAGE_BYTES"
            )

    # -- datasets ------------------------------------------------------------------

    def upload_dataset(
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
        """Upload arrays as an .npz dataset named `name`; returns it with its id.

        The content goes in messages of `chunk_bytes`, which must fit `max_message_bytes`.

        Use `x`/`y`/`sample_weight` for a single-input model, or any named arrays (e.g.
        `image=..., text=..., y=...`) for a multi-input one. Identical content is stored
        once, so re-uploading the same arrays is cheap for the server.
        """
        self._check_size(chunk_bytes + _CHUNK_OVERHEAD_BYTES)
        parts = {"x": x, "y": y, "sample_weight": sample_weight, **arrays}
        header, chunks = upload_parts(name, chunk_bytes, parts)
        return self._upload(header, chunks, timeout)

    def upload_dataset_file(
        self,
        name: str,
        path: str | os.PathLike[str],
        *,
        chunk_bytes: int = _DEFAULT_CHUNK_BYTES,
        timeout: float | None = None,
    ) -> dataset_pb2.Dataset:
        """Upload an existing .npz file, streamed from disk (never loaded whole)."""
        self._check_size(chunk_bytes + _CHUNK_OVERHEAD_BYTES)
        header = file_upload_header(name, path)
        return self._upload(header, _specs.file_chunks(path, chunk_bytes), timeout)

    def _upload(
        self, header: dataset_pb2.DatasetHeader, chunks: Iterable[bytes], timeout: float | None
    ) -> dataset_pb2.Dataset:
        requests = _specs.upload_requests(header, chunks)
        with _translated_errors():
            return self._datasets.UploadDataset(
                requests, timeout=self._timeout_for(timeout), metadata=self._metadata
            )

    def get_dataset(
        self, dataset: str | dataset_pb2.Dataset, *, timeout: float | None = None
    ) -> dataset_pb2.Dataset:
        """A dataset by id ("sha256:...") or name."""
        request = dataset_pb2.GetDatasetRequest(dataset=_dataset_key(dataset))
        return self._call(self._datasets.GetDataset, request, timeout)

    def list_datasets(
        self, *, page_size: int = 0, timeout: float | None = None
    ) -> Iterator[dataset_pb2.Dataset]:
        """Every dataset, newest first; pages are fetched as the iterator advances."""

        def fetch(token: str) -> tuple[Iterable[dataset_pb2.Dataset], str]:
            request = dataset_pb2.ListDatasetsRequest(page_size=page_size, page_token=token)
            response = self._call(self._datasets.ListDatasets, request, timeout)
            return response.datasets, response.next_page_token

        return _paginate(fetch)

    def delete_dataset(
        self, dataset: str | dataset_pb2.Dataset, *, timeout: float | None = None
    ) -> None:
        """Delete a dataset name (an id removes every name pointing at that content)."""
        request = dataset_pb2.DeleteDatasetRequest(dataset=_dataset_key(dataset))
        self._call(self._datasets.DeleteDataset, request, timeout)

    # -- jobs ----------------------------------------------------------------------

    def train(
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
    ) -> Job:
        """Queue a training job and return at once; follow it with `Job.wait()`.

        The arguments mirror Keras' compile and fit (`TrainingOptions` lists them with
        their defaults). The architecture is `layers` (a Sequential model as dicts) or
        `model` (a Keras model, or its `to_json()`), never pickled code: the server
        rebuilds it from an allowlist of Keras classes. Custom losses, metrics, layers and
        callbacks are server-side plugins, named like built-ins (`list_plugins`); a
        Python function or class passed here raises TypeError. Pass an `idempotency_key`
        to make retrying this call safe.
        """
        request = train_request(
            model_name, layers, model, dataset, initial_epoch, steps_per_epoch, options
        )
        response = self._call_retried(
            self._training.Train, request, timeout, retry=bool(request.idempotency_key)
        )
        return Job(self, response.job)

    def fine_tune(
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
    ) -> Job:
        """Queue a job that continues training a stored version on new data.

        One of: keep the architecture and train only the last `train_last_n_layers`;
        freeze exactly `freeze_layers` (names or indices, negative from the end, as
        `for layer in model.layers[:-1]: layer.trainable = False` does); freeze the whole
        base and add `new_head` (a class count, or a dict with num_classes, activation,
        dropout); or put `head_layers` (a layer list) on the base, its last `drop_last`
        layers removed first (0 keeps them all), frozen unless `train_base`. The job's
        events and the version's fitserve.json list the frozen layers. `unfreeze_*`
        adds a second, gentler phase.
        The result is published under `model_name` (default: `base_model`), with lineage.
        Compile and fit options are those of `train` (`TrainingOptions`).
        """
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
        response = self._call_retried(
            self._training.FineTune, request, timeout, retry=bool(request.idempotency_key)
        )
        return Job(self, response.job)

    def evaluate(
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
    ) -> Job:
        """Queue a job that evaluates a stored version; its metrics land on the version.
        `time_limit_seconds` bounds its run on the worker (default: the server's)."""
        request = evaluate_request(
            model_name, dataset, version, alias, batch_size, queue, labels, time_limit_seconds
        )
        return Job(self, self._call(self._training.Evaluate, request, timeout).job)

    def get_job(self, job_id: str, *, timeout: float | None = None) -> Job:
        """A handle on an existing job, e.g. one started by another process."""
        return Job(self, self.job_record(job_id, timeout=timeout))

    def job_record(self, job_id: str, *, timeout: float | None = None) -> training_pb2.Job:
        """The job's record as the server has it now (`get_job` wraps it in a `Job`)."""
        request = training_pb2.GetJobRequest(job_id=job_id)
        return self._call(self._training.GetJob, request, timeout)

    def watch_job(
        self, job_id: str, after_event_id: str = "", *, timeout: float | None = None
    ) -> JobEventStream:
        """The raw WatchJob stream of events after `after_event_id`; cancel it when done.

        Unlike other calls, a failure arrives untranslated, as `grpc.RpcError` while
        iterating; `Job.events()` adds resuming, retries and translated errors on top.
        """
        request = training_pb2.WatchJobRequest(job_id=job_id, after_event_id=after_event_id)
        timeout = self._timeout_for(timeout)
        return self._training.WatchJob(request, timeout=timeout, metadata=self._metadata)

    def list_jobs(
        self,
        state: JobState | str | int | None = None,
        model_name: str = "",
        kind: str | JobKind.ValueType | None = None,
        *,
        view: str | JobView.ValueType | None = None,
        page_size: int = 0,
        timeout: float | None = None,
    ) -> Iterator[training_pb2.Job]:
        """Jobs, newest first; `state` (`fitserve.JobState.RUNNING`, or "RUNNING") and
        `kind` ("train") filter them; an unknown state raises ValueError naming them.
        Each is the wire record: `fitserve.JobState.of(job.state)` gives its state as a
        `JobState` (`get_job(job.id).state` does too).

        Each job comes without its request body (`request_json` empty) unless
        `view="full"`; `get_job(id).info.request_json` has it for one job.
        """

        list_jobs_request(state, model_name, kind, view, page_size, "")  # fail here, not later

        def fetch(token: str) -> tuple[Iterable[training_pb2.Job], str]:
            request = list_jobs_request(state, model_name, kind, view, page_size, token)
            response = self._call(self._training.ListJobs, request, timeout)
            return response.jobs, response.next_page_token

        return _paginate(fetch)

    def cancel_job(self, job_id: str, *, timeout: float | None = None) -> training_pb2.Job:
        """Ask a job to stop; a finished job raises `FailedPreconditionError`."""
        request = training_pb2.CancelJobRequest(job_id=job_id)
        return self._call(self._training.CancelJob, request, timeout)

    # -- job artifacts ---------------------------------------------------------------

    def list_artifacts(
        self, job_id: str, *, timeout: float | None = None
    ) -> list[training_pb2.JobArtifact]:
        """The files a job wrote on its worker (checkpoints, TensorBoard logs,
        history.csv), sorted by path."""
        request = training_pb2.ListJobArtifactsRequest(job_id=job_id)
        return list(self._call(self._training.ListJobArtifacts, request, timeout).artifacts)

    def download_artifact(
        self,
        job_id: str,
        path: str,
        destination: str | os.PathLike[str] | None = None,
        *,
        timeout: float | None = None,
    ) -> bytes | pathlib.Path:
        """One artifact: its bytes, or, given `destination` (a file or a folder), written
        there chunk by chunk (never whole in memory) and its path returned. A partly
        written file is removed when the download fails."""
        request = training_pb2.DownloadJobArtifactRequest(job_id=job_id, path=path)
        chunks = self._training.DownloadJobArtifact(
            request, timeout=self._timeout_for(timeout), metadata=self._metadata
        )
        if destination is None:
            with _translated_errors():
                return b"".join(chunk.data for chunk in chunks)
        target = artifact_target(path, destination)
        partial = target.with_name(target.name + ".part")
        try:
            with _translated_errors(), partial.open("wb") as file:
                for chunk in chunks:
                    file.write(chunk.data)
            partial.replace(target)
        finally:
            partial.unlink(missing_ok=True)
        return target

    # -- plugins -------------------------------------------------------------------

    def list_plugins(
        self, kind: str | None = None, *, timeout: float | None = None
    ) -> training_pb2.ListPluginsResponse:
        """The server-side plugins requests may name, and the plugin sources that failed
        to load on the server that answers.

        `kind` ("loss", "metric", "layer" or "callback"; None: all) filters them; an
        unknown kind raises `InvalidArgumentError`. Each plugin has its registered name
        (`loss="examples>huber"` or `fitserve.plugin("examples>huber", delta=2.0)`), its
        form, its parameters and signature, and what provides it.
        """
        request = training_pb2.ListPluginsRequest(kind=kind or "")
        return self._call(self._training.ListPlugins, request, timeout)

    # -- inference -----------------------------------------------------------------

    def predict(
        self,
        model_name: str,
        x: npt.ArrayLike | None = None,
        *,
        version: int | None = None,
        alias: str | None = None,
        inputs: Mapping[str, npt.ArrayLike] | None = None,
        timeout: float | None = None,
    ) -> npt.NDArray[Any] | dict[str, npt.NDArray[Any]]:
        """Run a model on `x` (single input) or `inputs` (by name), like Keras' predict.

        Returns the output array when the model has one output, else a dict by output
        name. Without version or alias, the `stable` alias answers, else the latest.
        """
        outputs = self.predict_full(
            model_name, x, version=version, alias=alias, inputs=inputs, timeout=timeout
        ).outputs
        return first_output(outputs)

    def predict_full(
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
        """Like `predict`, but also returns the version that answered and the request id."""
        raw = predict_request(model_name, x, version, alias, inputs, output_filter)
        self._check_size(len(raw))
        return prediction(self._call(self._predict_raw, raw, timeout))

    def feedback(
        self,
        request_id: str,
        labels: npt.ArrayLike,
        *,
        output: str = "",
        timeout: float | None = None,
    ) -> inference_pb2.FeedbackResponse:
        """Report the true labels of an earlier prediction, for live accuracy per version;
        a model with several outputs needs `output`, the one the labels are for."""
        request = feedback_request(request_id, labels, output)
        return self._call(self._inference.Feedback, request, timeout)

    def model_status(
        self, model_name: str, version: int = 0, *, timeout: float | None = None
    ) -> inference_pb2.GetModelStatusResponse:
        """Load state of a model's versions on the server that answers (0: all versions)."""
        request = inference_pb2.GetModelStatusRequest(model_name=model_name, version=version)
        return self._call(self._inference.GetModelStatus, request, timeout)

    # -- models --------------------------------------------------------------------

    def list_models(
        self, *, page_size: int = 0, timeout: float | None = None
    ) -> Iterator[model_pb2.ModelSummary]:
        """Every model, by name; pages are fetched as the iterator advances."""

        def fetch(token: str) -> tuple[Iterable[model_pb2.ModelSummary], str]:
            request = model_pb2.ListModelsRequest(page_size=page_size, page_token=token)
            response = self._call(self._models.ListModels, request, timeout)
            return response.models, response.next_page_token

        return _paginate(fetch)

    def get_model(self, name: str, *, timeout: float | None = None) -> model_pb2.Model:
        """A model with its versions (newest first), metrics, lineage and aliases."""
        return self._call(self._models.GetModel, model_pb2.GetModelRequest(name=name), timeout)

    def set_alias(
        self, model_name: str, alias: str, version: int, *, timeout: float | None = None
    ) -> model_pb2.SetAliasResponse:
        """Point `alias` at `version`; servers switch at once (e.g. promote to "stable")."""
        request = model_pb2.SetAliasRequest(model_name=model_name, alias=alias, version=version)
        return self._call(self._models.SetAlias, request, timeout)

    def delete_alias(self, model_name: str, alias: str, *, timeout: float | None = None) -> None:
        """Remove an alias; the version it pointed at stays."""
        request = model_pb2.DeleteAliasRequest(model_name=model_name, alias=alias)
        self._call(self._models.DeleteAlias, request, timeout)

    def delete_version(
        self, model_name: str, version: int, *, timeout: float | None = None
    ) -> None:
        """Delete a version; one that an alias points at raises FailedPreconditionError."""
        request = model_pb2.DeleteVersionRequest(model_name=model_name, version=version)
        self._call(self._models.DeleteVersion, request, timeout)


def _byte_size(request: object) -> int:
    size: int = request.ByteSize()  # type: ignore[attr-defined]  # every request is a Message
    return size


def _dataset_key(dataset: str | dataset_pb2.Dataset) -> str:
    return dataset.id if isinstance(dataset, dataset_pb2.Dataset) else dataset


def _input_tensors(
    x: npt.ArrayLike | None, inputs: Mapping[str, npt.ArrayLike] | None
) -> dict[str, tensor_pb2.Tensor]:
    if inputs is not None:
        if x is not None:
            raise ValueError("pass x (a single input) or inputs= (by name), not both")
        return {name: to_tensor(value) for name, value in inputs.items()}
    if x is None:
        raise ValueError("nothing to predict on: pass x (a single input) or inputs= (by name)")
    # The server maps the key "" to a single-input model's only input.
    return {"": to_tensor(x)}


def _enum_value(enum_type: Any, prefix: str, value: str | int | None) -> int:
    if value is None:
        return 0
    if not isinstance(value, str):
        return int(value)
    name = prefix + value.upper().removeprefix(prefix)
    try:
        return int(enum_type.Value(name))
    except ValueError:
        known = enum_type.keys()
        names = [n.removeprefix(prefix) for n in known if not n.endswith("UNSPECIFIED")]
        raise ValueError(f"unknown value {value!r}; expected one of {', '.join(names)}") from None


# -- what Client and AsyncClient share: requests built and responses converted once ------


def train_request(
    model_name: str,
    layers: Sequence[Mapping[str, Any]] | None,
    model: str | KerasModel | None,
    dataset: DatasetLike,
    initial_epoch: int,
    steps_per_epoch: int,
    options: Mapping[str, Any],
) -> training_pb2.TrainRequest:
    """The TrainRequest of `train(...)`; bad arguments raise here, before any call."""
    fields = request_fields(
        "train", options, initial_epoch=initial_epoch, steps_per_epoch=steps_per_epoch
    )
    return training_pb2.TrainRequest(
        model_name=model_name,
        model=_specs.model_spec(layers, model),
        dataset=_specs.dataset_ref(dataset),
        **fields,
    )


def fine_tune_request(
    base_model: str,
    version: int | None,
    alias: str | None,
    model_name: str,
    freeze: training_pb2.FreezeOptions,
    dataset: DatasetLike,
    options: TrainingOptions,
) -> training_pb2.FineTuneRequest:
    """The FineTune request of `Client.fine_tune` (and `AsyncClient.fine_tune`)."""
    return training_pb2.FineTuneRequest(
        base=_specs.model_ref(base_model, version, alias),
        model_name=model_name,
        freeze=freeze,
        dataset=_specs.dataset_ref(dataset),
        **request_fields("fine_tune", options),
    )


def evaluate_request(
    model_name: str,
    dataset: DatasetLike,
    version: int | None,
    alias: str | None,
    batch_size: int,
    queue: str,
    labels: Mapping[str, str] | None,
    time_limit_seconds: int | None,
) -> training_pb2.EvaluateRequest:
    """The Evaluate request of `Client.evaluate` (and `AsyncClient.evaluate`)."""
    return training_pb2.EvaluateRequest(
        model=_specs.model_ref(model_name, version, alias),
        dataset=_specs.dataset_ref(dataset),
        batch_size=batch_size,
        run=_specs.run_options(
            queue=queue,
            mixed_precision="",
            labels=labels,
            time_limit_seconds=time_limit_seconds,
        ),
    )


def feedback_request(
    request_id: str, labels: npt.ArrayLike, output: str
) -> inference_pb2.FeedbackRequest:
    """The Feedback request of `Client.feedback` (and `AsyncClient.feedback`)."""
    return inference_pb2.FeedbackRequest(
        request_id=request_id, labels=to_tensor(labels), output=output
    )


def artifact_target(path: str, destination: str | os.PathLike[str]) -> pathlib.Path:
    """Where `download_artifact` writes artifact `path`: `destination`, or the file of the
    artifact's name in it when it is a folder."""
    target = pathlib.Path(destination)
    return target / pathlib.PurePosixPath(path).name if target.is_dir() else target


def file_upload_header(name: str, path: str | os.PathLike[str]) -> dataset_pb2.DatasetHeader:
    """The header of an .npz file's upload: its size and digest, read from disk."""
    return _specs.npz_header(
        name, size_bytes=os.path.getsize(path), sha256=_specs.file_sha256(path)
    )


def predict_request(
    model_name: str,
    x: npt.ArrayLike | None,
    version: int | None,
    alias: str | None,
    inputs: Mapping[str, npt.ArrayLike] | None,
    output_filter: Sequence[str] = (),
) -> bytes:
    """A serialized PredictRequest (sized once, sent as is)."""
    request = inference_pb2.PredictRequest(
        model=_specs.model_ref(model_name, version, alias),
        inputs=_input_tensors(x, inputs),
        output_filter=list(output_filter),
    )
    return request.SerializeToString()


def prediction(response: inference_pb2.PredictResponse) -> Prediction:
    """A PredictResponse as numpy arrays."""
    return Prediction(
        outputs={name: to_numpy(tensor) for name, tensor in response.outputs.items()},
        model_name=response.model_name,
        version=response.version,
        request_id=response.request_id,
    )


def first_output(
    outputs: dict[str, npt.NDArray[Any]],
) -> npt.NDArray[Any] | dict[str, npt.NDArray[Any]]:
    """What `predict` returns: the one output's array, or the dict of several."""
    return next(iter(outputs.values())) if len(outputs) == 1 else outputs


def list_jobs_request(
    state: JobState | str | int | None,
    model_name: str,
    kind: str | int | None,
    view: str | int | None,
    page_size: int,
    token: str,
) -> training_pb2.ListJobsRequest:
    """One page's ListJobsRequest; an unknown state, kind or view raises ValueError."""
    state_value = JobState.UNSPECIFIED if state is None else JobState.of(state)
    return training_pb2.ListJobsRequest(
        state=state_value.number,
        kind=JobKind.ValueType(_enum_value(JobKind, "JOB_KIND_", kind)),
        model_name=model_name,
        page_size=page_size,
        page_token=token,
        view=JobView.ValueType(_enum_value(JobView, "JOB_VIEW_", view)),
    )


def upload_parts(
    name: str, chunk_bytes: int, arrays: Mapping[str, npt.ArrayLike | None]
) -> tuple[dataset_pb2.DatasetHeader, Iterator[bytes]]:
    """The header and content chunks of `upload_dataset(name, x=..., y=..., ...)`."""
    content = _specs.npz_bytes(arrays)
    header = _specs.npz_header(
        name, size_bytes=len(content), sha256=hashlib.sha256(content).hexdigest()
    )
    return header, _specs.memory_chunks(content, chunk_bytes)


def dataset_key(dataset: str | dataset_pb2.Dataset) -> str:
    """A dataset's id, or the name given."""
    return _dataset_key(dataset)
