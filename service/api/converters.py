"""Protobuf <-> domain conversions; servicers stay thin by calling these."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from google.protobuf import json_format, struct_pb2
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from fitserve.v1 import dataset_pb2, model_pb2, tensor_pb2, training_pb2
from service.domain.datasets.store import DatasetInfo
from service.domain.jobs import Job, JobEvent
from service.errors import ECHO_LIMIT, InvalidRequest, ResourceExhausted, shown
from service.plugins.registry import Plugin, Registry

_NUMPY_BY_WIRE = {
    tensor_pb2.DATA_TYPE_FLOAT32: "float32",
    tensor_pb2.DATA_TYPE_FLOAT64: "float64",
    tensor_pb2.DATA_TYPE_FLOAT16: "float16",
    tensor_pb2.DATA_TYPE_INT8: "int8",
    tensor_pb2.DATA_TYPE_INT16: "int16",
    tensor_pb2.DATA_TYPE_INT32: "int32",
    tensor_pb2.DATA_TYPE_INT64: "int64",
    tensor_pb2.DATA_TYPE_UINT8: "uint8",
    tensor_pb2.DATA_TYPE_UINT16: "uint16",
    tensor_pb2.DATA_TYPE_UINT32: "uint32",
    tensor_pb2.DATA_TYPE_UINT64: "uint64",
    tensor_pb2.DATA_TYPE_BOOL: "bool",
}
_WIRE_BY_NUMPY = {v: k for k, v in _NUMPY_BY_WIRE.items()}
MAX_DIMS = 32
MAX_TRANSPORT_BYTES = 2**31 - 1  # gRPC's own bound on one message


def _numpy_dtype(dtype: tensor_pb2.DataType.ValueType) -> np.dtype[Any]:
    if dtype == tensor_pb2.DATA_TYPE_BFLOAT16:
        import ml_dtypes

        bfloat16: np.dtype[Any] = np.dtype(ml_dtypes.bfloat16)
        return bfloat16
    if dtype not in _NUMPY_BY_WIRE:
        known = dtype in tensor_pb2.DataType.values()
        name = tensor_pb2.DataType.Name(dtype) if known else str(int(dtype))
        raise InvalidRequest(f"dtype {name} is not supported for numeric tensors")
    return np.dtype(_NUMPY_BY_WIRE[dtype]).newbyteorder("<")


class TensorBudget:
    """What the input tensors of one request may decode to together, checked from their
    shapes before anything is allocated: at most ``max_bytes`` bytes, and as many elements
    (none is smaller than a byte). One per request; the Predict servicers give it the
    server's message limit (FITSERVE_MAX_MESSAGE_BYTES), which a request whose content
    matches its shapes cannot exceed anyway; a TF Serving value broadcast to a shape can."""

    def __init__(self, max_bytes: int = MAX_TRANSPORT_BYTES) -> None:
        self.max_bytes = self.left = max_bytes

    def elements(self, name: str, shape: Sequence[int], field: str | None = None) -> int:
        """The element count of ``shape``, or InvalidRequest for a shape no input can have:
        over MAX_DIMS dimensions, a negative one, or more elements than ``max_bytes``. The
        product of the non-zero dimensions is bounded too, so [0, 2**62] is refused: numpy
        cannot hold it, and no request needs it. At most MAX_DIMS + 1 dimensions are read."""
        if len(shape) > MAX_DIMS:
            raise InvalidRequest(
                f"input {name!r} has an invalid shape: more than {MAX_DIMS} dimensions; expected "
                f"at most {MAX_DIMS}",
                field=field,
            )
        dims = [int(d) for d in shape]
        if any(d < 0 for d in dims):
            raise InvalidRequest(
                f"input {name!r} has an invalid shape {dims}: every dimension must be 0 or more",
                field=field,
            )
        product = 1
        for d in dims:
            product *= d or 1
            if product > self.max_bytes:
                raise InvalidRequest(
                    f"input {name!r} has an invalid shape {dims}: its non-zero dimensions "
                    f"multiply past the {self.max_bytes} elements one request may hold on this "
                    "server (from FITSERVE_MAX_MESSAGE_BYTES); expected a smaller shape",
                    field=field,
                )
        return 0 if 0 in dims else product

    def take(self, name: str, nbytes: int, how: str, field: str | None = None) -> None:
        """Charge an input's decoded size; ResourceExhausted past what is left."""
        if nbytes > self.left:
            raise ResourceExhausted(
                f"input {name!r} decodes to {nbytes} bytes ({how}), over what is left of this "
                f"server's limit of {self.max_bytes} bytes per request "
                "(FITSERVE_MAX_MESSAGE_BYTES); send fewer rows per call",
                field=field,
            )
        self.left -= nbytes


def tensor_to_array(
    tensor: tensor_pb2.Tensor,
    name: str,
    budget: TensorBudget | None = None,
    field: str | None = None,
) -> np.ndarray:
    """Decode a wire tensor; the byte length must equal shape x itemsize, and the shape fit
    ``budget`` (the request's; a fresh one at gRPC's own message limit when not given)."""
    budget = TensorBudget() if budget is None else budget
    count = budget.elements(name, tensor.shape[: MAX_DIMS + 1], field)
    dtype = _numpy_dtype(tensor.dtype)
    shape = tuple(tensor.shape)
    if len(tensor.content) != count * dtype.itemsize:
        raise InvalidRequest(
            f"input {name!r} has {len(tensor.content)} bytes; shape {list(shape)} of "
            f"{dtype.name} needs {count * dtype.itemsize}",
            field=field,
        )
    budget.take(name, len(tensor.content), "as sent", field)
    array = np.frombuffer(tensor.content, dtype=dtype).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=False)


def array_to_tensor(array: np.ndarray) -> tensor_pb2.Tensor:
    """Encode an array as raw little-endian bytes."""
    if array.dtype.name == "bfloat16":
        wire = tensor_pb2.DATA_TYPE_BFLOAT16
    else:
        wire = _WIRE_BY_NUMPY[array.dtype.name]
    little = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    return tensor_pb2.Tensor(dtype=wire, shape=list(array.shape), content=little.tobytes())


def wire_dtype(name: str) -> tensor_pb2.DataType.ValueType:
    """DataType value of a stored dtype name such as 'FLOAT32'."""
    return tensor_pb2.DataType.Value(f"DATA_TYPE_{name}")


def timestamp(seconds: float) -> Timestamp | None:
    """A Timestamp, or None for 'not yet'."""
    if not seconds:
        return None
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def message_to_data(message: Message) -> dict[str, Any]:
    """A request as plain data for domain validation (unset fields left out);
    INVALID_ARGUMENT naming the field for a NaN or infinite number in a Struct value (a
    layer argument, a parameter), which JSON, and so a Keras config, cannot hold."""
    try:
        data: dict[str, Any] = json_format.MessageToDict(message, preserving_proto_field_name=True)
    except json_format.SerializeToJsonError as exc:
        found = _non_finite(message)
        if found is None:
            raise InvalidRequest(f"the request cannot be read: {str(exc)[:200]}") from None
        path = found[0].replace("model.layers.layers[", "model.layers[", 1)  # as the domain
        raise InvalidRequest(
            f"{path if len(path) <= ECHO_LIMIT else shown(path)} is {found[1]}; layer "
            "arguments and parameters are JSON, which holds finite numbers only (no NaN or "
            "Infinity)",
            field=path,
        ) from None
    return data


def _non_finite(message: Message, path: str = "") -> tuple[str, float] | None:
    """The path and value of the first NaN or infinite number in a Struct value within
    ``message``."""
    if isinstance(message, struct_pb2.Value):
        kind = message.WhichOneof("kind")
        if kind == "number_value":
            return None if math.isfinite(message.number_value) else (path, message.number_value)
        if kind in ("struct_value", "list_value"):
            return _non_finite(getattr(message, kind), path)
        return None
    if isinstance(message, struct_pb2.Struct):
        items: list[tuple[str, Any]] = [(f"{path}.{k}", v) for k, v in message.fields.items()]
    elif isinstance(message, struct_pb2.ListValue):
        items = [(f"{path}[{i}]", v) for i, v in enumerate(message.values)]
    else:
        items = []
        for f, value in message.ListFields():
            name = f"{path}.{f.name}" if path else f.name
            if f.message_type is None:
                continue
            if f.message_type.GetOptions().map_entry:
                items += [(f"{name}[{k}]", v) for k, v in value.items()]
            elif f.is_repeated:
                items += [(f"{name}[{i}]", v) for i, v in enumerate(value)]
            else:
                items.append((name, value))
    for where, value in items:
        if isinstance(value, Message) and (found := _non_finite(value, where)):
            return found
    return None


def train_request_data(request: training_pb2.TrainRequest) -> dict[str, Any]:
    """A TrainRequest as plain data in the shape ``service.domain.job_specs`` validates."""
    data = _flat_compile(message_to_data(request))
    model = data.get("model", {})
    if "layers" in model:
        model["layers"] = model["layers"].get("layers", [])
    return data


def _flat_compile(data: dict[str, Any]) -> dict[str, Any]:
    """``compile.output_metrics`` as output name -> list of metrics (the wire wraps each
    list in a MetricList)."""
    per_output = data.get("compile", {}).get("output_metrics")
    if isinstance(per_output, dict):
        data["compile"]["output_metrics"] = {
            name: (value or {}).get("metrics", []) for name, value in per_output.items()
        }
    return data


def job_to_proto(job: Job, queue_position: int = -1) -> training_pb2.Job:
    """The wire form of a job record; ``queue_position`` is the caller's to find (-1:
    unknown, which every job not waiting in its queue is)."""
    return training_pb2.Job(
        id=job.id,
        kind=training_pb2.JobKind.Value(f"JOB_KIND_{job.kind.value}"),
        state=training_pb2.JobState.Value(f"JOB_STATE_{job.state.value}"),
        attempt=job.attempt,
        model_name=job.model_name,
        queue=job.queue,
        queue_position=queue_position,
        history=[training_pb2.EpochRecord(epoch=e["epoch"], logs=e["logs"]) for e in job.history],
        metrics=job.metrics,
        model_version=job.model_version,
        error=training_pb2.JobError(reason=job.error_reason, message=job.error_message)
        if job.error_reason
        else None,
        created_at=timestamp(job.created_at),
        started_at=timestamp(job.started_at),
        finished_at=timestamp(job.finished_at),
        request_json=json.dumps(job.request),
        labels=job.labels,
        owner=job.owner,
    )


def event_to_proto(job_id: str, event: JobEvent) -> training_pb2.JobEvent:
    """The wire form of one job event."""
    out = training_pb2.JobEvent(event_id=event.id, job_id=job_id, time=timestamp(event.time))
    d = event.data
    if event.type == "state":
        error = d.get("error") or {}
        out.state_changed.CopyFrom(
            training_pb2.StateChanged(
                state=training_pb2.JobState.Value(f"JOB_STATE_{d['state']}"),
                attempt=d.get("attempt", 0),
                error=training_pb2.JobError(**error) if error else None,
                model_version=d.get("model_version", 0),
                metrics=d.get("metrics", {}),
            )
        )
    elif event.type == "epoch":
        out.epoch_ended.CopyFrom(training_pb2.EpochEnded(**d))
    elif event.type == "batch":
        out.batch_progress.CopyFrom(training_pb2.BatchProgress(**d))
    elif event.type == "threshold":
        out.threshold.CopyFrom(training_pb2.ThresholdReached(**d))
    else:
        out.log.CopyFrom(
            training_pb2.LogLine(level=d.get("level", "INFO"), message=d.get("message", ""))
        )
    return out


def dataset_to_proto(info: DatasetInfo) -> dataset_pb2.Dataset:
    """The wire form of a stored dataset."""
    return dataset_pb2.Dataset(
        id=info.id,
        name=info.name,
        format=info.format,
        size_bytes=info.size_bytes,
        arrays=[
            dataset_pb2.ArrayInfo(name=a.name, dtype=wire_dtype(a.dtype.upper()), shape=a.shape)
            for a in info.arrays
        ],
        num_examples=info.num_examples,
        created_at=timestamp(info.created_at),
    )


def signature_to_proto(signature: dict[str, list[dict[str, Any]]]) -> tensor_pb2.Signature:
    """A stored signature (fitserve.json) in wire form."""

    def spec(s: dict[str, Any]) -> tensor_pb2.TensorSpec:
        return tensor_pb2.TensorSpec(name=s["name"], dtype=wire_dtype(s["dtype"]), shape=s["shape"])

    return tensor_pb2.Signature(
        inputs=[spec(s) for s in signature.get("inputs", [])],
        outputs=[spec(s) for s in signature.get("outputs", [])],
    )


def version_to_proto(
    name: str, version: int, meta: dict[str, Any], aliases: dict[str, int], uri: str
) -> model_pb2.ModelVersion:
    """The wire form of a stored version's metadata."""
    parent = meta.get("parent") or {}
    return model_pb2.ModelVersion(
        model_name=name,
        version=version,
        created_at=timestamp(meta.get("created_at", 0.0)),
        job_id=meta.get("job_id", ""),
        parent_model=parent.get("model", ""),
        parent_version=parent.get("version", 0),
        metrics=meta.get("metrics", {}),
        evaluations=[
            model_pb2.Evaluation(
                dataset=e["dataset"],
                metrics=e["metrics"],
                job_id=e.get("job_id", ""),
                created_at=timestamp(e.get("created_at", 0.0)),
            )
            for e in meta.get("evaluations", [])
        ],
        signature=signature_to_proto(meta.get("signature", {})),
        aliases=sorted(a for a, v in aliases.items() if v == version),
        dataset=meta.get("dataset", ""),
        metadata_json=json.dumps(meta, sort_keys=True),
        uri=uri,
        labels=meta.get("labels", {}),
    )


def evaluate_request_data(request: training_pb2.EvaluateRequest) -> dict[str, Any]:
    """An EvaluateRequest as plain data in the shape ``EvaluateSpec`` validates."""
    data = message_to_data(request)
    data.pop("model", None)
    ref = request.model
    selector = ref.WhichOneof("selector")
    return data | {
        "model_name": ref.name,
        "version": ref.version if selector == "version" else 0,
        "alias": ref.alias if selector == "alias" else "",
    }


def fine_tune_request_data(request: training_pb2.FineTuneRequest) -> dict[str, Any]:
    """A FineTuneRequest as plain data in the shape ``FineTuneSpec`` validates.

    ``freeze`` is always present, so a request with no strategy is told which fields to
    set rather than that ``freeze`` is missing.
    """
    data = _flat_compile(message_to_data(request))
    ref = request.base
    selector = ref.WhichOneof("selector")
    data["base"] = {
        "name": ref.name,
        "version": ref.version if selector == "version" else 0,
        "alias": ref.alias if selector == "alias" else "",
    }
    data.setdefault("freeze", {})
    return data


def plugins_to_proto(registry: Registry, kind: str = "") -> training_pb2.ListPluginsResponse:
    """The registry in wire form, only ``kind`` when given."""
    return training_pb2.ListPluginsResponse(
        plugins=[plugin_to_proto(p) for p in registry.plugins if not kind or p.kind == kind],
        failures=[
            training_pb2.PluginFailure(source=f.source, error=f.error) for f in registry.failures
        ],
    )


def plugin_to_proto(plugin: Plugin) -> training_pb2.Plugin:
    """One plugin object in wire form."""
    out = training_pb2.Plugin(
        name=plugin.name,
        kind=plugin.kind.value,
        form=plugin.form.value,
        signature=plugin.signature(),
        doc=plugin.doc,
        package=plugin.package,
        distribution=plugin.distribution,
        version=plugin.version,
        module=plugin.module,
    )
    for param in plugin.params:
        entry = out.params.add(name=param.name, type=param.type, required=param.required)
        if not param.required:
            json_format.ParseDict(param.default, entry.default)
    return out
