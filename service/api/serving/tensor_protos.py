"""TF Serving's TensorProto inputs as numpy arrays, checked before anything is allocated.

``tf.make_ndarray`` fills in what a TensorProto leaves out: a shape with no values decodes to
zeros of that shape, and fewer values than the shape are padded with the last one. So a
32-byte request declaring shape [2**20, 2**20] would make the server allocate terabytes. Here
the content must match the declared shape first: ``tensor_content`` of exactly shape x itemsize
bytes, or exactly one typed value per element (``float_val``, ``int_val``, ...).

TF's one convention that sends fewer values is kept: exactly one typed value is broadcast to
the shape (what ``tf.make_tensor_proto(0.0, shape=[2, 3])`` sends, and TF Serving accepts). It
decodes to a read-only view, and is counted against the request's byte budget
(``service.api.converters.TensorBudget``) at its full decoded size, as if it were sent whole;
anything else short of the shape is refused.

The checks compare lengths: O(1) per tensor, nothing copied.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, types_pb2

from service.api.converters import MAX_DIMS, TensorBudget
from service.errors import InvalidRequest

# DataType -> the typed field its values come in, and how many values make one element.
_FIELDS = {
    types_pb2.DT_FLOAT: ("float_val", 1),
    types_pb2.DT_DOUBLE: ("double_val", 1),
    types_pb2.DT_HALF: ("half_val", 1),
    types_pb2.DT_BFLOAT16: ("half_val", 1),
    types_pb2.DT_INT8: ("int_val", 1),
    types_pb2.DT_INT16: ("int_val", 1),
    types_pb2.DT_INT32: ("int_val", 1),
    types_pb2.DT_UINT8: ("int_val", 1),
    types_pb2.DT_UINT16: ("int_val", 1),
    types_pb2.DT_INT64: ("int64_val", 1),
    types_pb2.DT_UINT32: ("uint32_val", 1),
    types_pb2.DT_UINT64: ("uint64_val", 1),
    types_pb2.DT_BOOL: ("bool_val", 1),
    types_pb2.DT_COMPLEX64: ("scomplex_val", 2),
    types_pb2.DT_COMPLEX128: ("dcomplex_val", 2),
    types_pb2.DT_STRING: ("string_val", 1),
}


@dataclass(frozen=True)
class _Kind:
    """How one DataType is sent and decoded."""

    name: str  # "float32"
    field: str  # its typed value field
    per_element: int  # values per element in that field
    dtype: np.dtype[Any]

    @property
    def strings(self) -> bool:
        return self.dtype.kind == "O"


_KINDS = {
    enum: _Kind(
        tf.dtypes.as_dtype(enum).name,
        field,
        per,
        np.dtype(tf.dtypes.as_dtype(enum).as_numpy_dtype),
    )
    for enum, (field, per) in _FIELDS.items()
}
_SUPPORTED = ", ".join(sorted(types_pb2.DataType.Name(e) for e in _KINDS))


def to_array(name: str, proto: tensor_pb2.TensorProto, budget: TensorBudget) -> np.ndarray:
    """The array a TensorProto input holds, or InvalidRequest (ResourceExhausted past the
    budget) before anything of its size is allocated."""
    field = f"inputs[{name}]"
    kind = _KINDS.get(proto.dtype)
    if kind is None:
        raise InvalidRequest(
            f"input {name!r} has dtype {_dtype_name(proto.dtype)}; supported: {_SUPPORTED}",
            field=field,
        )
    if proto.tensor_shape.unknown_rank:
        raise InvalidRequest(
            f"input {name!r} has an unknown rank; send its shape (tensor_shape.dim)", field=field
        )
    shape = [d.size for d in proto.tensor_shape.dim[: MAX_DIMS + 1]]
    elements = budget.elements(name, shape, field)
    if proto.tensor_content:
        return _from_content(name, proto.tensor_content, kind, shape, elements, budget)
    values = getattr(proto, kind.field)
    sent, needed = len(values), elements * kind.per_element
    if sent == needed:  # every value sent: tf.make_ndarray fills nothing in
        budget.take(name, elements * kind.dtype.itemsize, "as sent", field)
        return _decoded(name, proto, field)
    if sent == kind.per_element:  # TF's broadcast of one value to the shape
        each = kind.dtype.itemsize + (len(values[0]) if kind.strings else 0)
        budget.take(name, elements * each, f"1 value broadcast to shape {shape}", field)
        single = tensor_pb2.TensorProto(dtype=proto.dtype)
        getattr(single, kind.field).extend(values)
        return np.broadcast_to(_decoded(name, single, field), shape)
    raise InvalidRequest(
        f"input {name!r} has {sent} values in {kind.field}; shape {shape} of {kind.name} needs "
        f"{needed} (or exactly {kind.per_element}, broadcast to the shape)"
        + (
            "" if kind.strings else f", or {elements * kind.dtype.itemsize} bytes of tensor_content"
        ),
        field=field,
    )


def _from_content(
    name: str, content: bytes, kind: _Kind, shape: list[int], elements: int, budget: TensorBudget
) -> np.ndarray:
    field = f"inputs[{name}]"
    if kind.strings:
        raise InvalidRequest(
            f"input {name!r} is a string tensor sent in tensor_content; send its values in "
            "string_val",
            field=field,
        )
    needed = elements * kind.dtype.itemsize
    if len(content) != needed:
        raise InvalidRequest(
            f"input {name!r} has {len(content)} bytes of tensor_content; shape {shape} of "
            f"{kind.name} needs {needed}",
            field=field,
        )
    budget.take(name, needed, "as sent", field)
    return np.frombuffer(content, dtype=kind.dtype).reshape(shape)


def _decoded(name: str, proto: tensor_pb2.TensorProto, field: str) -> np.ndarray:
    """``tf.make_ndarray`` of a proto whose values match its shape; values that do not fit
    the dtype (300 as int8) are the caller's mistake."""
    try:
        array: np.ndarray = tf.make_ndarray(proto)
    except (ValueError, OverflowError, TypeError) as exc:
        raise InvalidRequest(
            f"input {name!r} has values that do not fit {tf.dtypes.as_dtype(proto.dtype).name}: "
            f"{exc}",
            field=field,
        ) from None
    return array


def _dtype_name(dtype: int) -> str:
    try:
        return str(types_pb2.DataType.Name(dtype))
    except ValueError:
        return str(int(dtype))
