"""The stores a running job reads and writes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from service.domain.datasets import DatasetStore
from service.domain.jobs import JobStore
from service.domain.model_store import ModelStore


@dataclass(frozen=True)
class Workspace:
    """Job records, datasets, models, the folder for per-job files, and where datasets
    by uri (``dataset_roots``) and built-in Keras datasets (``keras_datasets_dir``) live."""

    jobs: JobStore
    datasets: DatasetStore
    models: ModelStore
    jobs_dir: Path
    dataset_roots: tuple[Path, ...] = field(default=())
    keras_datasets_dir: Path = Path("data/keras_datasets")
