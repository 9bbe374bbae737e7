"""InferenceService: decodes tensors, awaits the batcher, encodes the outputs."""

from __future__ import annotations

import asyncio

from fitserve.v1 import inference_pb2, inference_pb2_grpc, tensor_pb2
from service.api import converters
from service.api.serving.predicting import CountedPredictor, deadline_of, filtered
from service.api.status import Context, RpcOutcomes, Servicer, unary
from service.domain.resource_names import check_name
from service.errors import InvalidRequest, NotFound
from service.inference.feedback import FeedbackLog
from service.inference.models import ServingModels
from service.logs import request_id_var

_STATES = {
    "NOT_LOADED": inference_pb2.ModelVersionStatus.STATE_NOT_LOADED,
    "LOADING": inference_pb2.ModelVersionStatus.STATE_LOADING,
    "AVAILABLE": inference_pb2.ModelVersionStatus.STATE_AVAILABLE,
    "UNLOADING": inference_pb2.ModelVersionStatus.STATE_UNLOADING,
    "FAILED": inference_pb2.ModelVersionStatus.STATE_FAILED,
}


class InferenceServicer(Servicer, inference_pb2_grpc.InferenceServiceServicer):
    """Thin handlers over ServingModels and the feedback log."""

    def __init__(
        self,
        outcomes: RpcOutcomes,
        models: ServingModels,
        feedback: FeedbackLog,
        max_request_bytes: int = converters.MAX_TRANSPORT_BYTES,
    ) -> None:
        super().__init__(outcomes)
        self._models, self._feedback = models, feedback
        self._max_request_bytes = max_request_bytes  # what one request's tensors decode to
        self._predictor = CountedPredictor(models, outcomes.metrics, "Predict")

    @unary
    async def Predict(
        self, request: inference_pb2.PredictRequest, context: Context
    ) -> inference_pb2.PredictResponse:
        """Run a model version on named tensors, batched with other calls; NOT_FOUND for an
        unknown model, version or alias, RESOURCE_EXHAUSTED (retry hint) on a full queue."""
        name = _model_name(request.model.name)
        if not request.inputs:
            raise InvalidRequest("inputs is empty; send at least one named tensor", field="inputs")
        budget = converters.TensorBudget(self._max_request_bytes)
        inputs = {
            k: converters.tensor_to_array(t, k, budget, f"inputs[{k}]")
            for k, t in request.inputs.items()
        }
        result = await self._predictor.predict(
            name, _selector(request.model), inputs, deadline_of(context)
        )
        request_id = request_id_var.get()
        self._feedback.remember(request_id, name, result.version, result.outputs)
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
        """Score true labels against an earlier prediction (any replica's), for live accuracy;
        NOT_FOUND for an unknown or expired request_id, INVALID_ARGUMENT for mismatched rows."""
        if not request.request_id:
            raise InvalidRequest("request_id is required", field="request_id")
        if not request.HasField("labels"):
            raise InvalidRequest("labels are required, one per predicted row", field="labels")
        budget = converters.TensorBudget(self._max_request_bytes)
        labels = converters.tensor_to_array(request.labels, "labels", budget, "labels")
        result = await self._feedback.score(request.request_id, labels, request.output)
        return inference_pb2.FeedbackResponse(
            model_name=result.model,
            version=result.version,
            rows=result.rows,
            correct=result.correct,
            output=result.output,
        )

    @unary
    async def GetModelStatus(
        self, request: inference_pb2.GetModelStatusRequest, context: Context
    ) -> inference_pb2.GetModelStatusResponse:
        """Load state of a model's versions on this server, to tell when it can serve them;
        NOT_FOUND when the store has no such model or version."""
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
