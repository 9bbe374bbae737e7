"""Evaluation results kept with a model version (TensorFlow-free: the api reads them too).

A version's ``fitserve.json`` holds a list ``evaluations`` of
``{"dataset", "metrics", "job_id", "created_at"}``. The worker appends to it
(``service.training.evaluate.run_evaluate``); the api exports the latest result per dataset as the
Prometheus gauge ``fitserve_model_evaluation_metric`` at scrape time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any, NamedTuple

from service.domain.model_store import ModelStore
from service.errors import NotFound

log = logging.getLogger(__name__)


class EvaluationSample(NamedTuple):
    """One metric of the latest evaluation of a version on a dataset."""

    model: str
    version: int
    dataset: str
    metric: str
    value: float


def record_evaluation(
    store: ModelStore, name: str, version: int, dataset: str, metrics: dict[str, float], job_id: str
) -> None:
    """Append a result to the version's evaluations, once per job (a redelivered job
    must not count twice)."""
    evaluations: list[dict[str, Any]] = store.metadata(name, version).get("evaluations", [])
    if any(e.get("job_id") == job_id for e in evaluations):
        return
    entry = {"dataset": dataset, "metrics": metrics, "job_id": job_id, "created_at": time.time()}
    store.update_metadata(name, version, evaluations=[*evaluations, entry])


def evaluation_samples(store: ModelStore) -> list[EvaluationSample]:
    """Every (model, version, dataset, metric) of the latest evaluations in the store."""
    return [s for name in store.models() for s in _model_samples(store, name)]


def _model_samples(store: ModelStore, name: str) -> Iterator[EvaluationSample]:
    for version in store.versions(name):
        try:
            evaluations = store.metadata(name, version).get("evaluations", [])
        except (NotFound, OSError, ValueError):  # deleted or being written meanwhile
            continue
        latest = {e["dataset"]: e for e in sorted(evaluations, key=lambda e: e["created_at"])}
        for dataset, entry in sorted(latest.items()):
            for metric, value in sorted(entry["metrics"].items()):
                yield EvaluationSample(name, version, dataset, metric, float(value))
