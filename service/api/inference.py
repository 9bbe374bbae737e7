"""InferenceService: decodes tensors, awaits the batcher, encodes the outputs."""

from __future__ import annotations

import asyncio
import uuid

from fitserve.v1 import inference_pb2, inference_pb2_grpc
from service.api import converters
from service.api.status import Context, Edge, Servicer, unary
from service.domain.names import check_name
from service.errors import InvalidRequest, NotFound, Unimplemented
from service.inference.models import ServingModels

_STATES = {
    "NOT_LOADED": inference_pb2.ModelVersionStatus.STATE_NOT_LOADED,
    "LOADING": inference_pb2.ModelVersionStatus.STATE_LOADING,
    "AVAILABLE": inference_pb2.ModelVersionStatus.STATE_AVAILABLE,
    "UNLOADING": inference_pb2.ModelVersionStatus.STATE_UNLOADING,
    "FAILED": inference_pb2.ModelVersionStatus.STATE_FAILED,
}


class InferenceServicer(Servicer, inference_pb2_grpc.InferenceServiceServicer):
    """Thin handlers over ServingModels."""

    def __init__(self, edge: Edge, models: ServingModels) -> None:
        super().__init__(edge)
        self._models = models

    @unary
    async def Predict(
        self, request: inference_pb2.PredictRequest, context: Context
    ) -> inference_pb2.PredictResponse:
        ref = request.model
        if not ref.name:
            raise InvalidRequest("model.name is required", field="model.name")
        check_name(ref.name, "model.name", "model name")
        if not request.inputs:
            raise InvalidRequest("inputs is empty; send at least one named tensor", field="inputs")
        inputs = {k: converters.tensor_to_array(t, k) for k, t in request.inputs.items()}
        which = ref.WhichOneof("selector")
        result = await self._models.predict(
            ref.name,
            inputs,
            version=ref.version if which == "version" else 0,
            alias=ref.alias if which == "alias" else "",
        )
        outputs = result.outputs
        if request.output_filter:
            unknown = sorted(set(request.output_filter) - outputs.keys())
            if unknown:
                raise InvalidRequest(
                    f"unknown output {unknown[0]!r}; the model has {sorted(outputs)}"
                )
            outputs = {k: outputs[k] for k in request.output_filter}
        return inference_pb2.PredictResponse(
            model_name=result.model,
            version=result.version,
            request_id=uuid.uuid4().hex,
            outputs={k: converters.array_to_tensor(v) for k, v in outputs.items()},
        )

    @unary
    async def Feedback(
        self, request: inference_pb2.FeedbackRequest, context: Context
    ) -> inference_pb2.FeedbackResponse:
        raise Unimplemented("Feedback is not implemented in this release; it is planned (issue 4)")

    @unary
    async def GetModelStatus(
        self, request: inference_pb2.GetModelStatusRequest, context: Context
    ) -> inference_pb2.GetModelStatusResponse:
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
