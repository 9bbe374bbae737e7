"""Feedback: true labels for earlier predictions, scored into live accuracy per version.

At Predict time, what the model predicted (a class per row, or a value per row) is kept in
Redis under the request id for ``ttl`` seconds with one ``SET ... EX``, so any replica can
accept the feedback. The write is not awaited by Predict (it would add a Redis round trip
to every call); a Feedback that reaches the same replica first waits for it. A request id
accepts feedback once (GETDEL), so a retried Feedback cannot count twice.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import redis.asyncio as aioredis

from service.errors import FailedPrecondition, InvalidRequest, NotFound, Unavailable
from service.metrics import Metrics

log = logging.getLogger(__name__)

KEY_PREFIX = "fitserve:prediction:"


@dataclass(frozen=True)
class FeedbackResult:
    """What one Feedback counted."""

    model: str
    version: int
    rows: int
    correct: int


def summarize(output: np.ndarray) -> dict[str, Any]:
    """What a prediction says per row: the argmax class, or a single value."""
    if output.ndim == 2 and output.shape[1] > 1:
        return {"kind": "class", "values": output.argmax(axis=1).tolist()}
    if output.ndim in (1, 2) and output.size == len(output):
        return {"kind": "value", "values": output.reshape(-1).astype(float).tolist()}
    return {"kind": "other", "values": [None] * len(output)}


class FeedbackLog:
    """Remembers predictions in Redis and scores true labels against them."""

    def __init__(self, client: aioredis.Redis, ttl_seconds: int, metrics: Metrics) -> None:
        self._redis, self._ttl, self._metrics = client, ttl_seconds, metrics
        self._pending: dict[str, asyncio.Task[None]] = {}

    def remember(self, request_id: str, model: str, version: int, output: np.ndarray) -> None:
        """Keep one prediction for ``ttl`` seconds, without making Predict wait."""
        record = {"model": model, "version": version, **summarize(output)}
        task = asyncio.create_task(self._write(request_id, json.dumps(record)))
        self._pending[request_id] = task
        task.add_done_callback(lambda _: self._pending.pop(request_id, None))

    async def score(self, request_id: str, labels: np.ndarray) -> FeedbackResult:
        """Count the labels of one earlier prediction into its version's counters."""
        if (pending := self._pending.get(request_id)) is not None:
            await asyncio.shield(pending)
        record = await self._fetch(request_id)
        values = record["values"]
        truth = _labels(labels, len(values))
        if record["kind"] == "other":
            raise FailedPrecondition(
                "the model's output is neither one score per class nor one value per row; "
                "feedback cannot score it"
            )
        await self._claim(request_id)
        correct = self._count(record, values, truth)
        return FeedbackResult(record["model"], record["version"], len(values), correct)

    async def close(self) -> None:
        """Let the last writes land."""
        if self._pending:
            await asyncio.wait(list(self._pending.values()), timeout=5)

    async def _write(self, request_id: str, record: str) -> None:
        try:
            await self._redis.set(KEY_PREFIX + request_id, record, ex=self._ttl)
        except Exception as exc:  # feedback is best effort; Predict has answered already
            log.warning("could not keep prediction %s for feedback: %s", request_id, exc)

    async def _fetch(self, request_id: str) -> dict[str, Any]:
        try:
            raw = await self._redis.get(KEY_PREFIX + request_id)
        except Exception as exc:
            raise Unavailable(f"Redis is unavailable ({type(exc).__name__}); retry") from None
        if raw is None:
            raise self._unknown(request_id)
        record: dict[str, Any] = json.loads(raw)
        return record

    async def _claim(self, request_id: str) -> None:
        """Delete the record; whoever deletes it counts it, so feedback counts once."""
        try:
            deleted = await self._redis.delete(KEY_PREFIX + request_id)
        except Exception as exc:
            raise Unavailable(f"Redis is unavailable ({type(exc).__name__}); retry") from None
        if not deleted:
            raise self._unknown(request_id)

    def _unknown(self, request_id: str) -> NotFound:
        return NotFound(
            f"no prediction with request id {request_id!r} in the last {self._ttl} s; "
            "feedback is accepted once per request id, within "
            "FITSERVE_INFERENCE__FEEDBACK_TTL_SECONDS",
            field="request_id",
        )

    def _count(self, record: dict[str, Any], values: list[Any], truth: np.ndarray) -> int:
        labels = (record["model"], str(record["version"]))
        kind = record["kind"]
        predicted = np.asarray(values, dtype=np.float64)
        self._metrics.feedback_rows.labels(*labels).inc(len(values))
        if truth.dtype.kind == "f":  # regression: a value per row
            self._metrics.feedback_absolute_error.labels(*labels).inc(
                float(np.abs(predicted - truth).sum())
            )
            return 0
        if kind == "value":  # one sigmoid unit: binary classification
            predicted = (predicted >= 0.5).astype(np.float64)
        correct = int((predicted == truth).sum())
        self._metrics.feedback_correct.labels(*labels).inc(correct)
        return correct


def _labels(labels: np.ndarray, rows: int) -> np.ndarray:
    """One label per row: integers (classes) or floats (values)."""
    if labels.dtype.kind not in "iubf":
        raise InvalidRequest(
            f"labels have dtype {labels.dtype.name}; send integer class ids or float values",
            field="labels",
        )
    flat = labels.reshape(-1) if labels.ndim == 2 and labels.shape[1:] == (1,) else labels
    if flat.shape != (rows,):
        raise InvalidRequest(
            f"labels have shape {list(labels.shape)}; the prediction had {rows} rows, "
            f"so send [{rows}]",
            field="labels",
        )
    return flat.astype(np.float64) if flat.dtype.kind == "f" else flat.astype(np.int64)
