"""numpy arrays <-> `fitserve.v1.Tensor`.

Numeric and bool tensors travel as raw little-endian bytes in row-major order, so a
tensor costs one copy each way and no per-element encoding; strings travel one element
per `string_val` entry. bfloat16 needs `ml_dtypes` (the package TensorFlow and JAX use
for it); everything else needs numpy only.
"""

from __future__ import annotations

import importlib
import math
from typing import Any

import numpy as np
import numpy.typing as npt

from fitserve.v1 import tensor_pb2

__all__ = ["to_numpy", "to_tensor"]

DataType = tensor_pb2.DataType

_NUMERIC: dict[DataType.ValueType, np.dtype[Any]] = {
    DataType.DATA_TYPE_FLOAT32: np.dtype("<f4"),
    DataType.DATA_TYPE_FLOAT64: np.dtype("<f8"),
    DataType.DATA_TYPE_FLOAT16: np.dtype("<f2"),
    DataType.DATA_TYPE_INT8: np.dtype("i1"),
    DataType.DATA_TYPE_INT16: np.dtype("<i2"),
    DataType.DATA_TYPE_INT32: np.dtype("<i4"),
    DataType.DATA_TYPE_INT64: np.dtype("<i8"),
    DataType.DATA_TYPE_UINT8: np.dtype("u1"),
    DataType.DATA_TYPE_UINT16: np.dtype("<u2"),
    DataType.DATA_TYPE_UINT32: np.dtype("<u4"),
    DataType.DATA_TYPE_UINT64: np.dtype("<u8"),
    DataType.DATA_TYPE_BOOL: np.dtype("?"),
}
# Keyed by kind and size, so byte order and platform aliases ("l" vs "q") don't matter.
_BY_KIND: dict[tuple[str, int], DataType.ValueType] = {
    (dtype.kind, dtype.itemsize): data_type for data_type, dtype in _NUMERIC.items()
}
_BFLOAT16_BITS = np.dtype("<u2")


def to_tensor(value: npt.ArrayLike) -> tensor_pb2.Tensor:
    """Encode an array (or anything `np.asarray` accepts) as a `Tensor`.

    Any byte order and memory layout is accepted; the bytes sent are little-endian,
    row-major. str elements are sent as UTF-8.
    """
    array = np.asarray(value)
    shape = list(array.shape)
    if array.dtype.kind in "USTO":
        return tensor_pb2.Tensor(
            dtype=DataType.DATA_TYPE_STRING, shape=shape, string_val=_string_elements(array)
        )
    if array.dtype.name == "bfloat16":
        bits = np.ascontiguousarray(array).view(np.uint16).astype(_BFLOAT16_BITS)
        return tensor_pb2.Tensor(
            dtype=DataType.DATA_TYPE_BFLOAT16, shape=shape, content=bits.tobytes()
        )
    data_type = _data_type(array.dtype)
    content = array.astype(_NUMERIC[data_type], copy=False).tobytes(order="C")
    return tensor_pb2.Tensor(dtype=data_type, shape=shape, content=content)


def to_numpy(tensor: tensor_pb2.Tensor) -> npt.NDArray[Any]:
    """Decode a `Tensor` into a writable, native-byte-order array.

    DATA_TYPE_STRING decodes to an object array of `bytes` (the wire type); call
    `.astype(str)` on it for text.
    """
    shape = _shape(tensor)
    if tensor.dtype == DataType.DATA_TYPE_STRING:
        return _strings(tensor, shape)
    if tensor.dtype == DataType.DATA_TYPE_BFLOAT16:
        bits = _numeric(tensor, shape, _BFLOAT16_BITS)
        return bits.view(_bfloat16_dtype())
    dtype = _NUMERIC.get(tensor.dtype)
    if dtype is None:
        raise ValueError(f"tensor has unsupported dtype {_dtype_name(tensor.dtype)}")
    return _numeric(tensor, shape, dtype)


def _data_type(dtype: np.dtype[Any]) -> DataType.ValueType:
    data_type = _BY_KIND.get((dtype.kind, dtype.itemsize))
    if data_type is None:
        raise TypeError(
            f"arrays of dtype {dtype} cannot be sent; use one of float16/32/64, bfloat16, "
            "int8/16/32/64, uint8/16/32/64, bool or str"
        )
    return data_type


def _string_elements(array: npt.NDArray[Any]) -> list[bytes]:
    elements = []
    for element in array.ravel(order="C").tolist():
        if isinstance(element, str):
            element = element.encode("utf-8")
        if not isinstance(element, bytes):
            raise TypeError(
                f"object arrays can only hold str or bytes, found {type(element).__name__}"
            )
        elements.append(element)
    return elements


def _shape(tensor: tensor_pb2.Tensor) -> tuple[int, ...]:
    shape = tuple(tensor.shape)
    if any(size < 0 for size in shape):
        raise ValueError(f"tensor shape {list(shape)} has a negative dimension")
    return shape


def _numeric(
    tensor: tensor_pb2.Tensor, shape: tuple[int, ...], dtype: np.dtype[Any]
) -> npt.NDArray[Any]:
    expected = math.prod(shape) * dtype.itemsize
    if len(tensor.content) != expected:
        raise ValueError(
            f"tensor content has {len(tensor.content)} bytes; shape {list(shape)} of "
            f"{_dtype_name(tensor.dtype)} needs {expected}"
        )
    flat = np.frombuffer(tensor.content, dtype=dtype)
    return flat.astype(dtype.newbyteorder("=")).reshape(shape)


def _strings(tensor: tensor_pb2.Tensor, shape: tuple[int, ...]) -> npt.NDArray[Any]:
    if len(tensor.string_val) != math.prod(shape):
        raise ValueError(
            f"string tensor has {len(tensor.string_val)} elements; shape {list(shape)} "
            f"needs {math.prod(shape)}"
        )
    array = np.empty(len(tensor.string_val), dtype=object)
    array[:] = list(tensor.string_val)
    return array.reshape(shape)


def _bfloat16_dtype() -> np.dtype[Any]:
    try:
        module = importlib.import_module("ml_dtypes")
    except ImportError:
        raise TypeError(
            "decoding a bfloat16 tensor needs the ml_dtypes package: pip install ml_dtypes"
        ) from None
    dtype: np.dtype[Any] = np.dtype(module.bfloat16)
    return dtype


def _dtype_name(data_type: DataType.ValueType) -> str:
    try:
        return DataType.Name(data_type)
    except ValueError:
        return f"DataType({data_type})"
