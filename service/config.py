"""Settings: one object, read from FITSERVE_* environment variables, passed down explicitly."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

Role = Literal["api", "inference"]


class BatchingSettings(BaseModel):
    """Server-wide defaults of the Predict batcher."""

    max_batch_size: int = Field(64, ge=1, description="Most rows one model call takes.")
    batch_timeout_ms: float = Field(
        1.0, ge=0, description="Longest a queued request waits for others to join its batch."
    )
    max_queue: int = Field(
        1024, ge=1, description="Queued requests per version before RESOURCE_EXHAUSTED."
    )


class Settings(BaseSettings):
    """Everything a fitserve process is configured by.

    Environment variables use the ``FITSERVE_`` prefix, with ``__`` for nested fields
    (``FITSERVE_BATCHING__MAX_BATCH_SIZE=128``).
    """

    model_config = SettingsConfigDict(env_prefix="FITSERVE_", env_nested_delimiter="__")

    data_dir: Path = Field(
        Path("data"), description="Root of the artifact store: datasets/, models/, jobs/."
    )
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="Redis for job records, events and the Celery broker. `fitserve up` "
        "starts an embedded one and sets this unless FITSERVE_REDIS_URL is given.",
    )
    host: str = Field("127.0.0.1", description="Address the gRPC server binds.")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    metrics_port: int = Field(
        9464, ge=0, le=65535, description="HTTP port of /metrics; 0 picks a free one."
    )
    roles: list[Role] = Field(
        default_factory=lambda: list[Role](["api", "inference"]),
        description="Which services this server runs: api (control plane, no TensorFlow), "
        "inference (data plane).",
    )
    max_message_bytes: int = Field(
        256 * 1024 * 1024,
        ge=4 * 1024 * 1024,
        description="Largest gRPC message the server sends or receives "
        "(FITSERVE_MAX_MESSAGE_BYTES).",
    )
    max_dataset_bytes: int = Field(
        4 * 1024**3, ge=1, description="Largest dataset an upload may hold."
    )
    grace_seconds: float = Field(
        10.0, ge=0, description="How long in-flight RPCs may finish on shutdown."
    )
    log_format: Literal["auto", "json", "text"] = Field(
        "auto", description="json in production; auto picks text on a terminal."
    )
    log_level: str = Field("INFO", description="Root log level.")
    job_max_attempts: int = Field(
        3, ge=1, description="Deliveries of one job before it is FAILED (worker lost)."
    )
    job_visibility_timeout_seconds: int = Field(
        48 * 3600,
        ge=60,
        description="Must exceed the longest job, or Redis redelivers a running job.",
    )
    batching: BatchingSettings = Field(default_factory=BatchingSettings)

    @property
    def datasets_dir(self) -> Path:
        return self.data_dir / "datasets"

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def jobs_dir(self) -> Path:
        return self.data_dir / "jobs"
