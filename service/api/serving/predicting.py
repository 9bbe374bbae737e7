"""What both Predict APIs (fitserve's and TF Serving's) share: the caller's deadline,
prediction with its outcomes counted, and output filtering."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from service.api.status import Context
from service.errors import FitserveError, InvalidRequest
from service.inference.models import Prediction, ServingModels
from service.metrics import Metrics


def deadline_of(context: Context) -> float | None:
    """The caller's gRPC deadline as a ``time.monotonic()`` instant (None: no deadline)."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


@dataclass(frozen=True)
class CountedPredictor:
    """Prediction for one of the Predict APIs, each outcome counted under its ``method``
    label by model, version and code, so both APIs count alike, and timed by code once the
    version is known (a call cancelled or past its deadline too: CANCELLED or
    DEADLINE_EXCEEDED, as gRPC reports it)."""

    models: ServingModels
    metrics: Metrics
    method: str

    async def predict(
        self,
        name: str,
        selector: tuple[int, str],
        inputs: dict[str, np.ndarray],
        deadline: float | None,
    ) -> Prediction:
        """Resolve ``selector`` (version, alias) of model ``name`` and predict.

        Before a name resolves, the model and version labels stay empty: a caller's typo
        must not become a Prometheus series.
        """
        version = ""
        started = time.monotonic()
        try:
            resolved = await self.models.resolve(name, *selector)
            version = str(resolved)
            started = time.monotonic()
            result = await self.models.predict(name, resolved, inputs, deadline)
        except asyncio.CancelledError:
            gone = deadline is not None and time.monotonic() >= deadline
            self._count(name, version, "DEADLINE_EXCEEDED" if gone else "CANCELLED", started)
            raise
        except Exception as exc:
            code = exc.code if isinstance(exc, FitserveError) else "INTERNAL"
            self._count(name, version, code, started)
            raise
        late = deadline is not None and time.monotonic() >= deadline  # gRPC sends no answer
        self._count(name, version, "DEADLINE_EXCEEDED" if late else "OK", started)
        return result

    def _count(self, name: str, version: str, code: str, started: float) -> None:
        if not version:  # not resolved: no series for a caller's typo
            self.metrics.predict_requests.labels("", "", self.method, code).inc()
            return
        self.metrics.predict_requests.labels(name, version, self.method, code).inc()
        self.metrics.predict_latency.labels(name, version, code).observe(time.monotonic() - started)


def filtered(outputs: dict[str, np.ndarray], wanted: Iterable[str]) -> dict[str, np.ndarray]:
    """Only the outputs a caller asked for (all when it asked for none)."""
    names = list(wanted)
    if not names:
        return outputs
    if unknown := sorted(set(names) - outputs.keys()):
        raise InvalidRequest(
            f"unknown output {unknown[0]!r}; the model has {sorted(outputs)}", field="output_filter"
        )
    return {k: outputs[k] for k in names}
