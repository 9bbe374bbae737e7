import sys

import numpy as np
import pytest

from fitserve import to_numpy, to_tensor
from fitserve.v1 import tensor_pb2

DataType = tensor_pb2.DataType

NUMERIC = [
    ("float16", DataType.DATA_TYPE_FLOAT16),
    ("float32", DataType.DATA_TYPE_FLOAT32),
    ("float64", DataType.DATA_TYPE_FLOAT64),
    ("int8", DataType.DATA_TYPE_INT8),
    ("int16", DataType.DATA_TYPE_INT16),
    ("int32", DataType.DATA_TYPE_INT32),
    ("int64", DataType.DATA_TYPE_INT64),
    ("uint8", DataType.DATA_TYPE_UINT8),
    ("uint16", DataType.DATA_TYPE_UINT16),
    ("uint32", DataType.DATA_TYPE_UINT32),
    ("uint64", DataType.DATA_TYPE_UINT64),
    ("bool", DataType.DATA_TYPE_BOOL),
]
SHAPES = [(), (0,), (0, 3), (5,), (2, 3), (2, 1, 4)]


def sample(dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    values = np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape) * 7 - 3
    if dtype == "bool":
        return values % 2 == 0
    if dtype.startswith("uint"):
        return np.abs(values).astype(dtype)
    if dtype.startswith("float"):
        return (values / 2).astype(dtype)
    return values.astype(dtype)


@pytest.mark.parametrize(("dtype", "data_type"), NUMERIC, ids=[name for name, _ in NUMERIC])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_numeric_round_trip_keeps_values_dtype_and_shape(dtype, data_type, shape):
    array = sample(dtype, shape)

    tensor = to_tensor(array)
    decoded = to_numpy(tensor)

    assert tensor.dtype == data_type
    assert list(tensor.shape) == list(shape)
    assert len(tensor.content) == array.size * array.itemsize
    assert decoded.dtype == np.dtype(dtype)
    assert decoded.shape == shape
    np.testing.assert_array_equal(decoded, array)


def test_content_is_little_endian_row_major():
    tensor = to_tensor(np.array([[1, 256], [2, 3]], dtype=np.int32))

    assert tensor.content == bytes.fromhex("01000000000100000200000003000000")


@pytest.mark.parametrize("dtype", [">i4", ">f8", ">u2", ">f2"])
def test_big_endian_input_is_sent_little_endian(dtype):
    array = np.array([1, 2, 300], dtype=dtype)

    tensor = to_tensor(array)
    decoded = to_numpy(tensor)

    assert tensor.content == array.astype(np.dtype(dtype).newbyteorder("<")).tobytes()
    np.testing.assert_array_equal(decoded, [1, 2, 300])
    assert decoded.dtype.isnative


@pytest.mark.parametrize(
    "view",
    [
        lambda a: a[:, ::2],
        lambda a: a.T,
        lambda a: np.asfortranarray(a),
        lambda a: a[::-1, 1:3],
    ],
    ids=["strided", "transposed", "fortran", "reversed"],
)
def test_non_contiguous_arrays_are_sent_in_row_major_order(view):
    array = view(np.arange(24, dtype=np.float32).reshape(4, 6))

    tensor = to_tensor(array)

    assert list(tensor.shape) == list(array.shape)
    assert tensor.content == np.ascontiguousarray(array).tobytes()
    np.testing.assert_array_equal(to_numpy(tensor), array)


def test_python_values_use_numpy_defaults():
    assert to_tensor([[1, 2], [3, 4]]).dtype == DataType.DATA_TYPE_INT64
    assert to_tensor(0.5).dtype == DataType.DATA_TYPE_FLOAT64
    assert list(to_tensor(0.5).shape) == []
    assert to_numpy(to_tensor(True)) == np.array(True)


def test_decoded_arrays_are_writable_and_native():
    decoded = to_numpy(to_tensor(np.ones((2, 2), dtype=">f4")))

    decoded[0, 0] = 5.0

    assert decoded.flags.writeable
    assert decoded.dtype.isnative
    assert decoded[0, 0] == 5.0


def test_str_arrays_travel_as_utf8_in_string_val():
    array = np.array([["a", "é"], ["", "xyz"]])

    tensor = to_tensor(array)
    decoded = to_numpy(tensor)

    assert tensor.dtype == DataType.DATA_TYPE_STRING
    assert list(tensor.shape) == [2, 2]
    assert list(tensor.string_val) == [b"a", "é".encode(), b"", b"xyz"]
    assert tensor.content == b""
    assert decoded.dtype == object
    assert decoded.tolist() == [[b"a", "é".encode()], [b"", b"xyz"]]


def test_bytes_and_object_string_arrays_round_trip():
    assert to_numpy(to_tensor(np.array([b"ab", b"c"]))).tolist() == [b"ab", b"c"]
    mixed = np.array(["ab", b"\xff"], dtype=object)
    assert to_numpy(to_tensor(mixed)).tolist() == [b"ab", b"\xff"]


def test_string_tensor_with_zero_rows():
    tensor = to_tensor(np.zeros((0, 2), dtype="U3"))

    decoded = to_numpy(tensor)

    assert decoded.shape == (0, 2)
    assert decoded.dtype == object


def test_object_arrays_of_other_things_are_refused():
    with pytest.raises(TypeError, match="str or bytes, found int"):
        to_tensor(np.array(["a", 1], dtype=object))


@pytest.mark.parametrize("dtype", ["complex64", "datetime64[s]", "float128"])
def test_unsupported_dtypes_are_refused(dtype):
    if not hasattr(np, dtype.split("[")[0]):
        pytest.skip(f"numpy has no {dtype} here")
    with pytest.raises(TypeError, match="cannot be sent"):
        to_tensor(np.zeros(2, dtype=dtype))


def test_bfloat16_round_trip_with_ml_dtypes():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    array = np.array([[1.0, -2.5], [0.0, 3.0]], dtype=ml_dtypes.bfloat16)

    tensor = to_tensor(array.T)
    decoded = to_numpy(tensor)

    assert tensor.dtype == DataType.DATA_TYPE_BFLOAT16
    assert tensor.content[:2] == b"\x80\x3f"  # 1.0 is 0x3f80
    assert decoded.dtype == np.dtype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(decoded.astype(np.float32), [[1.0, 0.0], [-2.5, 3.0]])


def test_bfloat16_without_ml_dtypes_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)
    tensor = tensor_pb2.Tensor(dtype=DataType.DATA_TYPE_BFLOAT16, shape=[1], content=b"\x80\x3f")

    with pytest.raises(TypeError, match="pip install ml_dtypes"):
        to_numpy(tensor)


@pytest.mark.parametrize(
    ("shape", "size", "match"),
    [([2, 2], 15, "15 bytes; shape \\[2, 2\\] of DATA_TYPE_FLOAT32 needs 16"), ([], 8, "needs 4")],
)
def test_wrong_content_length_is_an_error(shape, size, match):
    tensor = tensor_pb2.Tensor(dtype=DataType.DATA_TYPE_FLOAT32, shape=shape, content=b"\0" * size)

    with pytest.raises(ValueError, match=match):
        to_numpy(tensor)


def test_wrong_string_count_is_an_error():
    tensor = tensor_pb2.Tensor(dtype=DataType.DATA_TYPE_STRING, shape=[3], string_val=[b"a"])

    with pytest.raises(ValueError, match="1 elements; shape \\[3\\] needs 3"):
        to_numpy(tensor)


def test_negative_dimension_is_an_error():
    tensor = tensor_pb2.Tensor(dtype=DataType.DATA_TYPE_INT8, shape=[-1], content=b"")

    with pytest.raises(ValueError, match="negative"):
        to_numpy(tensor)


@pytest.mark.parametrize("data_type", [DataType.DATA_TYPE_UNSPECIFIED, 99])
def test_unknown_dtype_is_an_error(data_type):
    tensor = tensor_pb2.Tensor(dtype=data_type, shape=[1], content=b"\0")

    with pytest.raises(ValueError, match="unsupported dtype"):
        to_numpy(tensor)
