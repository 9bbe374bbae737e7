"""The stores a running job reads and writes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from service.domain.datasets import DatasetStore
from service.domain.jobs import JobStore
from service.domain.model_store import ModelStore


@dataclass(frozen=True)
class Workspace:
    """Job records, datasets, models, and the folder for per-job files."""

    jobs: JobStore
    datasets: DatasetStore
    models: ModelStore
    jobs_dir: Path
