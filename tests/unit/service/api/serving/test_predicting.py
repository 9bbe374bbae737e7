"""What both Predict APIs share: outcomes counted by the error's code, and output filters."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import numpy as np
import pytest

from service.api.serving.predicting import CountedPredictor, filtered
from service.errors import InvalidRequest, NotFound, ResourceExhausted
from service.inference.models import Prediction
from service.metrics import Metrics

INPUTS = {"x": np.zeros((1, 2), np.float32)}


class Models:
    """ServingModels as CountedPredictor uses it: resolve, then predict."""

    def __init__(self, resolve_error: Exception | None = None, error: Exception | None = None):
        self.resolve_error, self.error = resolve_error, error

    async def resolve(self, name: str, version: int, alias: str) -> int:
        if self.resolve_error is not None:
            raise self.resolve_error
        return 3

    async def predict(self, name: str, version: int, inputs: Any, deadline: Any) -> Prediction:
        if self.error is not None:
            raise self.error
        return Prediction(name, version, {"y": np.ones((1, 1))})


def outcome(models: Models) -> dict[tuple[str, ...], float]:
    metrics = Metrics()
    predictor = CountedPredictor(models, metrics, "tfserving.Predict")  # type: ignore[arg-type]
    with contextlib.suppress(Exception):  # the outcome is what is counted, not raised
        asyncio.run(predictor.predict("mnist", (0, "stable"), INPUTS, None))
    (family,) = [m for m in metrics.registry.collect() if m.name == "fitserve_predict_requests"]
    return {
        tuple(s.labels[k] for k in ("model", "version", "method", "code")): s.value
        for s in family.samples
        if s.name.endswith("_total")
    }


def test_an_answer_counts_ok_under_the_model_and_version() -> None:
    assert outcome(Models()) == {("mnist", "3", "tfserving.Predict", "OK"): 1.0}


def test_a_name_that_does_not_resolve_leaves_model_and_version_empty() -> None:
    counted = outcome(Models(resolve_error=NotFound("no model 'mnist'")))
    assert counted == {("", "", "tfserving.Predict", "NOT_FOUND"): 1.0}


def test_a_refusal_counts_the_code_its_error_names() -> None:
    counted = outcome(Models(error=ResourceExhausted("queue full", 0.1)))
    assert counted == {("mnist", "3", "tfserving.Predict", "RESOURCE_EXHAUSTED"): 1.0}


def test_a_bug_counts_as_internal() -> None:
    counted = outcome(Models(error=RuntimeError("boom")))
    assert counted == {("mnist", "3", "tfserving.Predict", "INTERNAL"): 1.0}


def _cancelled(deadline: float | None) -> dict[tuple[str, ...], float]:
    metrics = Metrics()
    predictor = CountedPredictor(
        Models(error=asyncio.CancelledError()),  # type: ignore[arg-type]
        metrics,
        "Predict",
    )
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(predictor.predict("mnist", (0, ""), INPUTS, deadline))
    return {
        (s.labels["code"], s.name): s.value
        for m in metrics.registry.collect()
        for s in m.samples
        if m.name in ("fitserve_predict_requests", "fitserve_predict_duration_seconds")
        and s.name.endswith(("_total", "_count"))
        and s.labels.get("model") == "mnist"
    }


def test_a_call_cancelled_past_its_deadline_counts_and_times_deadline_exceeded() -> None:
    counted = _cancelled(time.monotonic() - 1)
    assert counted[("DEADLINE_EXCEEDED", "fitserve_predict_requests_total")] == 1.0
    assert counted[("DEADLINE_EXCEEDED", "fitserve_predict_duration_seconds_count")] == 1.0


def test_a_call_the_client_cancels_counts_and_times_cancelled() -> None:
    counted = _cancelled(time.monotonic() + 60)
    assert counted[("CANCELLED", "fitserve_predict_requests_total")] == 1.0
    assert counted[("CANCELLED", "fitserve_predict_duration_seconds_count")] == 1.0


def test_filtered_keeps_the_outputs_asked_for_and_names_an_unknown_one() -> None:
    outputs = {"a": np.zeros(1), "b": np.ones(1)}
    assert filtered(outputs, []) is outputs
    assert list(filtered(outputs, ["b"])) == ["b"]
    with pytest.raises(InvalidRequest, match=r"unknown output 'c'; the model has \['a', 'b'\]"):
        filtered(outputs, ["c", "a"])
