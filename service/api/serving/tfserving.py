"""tensorflow.serving.PredictionService (Predict, GetModelMetadata) over fitserve's models.

Existing TF Serving clients work unchanged: the same protos (tensorflow-serving-api), the
same ``ModelSpec`` (``version`` or ``version_label``, which fitserve reads as an alias),
the ``serving_default`` signature. Requests go through the same routes and batchers as
fitserve's own Predict, so both APIs answer from the same loaded versions.
"""

from __future__ import annotations

from typing import Any

import grpc
import tensorflow as tf
from tensorflow.core.framework import tensor_shape_pb2
from tensorflow.core.protobuf import meta_graph_pb2
from tensorflow_serving.apis import (  # type: ignore[import-untyped]
    get_model_metadata_pb2,
    model_pb2,
    predict_pb2,
    prediction_service_pb2,
    prediction_service_pb2_grpc,
)

from service.api.converters import MAX_TRANSPORT_BYTES, TensorBudget
from service.api.serving.predicting import CountedPredictor, deadline_of, filtered
from service.api.serving.tensor_protos import to_array
from service.api.status import Context, RpcOutcomes, Servicer, unary
from service.domain.resource_names import check_name
from service.errors import InvalidRequest
from service.inference.models import ServingModels
from service.inference.servable import TensorSpec

SERVICE_NAME: str = prediction_service_pb2.DESCRIPTOR.services_by_name[
    "PredictionService"
].full_name
SIGNATURE = "serving_default"
_PREDICT_METHOD = "tensorflow/serving/predict"


class PredictionServicer(Servicer, prediction_service_pb2_grpc.PredictionServiceServicer):  # type: ignore[misc]
    """TF Serving's Predict and GetModelMetadata; its other methods answer UNIMPLEMENTED."""

    def __init__(
        self,
        outcomes: RpcOutcomes,
        models: ServingModels,
        max_request_bytes: int = MAX_TRANSPORT_BYTES,
    ) -> None:
        super().__init__(outcomes)
        self._models = models
        self._max_request_bytes = max_request_bytes  # what one request's tensors decode to
        self._predictor = CountedPredictor(models, outcomes.metrics, "tfserving.Predict")

    @unary
    async def Predict(self, request: Any, context: Context) -> Any:
        """TF Serving's Predict, so its clients work unchanged: TensorProtos in and out;
        NOT_FOUND for an unknown model or version, RESOURCE_EXHAUSTED on a full queue;
        INVALID_ARGUMENT for a TensorProto whose values do not match its shape (checked
        before anything is allocated: ``service.api.serving.tensor_protos``)."""
        name, selector = _model_spec(request.model_spec)
        if not request.inputs:
            raise InvalidRequest("inputs is empty; send at least one named tensor", field="inputs")
        budget = TensorBudget(self._max_request_bytes)
        inputs = {k: to_array(k, t, budget) for k, t in request.inputs.items()}
        result = await self._predictor.predict(name, selector, inputs, deadline_of(context))
        outputs = filtered(result.outputs, request.output_filter)
        response = predict_pb2.PredictResponse(model_spec=_spec_of(name, result.version))
        for key, value in outputs.items():
            response.outputs[key].CopyFrom(tf.make_tensor_proto(value))
        return response

    @unary
    async def GetModelMetadata(self, request: Any, context: Context) -> Any:
        """The serving signature as TF Serving reports it, for clients that build requests from
        it; NOT_FOUND for an unknown model or version, INVALID_ARGUMENT for other metadata."""
        name, selector = _model_spec(request.model_spec)
        unsupported = sorted(set(request.metadata_field) - {"signature_def"})
        if unsupported or not request.metadata_field:
            raise InvalidRequest(
                f"metadata_field must be ['signature_def'], got {list(request.metadata_field)}",
                field="metadata_field",
            )
        version = await self._models.resolve(name, *selector)
        inputs, outputs = await self._models.signature(name, version)
        signatures = get_model_metadata_pb2.SignatureDefMap()
        signatures.signature_def[SIGNATURE].CopyFrom(_signature_def(inputs, outputs))
        response = get_model_metadata_pb2.GetModelMetadataResponse(
            model_spec=_spec_of(name, version)
        )
        response.metadata["signature_def"].Pack(signatures)
        return response


def add_to_server(servicer: PredictionServicer, server: grpc.aio.Server) -> None:
    """Register the TF Serving PredictionService on ``server``."""
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(servicer, server)


def _model_spec(spec: Any) -> tuple[str, tuple[int, str]]:
    """Model name and (version, alias) of a ModelSpec; only serving_default is served."""
    if not spec.name:
        raise InvalidRequest("model_spec.name is required", field="model_spec.name")
    name = check_name(spec.name, "model_spec.name", "model name")
    if spec.signature_name not in ("", SIGNATURE):
        raise InvalidRequest(
            f"signature {spec.signature_name!r} not found; model {name!r} serves {SIGNATURE!r}",
            field="model_spec.signature_name",
        )
    which = spec.WhichOneof("version_choice")
    if which == "version":
        return name, (int(spec.version.value), "")
    return name, (0, spec.version_label if which == "version_label" else "")


def _spec_of(name: str, version: int) -> Any:
    spec = model_pb2.ModelSpec(name=name, signature_name=SIGNATURE)
    spec.version.value = version
    return spec


def _signature_def(inputs: list[TensorSpec], outputs: list[TensorSpec]) -> Any:
    return meta_graph_pb2.SignatureDef(
        inputs={s.name: _tensor_info(s, f"{SIGNATURE}_{s.name}:0") for s in inputs},
        outputs={
            s.name: _tensor_info(s, f"StatefulPartitionedCall:{i}") for i, s in enumerate(outputs)
        },
        method_name=_PREDICT_METHOD,
    )


def _tensor_info(spec: TensorSpec, tensor_name: str) -> Any:
    dims = [tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in spec.shape]
    return meta_graph_pb2.TensorInfo(
        name=tensor_name,
        dtype=tf.as_dtype(spec.dtype).as_datatype_enum,
        tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=dims),
    )
