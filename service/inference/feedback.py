"""Feedback: true labels for earlier predictions, scored into live accuracy per version.

At Predict time, what the model predicted (a class per row, or a value per row) is kept in
Redis under the request id for ``ttl`` seconds, so any replica can accept the feedback. The
write is not awaited by Predict (it would add a Redis round trip to every call), and the
predictions of ``FLUSH_SECONDS`` go out together in one script call: a Redis command per
Predict cost a large share of the server's throughput. A Feedback
that reaches the same replica before the write waits for it; on another replica, a
Feedback for a request id younger than the flush window waits the window out (request ids
carry their creation time, see ``service.logs.new_request_id``). A request id
accepts feedback once (GETDEL), so a retried Feedback cannot count twice.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import redis.asyncio as aioredis

from service.errors import FailedPrecondition, InvalidRequest, NotFound, Unavailable
from service.logs import request_id_age
from service.metrics import Metrics

log = logging.getLogger(__name__)

KEY_PREFIX = "fitserve:prediction:"
FLUSH_SECONDS = 0.01
_IN_FLIGHT_SECONDS = FLUSH_SECONDS + 0.25  # the flush window, plus Redis and clock skew
# KEYS: one per prediction; ARGV: the TTL, then one record per key.
_SET_ALL = """
for i = 1, #KEYS do redis.call('SET', KEYS[i], ARGV[i + 1], 'EX', ARGV[1]) end
return #KEYS
"""


@dataclass(frozen=True)
class FeedbackResult:
    """What one Feedback counted."""

    model: str
    version: int
    rows: int
    correct: int
    output: str = ""


def summarize(output: np.ndarray) -> dict[str, Any]:
    """What a prediction says per row: the argmax class, or a single value."""
    if output.ndim == 2 and output.shape[1] > 1:
        return {"kind": "class", "values": output.argmax(axis=1).tolist()}
    if output.ndim in (1, 2) and output.size == len(output):
        return {"kind": "value", "values": output.reshape(-1).astype(float).tolist()}
    return {"kind": "other", "values": [None] * len(output)}


class FeedbackLog:
    """Remembers predictions in Redis and scores true labels against them."""

    def __init__(
        self,
        client: aioredis.Redis,
        ttl_seconds: int,
        metrics: Metrics,
        sample_rate: float = 1.0,
    ) -> None:
        self._redis, self._ttl, self._metrics = client, ttl_seconds, metrics
        self._sample_rate = sample_rate  # the share of predictions kept for feedback
        self._pending: dict[str, asyncio.Task[None]] = {}
        self._buffer: dict[str, str] = {}
        self._flush: asyncio.Task[None] | None = None
        self._set_all = client.register_script(_SET_ALL)

    def remember(
        self, request_id: str, model: str, version: int, outputs: Mapping[str, np.ndarray]
    ) -> None:
        """Keep one prediction for ``ttl`` seconds, without making Predict wait (only a
        ``sample_rate`` share of them: each costs ~240 bytes of Redis for the TTL, per
        output)."""
        if self._sample_rate < 1.0 and random.random() >= self._sample_rate:
            return
        summaries = {name: summarize(output) for name, output in outputs.items()}
        record = {"model": model, "version": version, "outputs": summaries}
        self._buffer[request_id] = json.dumps(record)
        if self._flush is None:
            self._flush = asyncio.create_task(self._write_buffer())
        self._pending[request_id] = self._flush

    async def score(self, request_id: str, labels: np.ndarray, output: str = "") -> FeedbackResult:
        """Count the labels of one earlier prediction into its version's counters, for
        ``output`` (required when the model has several)."""
        if (pending := self._pending.get(request_id)) is not None:
            await asyncio.shield(pending)
        record = await self._fetch(request_id)
        output, summary = _output(record, output)
        record = {
            "model": record["model"],
            "version": record["version"],
            "output": output,
            **summary,
        }
        values = record["values"]
        truth = _labels(labels, len(values))
        if record["kind"] == "other":
            raise FailedPrecondition(
                "the model's output is neither one score per class nor one value per row; "
                "feedback cannot score it"
            )
        await self._claim(request_id)
        correct = self._count(record, values, truth)
        return FeedbackResult(record["model"], record["version"], len(values), correct, output)

    async def close(self) -> None:
        """Let the last writes land."""
        if self._pending:
            await asyncio.wait(list(self._pending.values()), timeout=5)

    async def _write_buffer(self) -> None:
        """Write every prediction remembered since the last write, in one call."""
        await asyncio.sleep(FLUSH_SECONDS)  # gather the predictions of the next moment
        batch, self._buffer, self._flush = self._buffer, {}, None
        try:
            keys = [KEY_PREFIX + request_id for request_id in batch]
            await self._set_all(keys=keys, args=[self._ttl, *batch.values()])
        except Exception as exc:  # feedback is best effort; Predict has answered already
            log.warning("could not keep %d predictions for feedback: %s", len(batch), exc)
        finally:
            for request_id in batch:
                self._pending.pop(request_id, None)

    async def _fetch(self, request_id: str) -> dict[str, Any]:
        raw = await self._get(request_id)
        age = request_id_age(request_id)
        if raw is None and age is not None and age < _IN_FLIGHT_SECONDS:
            # Another replica answered this Predict a moment ago: its write may not have
            # landed yet. Wait out the flush window (plus clock skew), then look again.
            await asyncio.sleep(_IN_FLIGHT_SECONDS - age)  # a bounded wait for a known window
            raw = await self._get(request_id)
        if raw is None:
            raise self._unknown(request_id)
        record: dict[str, Any] = json.loads(raw)
        return record

    async def _get(self, request_id: str) -> Any:
        try:
            return await self._redis.get(KEY_PREFIX + request_id)
        except Exception as exc:
            raise Unavailable(f"Redis is unavailable ({type(exc).__name__}); retry") from None

    async def _claim(self, request_id: str) -> None:
        """Delete the record; whoever deletes it counts it, so feedback counts once."""
        try:
            deleted = await self._redis.delete(KEY_PREFIX + request_id)
        except Exception as exc:
            raise Unavailable(f"Redis is unavailable ({type(exc).__name__}); retry") from None
        if not deleted:
            raise self._unknown(request_id)

    def _unknown(self, request_id: str) -> NotFound:
        sampled = (
            f"; only {self._sample_rate:.0%} of predictions are kept for feedback "
            "(FITSERVE_INFERENCE__FEEDBACK_SAMPLE_RATE)"
            if self._sample_rate < 1.0
            else ""
        )
        return NotFound(
            f"no prediction with request id {request_id!r} in the last {self._ttl} s; "
            "feedback is accepted once per request id, within "
            f"FITSERVE_INFERENCE__FEEDBACK_TTL_SECONDS{sampled}",
            field="request_id",
        )

    def _count(self, record: dict[str, Any], values: list[Any], truth: np.ndarray) -> int:
        labels = (record["model"], str(record["version"]), record["output"])
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


def _output(record: dict[str, Any], wanted: str) -> tuple[str, dict[str, Any]]:
    """The output the labels are for, and what was predicted there."""
    outputs: dict[str, Any] = record.get("outputs") or {"": record}  # "": an older record
    if wanted:
        if wanted not in outputs and not (len(outputs) == 1 and "" in outputs):
            raise InvalidRequest(
                f"output {wanted[:100]!r} is not an output of the model; its outputs: "
                f"{', '.join(map(repr, sorted(outputs)))}",
                field="output",
            )
        return wanted, outputs.get(wanted, next(iter(outputs.values())))
    if len(outputs) > 1:
        raise InvalidRequest(
            f"the model has {len(outputs)} outputs ({', '.join(map(repr, sorted(outputs)))}); set "
            "output to the one the labels are for",
            field="output",
        )
    name, summary = next(iter(outputs.items()))
    return name, summary


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
