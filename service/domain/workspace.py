"""The stores a running job reads and writes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from service.domain.datasets.sources import DEFAULT_URL_SCHEMES
from service.domain.datasets.store import DatasetStore
from service.domain.job_store import JobStore
from service.domain.model_events import Publisher
from service.domain.model_store import ModelStore


@dataclass(frozen=True)
class Workspace:
    """Job records, datasets, models, the folder for per-job files, where datasets by uri
    (``dataset_roots``, ``dataset_url_schemes``) and built-in Keras datasets
    (``keras_datasets_dir``) live, and where a new version is announced (``model_events``;
    None: servers poll the store). Datasets by uri no bigger than ``dataset_cache_bytes``
    are cached in memory, and Dataset.save folders at a URL are copied to
    ``dataset_cache_dir`` first (see service.training.data)."""

    jobs: JobStore
    datasets: DatasetStore
    models: ModelStore
    jobs_dir: Path
    dataset_roots: tuple[Path, ...] = field(default=())
    keras_datasets_dir: Path = Path("data/keras_datasets")
    dataset_url_schemes: tuple[str, ...] = DEFAULT_URL_SCHEMES
    dataset_cache_bytes: int = 1024**3
    dataset_cache_dir: Path = Path("data/dataset_cache")
    model_events: Publisher | None = None
