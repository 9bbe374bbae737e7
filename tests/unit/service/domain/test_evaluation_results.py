"""Evaluation records on a version: appended once per job, latest per dataset exported."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from service.domain import evaluation_results
from service.domain.evaluation_results import (
    EvaluationSample,
    evaluation_samples,
    record_evaluation,
)
from service.domain.files import write_json_atomic
from service.domain.job_specs import parse_evaluate
from service.domain.model_store import METADATA_FILE, ModelStore


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    store = ModelStore(tmp_path)
    for version in (1, 2):
        write_json_atomic(tmp_path / "m" / str(version) / METADATA_FILE, {"evaluations": []})
    return store


def test_a_redelivered_job_records_its_result_once(store: ModelStore) -> None:
    record_evaluation(store, "m", 1, "holdout", {"loss": 0.5}, "job1")
    record_evaluation(store, "m", 1, "holdout", {"loss": 0.5}, "job1")
    assert [e["job_id"] for e in store.metadata("m", 1)["evaluations"]] == ["job1"]


def test_samples_hold_the_latest_result_per_version_and_dataset(
    store: ModelStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = itertools.count(100)
    monkeypatch.setattr(evaluation_results.time, "time", lambda: float(next(clock)))
    record_evaluation(store, "m", 1, "holdout", {"loss": 0.9, "accuracy": 0.5}, "a")
    record_evaluation(store, "m", 1, "holdout", {"loss": 0.4, "accuracy": 0.8}, "b")
    record_evaluation(store, "m", 1, "train", {"loss": 0.1}, "c")
    record_evaluation(store, "m", 2, "holdout", {"loss": 0.3}, "d")
    assert evaluation_samples(store) == [
        EvaluationSample("m", 1, "holdout", "accuracy", 0.8),
        EvaluationSample("m", 1, "holdout", "loss", 0.4),
        EvaluationSample("m", 1, "train", "loss", 0.1),
        EvaluationSample("m", 2, "holdout", "loss", 0.3),
    ]


def test_evaluate_runs_on_the_cpu_queue_unless_told_otherwise() -> None:
    base = {"model_name": "m", "dataset": {"dataset": "d"}}
    assert parse_evaluate(base).run.queue == "cpu"
    assert parse_evaluate(base | {"run": {"labels": {"a": "b"}}}).run.queue == "cpu"
    assert parse_evaluate(base | {"run": {"queue": "train"}}).run.queue == "train"
