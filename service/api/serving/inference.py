"""InferenceService: decodes tensors, awaits the batcher, encodes the outputs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable

import numpy as np

from fitserve.v1 import inference_pb2, inference_pb2_grpc, tensor_pb2
from service.api import converters
from service.api.status import Context, Edge, Servicer, code_of, unary
from service.domain.names import check_name
from service.errors import FitserveError, InvalidRequest, NotFound
from service.inference.feedback import FeedbackLog
from service.inference.models import Prediction, ServingModels
from service.logs import request_id_var
from service.metrics import Metrics

_STATES = {
    "NOT_LOADED": inference_pb2.ModelVersionStatus.STATE_NOT_LOADED,
    "LOADING": inference_pb2.ModelVersionStatus.STATE_LOADING,
    "AVAILABLE": inference_pb2.ModelVersionStatus.STATE_AVAILABLE,
    "UNLOADING": inference_pb2.ModelVersionStatus.STATE_UNLOADING,
    "FAILED": inference_pb2.ModelVersionStatus.STATE_FAILED,
}


def deadline_of(context: Context) -> float | None:
    """The caller's gRPC deadline as a ``time.monotonic()`` instant (None: no deadline)."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


async def predict_counted(
    models: ServingModels,
    metrics: Metrics,
    method: str,
    name: str,
    selector: tuple[int, str],
    inputs: dict[str, np.ndarray],
    deadline: float | None,
) -> Prediction:
    """Resolve and predict, counting the outcome by model, version, method and code.

    Before a name resolves, the model and version labels stay empty: a caller's typo must
    not become a Prometheus series.
    """
    version = ""
    try:
        resolved = await models.resolve(name, *selector)
        version = str(resolved)
        result = await models.predict(name, resolved, inputs, deadline)
    except Exception as exc:
        code = code_of(exc).name if isinstance(exc, FitserveError) else "INTERNAL"
        metrics.predict_requests.labels(name if version else "", version, method, code).inc()
        raise
    metrics.predict_requests.labels(name, version, method, "OK").inc()
    return result


class InferenceServicer(Servicer, inference_pb2_grpc.InferenceServiceServicer):
    """Thin handlers over ServingModels and the feedback log."""

    def __init__(self, edge: Edge, models: ServingModels, feedback: FeedbackLog) -> None:
        super().__init__(edge)
        self._models, self._feedback = models, feedback

    @unary
    async def Predict(
        self, request: inference_pb2.PredictRequest, context: Context
    ) -> inference_pb2.PredictResponse:
        """Run a model version on named tensors; the answer names the version."""
        name = _model_name(request.model.name)
        if not request.inputs:
            raise InvalidRequest("inputs is empty; send at least one named tensor", field="inputs")
        inputs = {k: converters.tensor_to_array(t, k) for k, t in request.inputs.items()}
        result = await predict_counted(
            self._models,
            self.edge.metrics,
            "Predict",
            name,
            _selector(request.model),
            inputs,
            deadline_of(context),
        )
        request_id = request_id_var.get()
        self._feedback.remember(
            request_id, name, result.version, next(iter(result.outputs.values()))
        )
        return inference_pb2.PredictResponse(
            model_name=result.model,
            version=result.version,
            request_id=request_id,
            outputs={
                k: converters.array_to_tensor(v)
                for k, v in filtered(result.outputs, request.output_filter).items()
            },
        )

    @unary
    async def Feedback(
        self, request: inference_pb2.FeedbackRequest, context: Context
    ) -> inference_pb2.FeedbackResponse:
        """Score true labels against an earlier prediction (any replica's)."""
        if not request.request_id:
            raise InvalidRequest("request_id is required", field="request_id")
        if not request.HasField("labels"):
            raise InvalidRequest("labels are required, one per predicted row", field="labels")
        labels = converters.tensor_to_array(request.labels, "labels")
        result = await self._feedback.score(request.request_id, labels)
        return inference_pb2.FeedbackResponse(
            model_name=result.model,
            version=result.version,
            rows=result.rows,
            correct=result.correct,
        )

    @unary
    async def GetModelStatus(
        self, request: inference_pb2.GetModelStatusRequest, context: Context
    ) -> inference_pb2.GetModelStatusResponse:
        """Load state of a model's versions on this server."""
        name = check_name(request.model_name, "model_name", "model name")
        states = await asyncio.to_thread(self._models.status, name)
        if request.version:
            states = {v: s for v, s in states.items() if v == request.version}
        if not states:
            which = f"version {request.version} of " if request.version else ""
            raise NotFound(f"no {which}model {name!r} in the store")
        return inference_pb2.GetModelStatusResponse(
            model_name=name,
            versions=[
                inference_pb2.ModelVersionStatus(version=v, state=_STATES[s.value], error=reason)
                for v, (s, reason) in sorted(states.items())
            ],
        )


def _model_name(name: str) -> str:
    if not name:
        raise InvalidRequest("model.name is required", field="model.name")
    return check_name(name, "model.name", "model name")


def _selector(ref: tensor_pb2.ModelRef) -> tuple[int, str]:
    which = ref.WhichOneof("selector")
    return (ref.version if which == "version" else 0), (ref.alias if which == "alias" else "")


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
