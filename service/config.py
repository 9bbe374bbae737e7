"""Settings: one object, read from FITSERVE_* environment variables, passed down explicitly."""

from __future__ import annotations

import json
import ssl
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.domain.datasets.sources import DEFAULT_URL_SCHEMES

Role = Literal["api", "inference"]


class BatchingOverride(BaseModel):
    """Per-model batcher knobs; an unset field falls back to the server-wide default."""

    max_batch_size: int | None = Field(None, ge=1)
    batch_timeout_ms: float | None = Field(None, ge=0)
    max_queue: int | None = Field(None, ge=1)
    allowed_batch_sizes: list[int] | None = None
    batch_threads: int | None = Field(None, ge=1)
    latency_target_ms: float | None = Field(None, gt=0)


class BatchingSettings(BaseModel):
    """Server-wide defaults of the Predict batcher, and per-model overrides."""

    max_batch_size: int = Field(64, ge=1, description="Most rows one model call takes.")
    batch_timeout_ms: float = Field(
        5.0,
        ge=0,
        description="Longest a queued request waits for others to join its batch. Only "
        "spent when more requests are known to be coming: calls the server holds that have "
        "not reached the batcher yet (see service.inference.batcher); a lone request on an "
        "idle model never waits.",
    )
    max_queue: int = Field(
        1024, ge=1, description="Queued requests per version before RESOURCE_EXHAUSTED."
    )
    allowed_batch_sizes: list[int] = Field(
        default_factory=list,
        description="Sizes batches are padded up to, ascending, the last equal to "
        "max_batch_size (as in TF Serving); empty: no padding.",
    )
    batch_threads: int = Field(
        1, ge=1, description="Threads running batches of one version in parallel."
    )
    latency_target_ms: float | None = Field(
        None,
        gt=0,
        description="Hold the p99 of the time requests spend in the batcher (queued, "
        "waiting for the batch, computed) under this many ms, batching as much as that "
        "allows: the batch timeout adapts (starting at batch_timeout_ms, at most half the "
        "target; see service.inference.latency). Unset: the fixed batch_timeout_ms.",
    )
    models: dict[str, BatchingOverride] = Field(
        default_factory=dict,
        description="Per-model overrides, e.g. "
        'FITSERVE_BATCHING__MODELS=\'{"mnist": {"max_batch_size": 8}}\'.',
    )

    @model_validator(mode="after")
    def _check_allowed_sizes(self) -> BatchingSettings:
        for name in [None, *self.models]:
            self.for_model(name or "")
        return self

    def for_model(self, name: str) -> BatchingSettings:
        """The knobs of one model: its overrides over the defaults, checked."""
        override = self.models.get(name)
        merged = self.model_copy(update=override.model_dump(exclude_none=True) if override else {})
        sizes = merged.allowed_batch_sizes
        if sizes and (sizes != sorted(set(sizes)) or sizes[-1] != merged.max_batch_size):
            raise ValueError(
                f"allowed_batch_sizes {sizes} must ascend and end at max_batch_size "
                f"{merged.max_batch_size}"
            )
        return merged


class InferenceSettings(BaseModel):
    """The inference role: preloading, version cache, hot reload and feedback."""

    preload_models: list[str] = Field(
        default_factory=list,
        description="Models whose default version (stable, else latest) loads at start; "
        "the inference services report NOT_SERVING until all have loaded. Empty: SERVING "
        "at once.",
    )
    max_loaded_versions: int = Field(8, ge=1, description="Versions kept in memory (LRU).")
    max_loaded_bytes: int = Field(
        8 * 1024**3, ge=1, description="Variable bytes of loaded versions kept (LRU)."
    )
    warmup_calls: int = Field(
        2, ge=0, description="Calls at each allowed batch size before a version takes traffic."
    )
    reload_poll_seconds: float = Field(
        5.0,
        gt=0,
        description="How often the store is polled for new versions and aliases, as a "
        "fallback to the Redis pub/sub events that normally switch at once.",
    )
    load_failure_seconds: float = Field(
        30.0,
        ge=0,
        description="How long a version that failed to load (corrupt files: DATA_LOSS; "
        "failing its warm-up: FAILED_PRECONDITION) answers that failure without loading it "
        "again; a version of the model published meanwhile ends the wait at once. 0: every "
        "request tries again.",
    )
    allow_nan_inputs: bool = Field(
        False, description="Accept NaN in float inputs (rejected as INVALID_ARGUMENT by default)."
    )
    feedback_ttl_seconds: int = Field(
        24 * 3600, ge=1, description="How long a request id accepts Feedback, on any replica."
    )
    feedback_sample_rate: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="Share of predictions kept in Redis for Feedback (each ~240 bytes for "
        "the TTL: at 1,000 Predicts/s and a day's TTL, ~20 GB). Feedback for one not kept "
        "answers NOT_FOUND saying so; 0: none kept.",
    )
    max_queue_wait_ms: float | None = Field(
        100.0,
        gt=0,
        description="Load shedding: while calls wait longer than this in gRPC's own queue "
        "before a handler takes them, Predict calls are refused with RESOURCE_EXHAUSTED "
        "and a retry hint (see service.api.backlog). Unset: never shed.",
    )


class AuthSettings(BaseModel):
    """Bearer tokens (service.api.auth, docs/security.md)."""

    mode: Literal["auto", "tokens", "none"] = Field(
        "auto",
        description="tokens: every call needs a token. none: no call does (warned at every "
        "start; only behind a gateway that authenticates). auto: tokens are required once "
        "one has been created (also after the last is revoked), and always when the server "
        "binds beyond loopback, where it refuses to start without one. FITSERVE_AUTH=none "
        "sets the mode alone; FITSERVE_AUTH__MODE with the other FITSERVE_AUTH__* settings.",
    )
    refresh_seconds: float = Field(
        2.0,
        gt=0,
        description="How often each server re-reads the tokens from Redis: the longest a "
        "new or revoked token takes to count everywhere.",
    )
    max_queued_jobs: int = Field(
        20,
        ge=1,
        description="Jobs a token may have queued or running at once, unless its own "
        "quota says otherwise (fitserve tokens create --max-queued-jobs).",
    )
    max_dataset_bytes: int = Field(
        20 * 1024**3,
        ge=1,
        description="Bytes of datasets a token may hold, unless its own quota says "
        "otherwise (fitserve tokens create --max-dataset-bytes).",
    )


class JobTimeLimitSettings(BaseModel):
    """How long one job may run on a worker (FITSERVE_JOB_TIME_LIMIT__*).

    The clock starts when a worker starts the job (each delivery attempt anew) and covers
    loading data, building and fitting. When it runs out, the fit (or evaluation) stops at
    the next batch end and the job FAILS with reason TIME_LIMIT; nothing is published.
    """

    default_seconds: int | None = Field(
        24 * 3600,
        ge=1,
        description="The limit of a job whose request sets no run.time_limit_seconds. "
        "Unset (null): max_seconds (no limit when that is unset too).",
    )
    max_seconds: int | None = Field(
        46 * 3600,
        ge=1,
        description="The most a request may ask for in run.time_limit_seconds (more is "
        "INVALID_ARGUMENT naming this). Keep it, plus backstop_grace_seconds, below "
        "FITSERVE_JOB_VISIBILITY_TIMEOUT_SECONDS, or Redis hands a running job to another "
        "worker. Unset (null): no maximum, and no hard backstop.",
    )
    backstop_grace_seconds: int = Field(
        900,
        ge=1,
        description="The worker's hard backstop: a job task still running max_seconds + "
        "this long after it started (a batch or a callback that never returns, so the "
        "fit cannot stop at its limit) has its worker child killed by Celery, and the job "
        "is FAILED with reason TIME_LIMIT.",
    )

    @model_validator(mode="after")
    def _default_within_max(self) -> JobTimeLimitSettings:
        if (
            self.default_seconds is not None
            and self.max_seconds is not None
            and self.default_seconds > self.max_seconds
        ):
            raise ValueError(
                f"default_seconds {self.default_seconds} is over max_seconds {self.max_seconds}"
            )
        return self

    def resolve(self, requested: int | None) -> int | None:
        """The limit of a job that asked for ``requested`` seconds (None: nothing asked);
        the caller checks ``requested`` against ``max_seconds`` first."""
        if requested is not None:
            return requested
        return self.default_seconds if self.default_seconds is not None else self.max_seconds


class TlsFileError(ValueError):
    """A TLS file named by a setting is missing, unreadable or not what it should be."""


class ShutdownSettings(BaseModel):
    """How a server stops on SIGTERM or SIGINT (docs/reliability.md, "SIGTERM to a server")."""

    drain_seconds: float = Field(
        5.0,
        ge=0,
        description="On SIGTERM/SIGINT the server first reports NOT_SERVING on every health "
        "entry, then goes on serving new calls for this long, so load balancers and "
        "health-checking clients move away (FITSERVE_SHUTDOWN__DRAIN_SECONDS); a second "
        "signal ends the wait. `fitserve up`, the tests and the benchmarks, which have no "
        "load balancer, set 0 unless it is given.",
    )
    grace_seconds: float | None = Field(
        None,
        ge=0,
        description="After the drain the server stops accepting calls and gives the unary "
        "calls in flight (and uploads and downloads) this long to finish before they are "
        "cancelled (FITSERVE_SHUTDOWN__GRACE_SECONDS); open WatchJob and health Watch "
        "streams end at once with UNAVAILABLE. Unset: FITSERVE_GRACE_SECONDS (10). Keep "
        "drain + grace below the SIGKILL deadline of what stops the server (`fitserve up` "
        "and `serve --processes N` wait at least 30 s; Kubernetes "
        "terminationGracePeriodSeconds).",
    )


class TlsSettings(BaseModel):
    """TLS of the gRPC port: off unless ``cert_file`` and ``key_file`` are set (then the
    port accepts TLS only); ``client_ca_file`` on top requires client certificates (mTLS).

    Read by the server only (workers never need the files), and checked when it starts:
    a missing, unreadable or invalid file stops it with a message naming the setting.
    """

    cert_file: Path | None = Field(
        None,
        description="PEM certificate chain of the server (FITSERVE_TLS__CERT_FILE), leaf "
        "first; with key_file, the gRPC port serves TLS only.",
    )
    key_file: Path | None = Field(
        None,
        description="PEM private key of cert_file (FITSERVE_TLS__KEY_FILE); keep it "
        "readable by the server's user only.",
    )
    client_ca_file: Path | None = Field(
        None,
        description="PEM certificates of the CAs client certificates must chain to "
        "(FITSERVE_TLS__CLIENT_CA_FILE). Set: every client must present a certificate they "
        "signed (mutual TLS); unset: no client certificate is asked for.",
    )

    @model_validator(mode="after")
    def _complete(self) -> TlsSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError(
                "FITSERVE_TLS__CERT_FILE and FITSERVE_TLS__KEY_FILE go together: set both "
                "(TLS) or neither (plaintext)"
            )
        if self.client_ca_file is not None and self.cert_file is None:
            raise ValueError(
                "FITSERVE_TLS__CLIENT_CA_FILE (mutual TLS) needs FITSERVE_TLS__CERT_FILE and "
                "FITSERVE_TLS__KEY_FILE too"
            )
        return self

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None

    @property
    def mode(self) -> str:
        """What the port serves, for banners: mTLS, TLS or plaintext."""
        if self.client_ca_file is not None:
            return "mTLS"
        return "TLS" if self.enabled else "plaintext"

    def read(self) -> tuple[bytes, bytes, bytes | None]:
        """The PEM bytes of the certificate chain, the key and the client CAs (None
        without mTLS), checked as Python's ssl module loads them.

        Raises TlsFileError naming the setting and the path; TLS must be enabled.
        """
        if self.cert_file is None or self.key_file is None:
            raise TlsFileError("TLS is off: FITSERVE_TLS__CERT_FILE is not set")
        cert = _read_pem("FITSERVE_TLS__CERT_FILE", self.cert_file)
        key = _read_pem("FITSERVE_TLS__KEY_FILE", self.key_file)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(self.cert_file, self.key_file)
        except ssl.SSLError as exc:
            raise TlsFileError(
                f"FITSERVE_TLS__CERT_FILE={self.cert_file} and FITSERVE_TLS__KEY_FILE="
                f"{self.key_file} are not a certificate and its private key ({exc.reason})"
            ) from None
        if self.client_ca_file is None:
            return cert, key, None
        client_ca = _read_pem("FITSERVE_TLS__CLIENT_CA_FILE", self.client_ca_file)
        try:
            context.load_verify_locations(cadata=client_ca.decode("ascii"))
        except (ssl.SSLError, UnicodeDecodeError) as exc:
            raise TlsFileError(
                f"FITSERVE_TLS__CLIENT_CA_FILE={self.client_ca_file} holds no PEM "
                f"certificate ({exc})"
            ) from None
        return cert, key, client_ca


def _read_pem(setting: str, path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TlsFileError(f"{setting}={path}: cannot read it ({exc.strerror})") from None
    if b"-----BEGIN " not in data:
        raise TlsFileError(f"{setting}={path}: not a PEM file (no -----BEGIN line)")
    return data


def _octal_umask(value: object) -> object:
    """FITSERVE_UMASK=077 (or 0o077) is octal, as the umask command reads it."""
    if isinstance(value, str) and value.strip().lower() not in ("", "null"):
        text = value.strip().lower().removeprefix("0o")
        try:
            return int(text, 8)
        except ValueError:
            raise ValueError(f"umask {value!r} is not an octal number such as 077") from None
    return value


class Settings(BaseSettings):
    """Everything a fitserve process is configured by.

    Environment variables use the ``FITSERVE_`` prefix, with ``__`` for nested fields
    (``FITSERVE_BATCHING__MAX_BATCH_SIZE=128``).
    """

    # FITSERVE_X=null unsets an optional setting (FITSERVE_INFERENCE__MAX_QUEUE_WAIT_MS=null)
    model_config = SettingsConfigDict(
        env_prefix="FITSERVE_", env_nested_delimiter="__", env_parse_none_str="null"
    )

    data_dir: Path = Field(
        Path("data"), description="Root of the artifact store: datasets/, models/, jobs/."
    )
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="Redis for job records, events and the Celery broker. `fitserve up` "
        "starts an embedded one and sets this unless FITSERVE_REDIS_URL is given.",
    )
    redis_max_connections: int = Field(
        100,
        ge=1,
        description="Redis connections an api process opens at most; past them a call "
        "waits for one (job watchers hold none while they wait).",
    )
    host: str = Field("127.0.0.1", description="Address the gRPC server binds.")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    metrics_port: int = Field(
        9464, ge=0, le=65535, description="HTTP port of /metrics; 0 picks a free one."
    )
    # -- Observability: worker /metrics, the Redis probe, worker heartbeats (docs/metrics.md)
    worker_metrics_port: int = Field(
        9465,
        ge=0,
        le=65535,
        description="HTTP port of a worker's /metrics (FITSERVE_WORKER_METRICS_PORT), served "
        "by its main process for it and its prefork children; 0 picks a free one, written "
        "to the worker's ready file (worker_ready_file) and its log. Several workers on one "
        "host (`fitserve worker --gpus N`) need a port each, or 0.",
    )
    worker_metrics_host: str = Field(
        "127.0.0.1",
        description="Address a worker's /metrics binds (FITSERVE_WORKER_METRICS_HOST); "
        "0.0.0.0 for a Prometheus on another host.",
    )
    worker_ready_file: Path | None = Field(
        None,
        description='Where a worker writes {"port": <metrics port>, "metrics_port": ..., '
        '"pid": ...} once its /metrics listens (FITSERVE_WORKER_READY_FILE): how '
        "`fitserve up` and the tests find a port picked with worker_metrics_port=0.",
    )
    redis_probe_seconds: float = Field(
        5.0,
        gt=0,
        description="How often servers and workers PING Redis from a background thread for "
        "fitserve_redis_up and fitserve_redis_ping_seconds (FITSERVE_REDIS_PROBE_SECONDS).",
    )
    worker_heartbeat_seconds: float = Field(
        5.0,
        gt=0,
        description="How often a worker's main process writes its heartbeat key per queue "
        "(expiring after worker_heartbeat_ttl_seconds); the api counts them as "
        "fitserve_queue_workers (FITSERVE_WORKER_HEARTBEAT_SECONDS).",
    )
    worker_heartbeat_ttl_seconds: float | None = Field(
        None,
        gt=0,
        description="How long a worker's heartbeat keys live without renewal "
        "(FITSERVE_WORKER_HEARTBEAT_TTL_SECONDS); unset: three heartbeat periods (15 s). "
        "Also the grace of a job a worker received but never started: once the receiving "
        "worker's heartbeat has been gone this long (it was killed between taking the "
        "message and starting the job), the api's reaper sends the job's message again "
        "(docs/reliability.md). Set the same on api servers and workers; it must be longer "
        "than worker_heartbeat_seconds.",
    )
    # -- end of observability ------------------------------------------------------------
    roles: list[Role] = Field(
        default_factory=lambda: list[Role](["api", "inference"]),
        description="Which services this server runs: api (control plane, no TensorFlow), "
        "inference (data plane).",
    )
    processes: int = Field(
        1,
        ge=1,
        description="Server processes `fitserve serve` runs on one port (SO_REUSEPORT), "
        "supervised, with one /metrics (served by the supervisor) aggregated across them. "
        "One Python process tops out near one core, so this is how one machine's cores "
        "serve one port.",
    )
    max_message_bytes: int = Field(
        256 * 1024 * 1024,
        ge=4 * 1024 * 1024,
        description="Largest gRPC message the server sends or receives "
        "(FITSERVE_MAX_MESSAGE_BYTES). A larger request is refused with RESOURCE_EXHAUSTED "
        "naming this setting (see service.api.gate.CallGate).",
    )
    # ---- Bounds on streaming calls (service.api.gate.CallGate) ---------------------------
    # The Predict APIs take no setting of their own: the tensors of one request may decode to
    # at most max_message_bytes bytes (and elements) together, checked from their shapes
    # before anything is allocated (service.api.converters.TensorBudget).
    max_streams: int = Field(
        4096,
        ge=1,
        description="Streaming calls (WatchJob, DownloadJobArtifact, UploadDataset, health "
        "Watch, reflection) one server process holds open at once; past it a new one is "
        "refused with RESOURCE_EXHAUSTED naming FITSERVE_MAX_STREAMS and a retry hint. A "
        "slot frees the moment its call ends, however it ends (cancelled included).",
    )
    max_job_watchers: int = Field(
        2048,
        ge=1,
        description="WatchJob streams (job.wait(), `fitserve jobs watch`) one server process "
        "holds open at once, within max_streams; past it a new one is refused with "
        "RESOURCE_EXHAUSTED naming FITSERVE_MAX_JOB_WATCHERS and a retry hint. Each costs "
        "about 20 KB and a state read every few seconds (docs/scaling.md).",
    )
    # ---- end of the bounds on streaming calls ---------------------------------------------
    max_dataset_bytes: int = Field(
        4 * 1024**3, ge=1, description="Largest dataset an upload may hold."
    )
    max_dataset_expanded_bytes: int | None = Field(
        None,
        ge=1,
        description="Most bytes the arrays of an uploaded .npz may hold once unpacked "
        "(FITSERVE_MAX_DATASET_EXPANDED_BYTES): a compressed upload of a few MB can declare "
        "and hold gigabytes that a worker loads into memory. Checked against every array's "
        "header and its real decompressed size before the upload is accepted. Unset: the "
        "same as max_dataset_bytes (what an uncompressed upload may carry).",
    )
    grace_seconds: float = Field(
        10.0,
        ge=0,
        description="How long in-flight RPCs may finish on shutdown, unless "
        "FITSERVE_SHUTDOWN__GRACE_SECONDS is set (which see).",
    )
    shutdown: ShutdownSettings = Field(default_factory=ShutdownSettings)
    log_format: Literal["auto", "json", "text"] = Field(
        "auto", description="json in production; auto picks text on a terminal."
    )
    log_level: str = Field("INFO", description="Root log level.")
    job_max_attempts: int = Field(
        3,
        ge=1,
        description="Attempts of one job that may be lost (its worker killed or cut off "
        "past its lease) before it is FAILED with reason WORKER_LOST. An attempt a "
        "stopping worker hands back (SIGTERM) does not count.",
    )
    job_visibility_timeout_seconds: int = Field(
        48 * 3600,
        ge=1,
        description="How long after delivery Redis hands an unacknowledged Celery message "
        "to another worker. Recovery does not rely on it any more: a job whose worker is "
        "lost is found by its lease and requeued by the api's reaper (job_lease_seconds), "
        "and a message redelivered while its job's lease is alive is dropped by the worker "
        "that gets it, so a running job never runs twice. It is only the backstop for a "
        "message no worker acknowledged; keep it long.",
    )
    # -- Job leases: a lost worker's job is found and resumed, a stopping worker's handed
    # back (service.domain.leases, service.domain.reaper, docs/reliability.md) ----------
    job_lease_seconds: float = Field(
        30.0,
        ge=1,
        description="How long a running job's lease lasts (FITSERVE_JOB_LEASE_SECONDS): its "
        "worker renews it every third of this from a thread, through long epochs too. "
        "Once it runs out (the worker was killed, its node lost, or it could not reach "
        "Redis for that long), the api's reaper requeues the job (it resumes from its "
        "last epoch's backup) or cancels it if a cancel was asked. A worker that reaches "
        "Redis again after that stops the job and leaves it to the new attempt. The same "
        "value on api servers and workers; longer survives longer network cuts without a "
        "requeue, shorter recovers sooner.",
    )
    job_reaper_period_seconds: float = Field(
        10.0,
        gt=0,
        description="How often each api server looks for jobs whose lease ran out "
        "(FITSERVE_JOB_REAPER_PERIOD_SECONDS). A lost worker's job is queued again within "
        "job_lease_seconds plus this.",
    )
    worker_stop_grace_seconds: float = Field(
        20.0,
        ge=0,
        description="On SIGTERM (a rolling restart) a worker stops its running job at the "
        "next batch end, hands it back to the queue (not counted as a lost attempt; the "
        "next attempt resumes from the last epoch's backup) and exits; a job still "
        "running this many seconds after the signal has its worker child killed and is "
        "requeued by its lease (FITSERVE_WORKER_STOP_GRACE_SECONDS). Keep it below the "
        "SIGKILL deadline of whatever stops the worker: `fitserve up` and `fitserve "
        "worker` wait 30 s, Kubernetes terminationGracePeriodSeconds.",
    )
    # -- end of the job leases -----------------------------------------------------------
    job_retention_seconds: int | None = Field(
        30 * 24 * 3600,
        ge=1,
        description="How long a finished job (succeeded, failed or cancelled) stays in Redis: "
        "its record, history and event stream expire this long after it finished, and its "
        "id then leaves the job index, so GetJob answers NOT_FOUND. Queued and running jobs "
        "never expire. Published model versions are files in the model store and are kept "
        "regardless. Unset (FITSERVE_JOB_RETENTION_SECONDS=null): jobs are kept for ever, "
        "about 10 KB of Redis each (docs/scaling.md).",
    )
    worker_max_jobs_per_child: int = Field(
        10,
        ge=0,
        description="Jobs a worker child runs before a fresh one replaces it (0: never). "
        "TensorFlow keeps the functions each job traces for the life of the process, about "
        "6 MB a job for the reference MLP (make bench); the new child imports TensorFlow as "
        "soon as it starts, so the next job still finds a warm worker.",
    )
    worker_cpu_devices: int = Field(
        1,
        ge=1,
        description="Logical devices a worker child splits its CPU into. Above 1, a worker "
        "without GPUs trains with MirroredStrategy over them: how multi-device training is "
        "tested on a machine without GPUs. A worker with several GPUs mirrors over those.",
    )
    dataset_roots: list[Path] = Field(
        default_factory=list,
        description="Folders a DatasetRef.uri may point into (tf.data.Dataset.save folders, "
        "TFRecord files); anything outside is refused, so a request cannot make a worker "
        "read arbitrary files. Empty: <data_dir>/external. JSON list, e.g. "
        "FITSERVE_DATASET_ROOTS='[\"/mnt/data\"]'.",
    )
    dataset_url_schemes: list[str] = Field(
        default_factory=lambda: list(DEFAULT_URL_SCHEMES),
        description="fsspec protocols a DatasetRef.uri may name as a URL (s3://, gs://, "
        "az://, ...); any other is refused. http, https, ftp and the like are left out on "
        "purpose: a request must not make a worker fetch arbitrary URLs (or reach services "
        "inside the cluster); add them only when every caller is trusted. Each protocol "
        "needs its fsspec package on the api servers and the workers (s3fs, gcsfs, adlfs: "
        "the s3, gcs and azure extras). JSON list, e.g. "
        "FITSERVE_DATASET_URL_SCHEMES='[\"s3\"]'; empty: local paths only.",
    )
    dataset_cache_bytes: int = Field(
        1024**3,
        ge=0,
        description="A dataset by uri whose files add up to at most this many bytes is "
        "cached in worker memory as the first epoch reads it, so later epochs read no "
        'files ("cache when it fits"); 0: never. Parsed elements can take more memory '
        "than the files (TFRecord int64 features are varints), and training and "
        "validation data are each cached.",
    )
    plugins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Python modules to load plugins from, besides the installed packages' "
        "'fitserve.plugins' entry points: for plugin code that is not packaged. Comma "
        "separated or a JSON list, e.g. FITSERVE_PLUGINS=my_company.losses,my_company.layers. "
        "Servers and workers must load the same plugins (docs/plugins.md).",
    )
    # -- Limits on job submissions: their size, and how long a job may run --------------
    max_job_request_bytes: int = Field(
        1024 * 1024,
        ge=1024,
        description="Largest Train, FineTune or Evaluate request (serialized), refused "
        "above this with INVALID_ARGUMENT (FITSERVE_MAX_JOB_REQUEST_BYTES). A job's "
        "request is stored in its record (GetJob, ListJobs) and much of it in the "
        "version's fitserve.json (GetModel), so it stays far below max_message_bytes, "
        "which uploads and predictions need. Free-form fields have caps of their own "
        "(service.domain.job_specs).",
    )
    job_time_limit: JobTimeLimitSettings = Field(default_factory=JobTimeLimitSettings)
    # -- end of the job submission limits -----------------------------------------------
    batching: BatchingSettings = Field(default_factory=BatchingSettings)
    inference: InferenceSettings = Field(default_factory=InferenceSettings)
    auth: Annotated[AuthSettings, NoDecode] = Field(
        default_factory=AuthSettings,
        description="FITSERVE_AUTH=none|tokens|auto sets the mode; FITSERVE_AUTH__* the rest.",
    )
    tls: TlsSettings = Field(default_factory=TlsSettings)
    umask: Annotated[int | None, BeforeValidator(_octal_umask)] = Field(
        0o077,
        ge=0,
        le=0o777,
        description="The umask `fitserve serve`, `worker` and `up` set as they start, in "
        "octal (FITSERVE_UMASK=077): what they and their children (the embedded Redis) "
        "create under data_dir (datasets, models, jobs, Redis's AOF) is then readable by "
        "their own user only. Operators whose servers and workers run as different users "
        "on one shared volume set a group-readable one (027) and a shared group; null: "
        "leave the umask the process was started with. Files made before keep their mode.",
    )

    @field_validator("dataset_url_schemes")
    @classmethod
    def _bare_protocols(cls, schemes: list[str]) -> list[str]:
        """'S3://' and 's3' are the same protocol."""
        return [s.strip().lower().removesuffix("://") for s in schemes if s.strip()]

    @field_validator("plugins", mode="before")
    @classmethod
    def _module_list(cls, value: object) -> object:
        """A JSON list or comma-separated module names."""
        if isinstance(value, str):
            text = value.strip()
            return (
                json.loads(text)
                if text.startswith("[")
                else [m.strip() for m in text.split(",") if m.strip()]
            )
        return value

    @field_validator("auth", mode="before")
    @classmethod
    def _auth_mode(cls, value: object) -> object:
        """FITSERVE_AUTH=none is the mode alone; a JSON object the whole section."""
        if isinstance(value, str):
            text = value.strip()
            return json.loads(text) if text.startswith("{") else {"mode": text}
        return value

    @model_validator(mode="after")
    def _check_heartbeat_ttl(self) -> Settings:
        ttl = self.worker_heartbeat_ttl_seconds
        if ttl is not None and ttl <= self.worker_heartbeat_seconds:
            raise ValueError(
                f"FITSERVE_WORKER_HEARTBEAT_TTL_SECONDS ({ttl:g}) must be longer than "
                f"FITSERVE_WORKER_HEARTBEAT_SECONDS ({self.worker_heartbeat_seconds:g}): a "
                "heartbeat key would expire before its worker renews it"
            )
        return self

    @property
    def heartbeat_ttl_seconds(self) -> float:
        """How long a worker's heartbeat keys live: the setting, or three periods."""
        ttl = self.worker_heartbeat_ttl_seconds
        return 3 * self.worker_heartbeat_seconds if ttl is None else ttl

    @model_validator(mode="after")
    def _default_dataset_roots(self) -> Settings:
        if not self.dataset_roots:
            self.dataset_roots = [self.data_dir / "external"]
        return self

    @property
    def datasets_dir(self) -> Path:
        return self.data_dir / "datasets"

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def jobs_dir(self) -> Path:
        return self.data_dir / "jobs"
