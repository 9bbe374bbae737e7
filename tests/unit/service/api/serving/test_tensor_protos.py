"""TF Serving TensorProto inputs: the content must match the declared shape before anything
is allocated; one typed value may be broadcast, within the request's byte budget."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, types_pb2

from service.api.converters import TensorBudget
from service.api.serving.tensor_protos import to_array
from service.errors import InvalidRequest, ResourceExhausted

MIB = 1024 * 1024


def _declared(dtype: int, *shape: int) -> tensor_pb2.TensorProto:
    """A TensorProto with a shape and no values: 32 bytes on the wire, whatever the shape."""
    proto = tensor_pb2.TensorProto(dtype=dtype)
    for size in shape:
        proto.tensor_shape.dim.add(size=size)
    return proto


def test_a_shape_without_values_is_refused_before_anything_is_allocated():
    proto = _declared(types_pb2.DT_FLOAT, 4096, 4096)  # tf.make_ndarray: 64 MiB of zeros
    assert len(proto.SerializeToString()) < 32

    tracemalloc.start()
    try:
        with pytest.raises(InvalidRequest) as refused:
            to_array("x", proto, TensorBudget(256 * MIB))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert peak < MIB
    assert refused.value.message == (
        "input 'x' has 0 values in float_val; shape [4096, 4096] of float32 needs 16777216 "
        "(or exactly 1, broadcast to the shape), or 67108864 bytes of tensor_content"
    )
    assert refused.value.field == "inputs[x]"


def test_fewer_values_than_the_shape_are_refused_not_padded():
    proto = tf.make_tensor_proto([1, 2], shape=[4])  # tf.make_ndarray: [1, 2, 2, 2]

    with pytest.raises(InvalidRequest, match="has 2 values in int_val; shape \\[4\\] of int32"):
        to_array("x", proto, TensorBudget(MIB))


def test_one_value_is_broadcast_to_the_shape_as_tf_serving_does():
    array = to_array("x", tf.make_tensor_proto(0.5, shape=[2, 3]), TensorBudget(MIB))

    np.testing.assert_array_equal(array, np.full((2, 3), 0.5, np.float32))
    assert not array.flags.writeable  # a view of the one value, nothing allocated


def test_a_broadcast_is_charged_its_decoded_size_and_refused_past_the_budget():
    budget = TensorBudget(MIB)
    with pytest.raises(ResourceExhausted) as refused:
        to_array("x", tf.make_tensor_proto(1.0, shape=[512, 1024]), budget)  # 2 MiB

    assert "decodes to 2097152 bytes (1 value broadcast to shape [512, 1024])" in (
        refused.value.message
    )
    assert "FITSERVE_MAX_MESSAGE_BYTES" in refused.value.message
    assert refused.value.retry_after_seconds is None  # waiting does not help


def test_the_budget_is_shared_by_the_inputs_of_one_request():
    budget = TensorBudget(MIB)
    to_array("a", tf.make_tensor_proto(1.0, shape=[192, 1024]), budget)  # 0.75 MiB
    with pytest.raises(ResourceExhausted, match="input 'b' decodes to 786432 bytes"):
        to_array("b", tf.make_tensor_proto(1.0, shape=[192, 1024]), budget)


def test_a_string_broadcast_is_charged_for_every_copy():
    with pytest.raises(ResourceExhausted, match="decodes to 1056768 bytes"):
        # 1024 copies of a 1 KiB string (plus a pointer each): what TF materializes
        to_array("s", tf.make_tensor_proto(b"x" * 1024, shape=[1024]), TensorBudget(MIB))


@pytest.mark.parametrize(
    "value",
    [
        np.arange(6, dtype=np.float32).reshape(2, 3),  # tensor_content
        np.arange(6, dtype=np.int8),
        np.arange(6, dtype=np.float16),
        np.array([True, False]),
        np.arange(4, dtype=np.complex64),
        np.array([b"ab", b"c"]),
        np.float32(3.0),  # a scalar, in float_val
        np.zeros((0, 3), np.float32),
    ],
)
def test_inputs_whose_values_match_their_shape_decode_as_tf_does(value):
    proto = tf.make_tensor_proto(value)

    np.testing.assert_array_equal(to_array("x", proto, TensorBudget(MIB)), tf.make_ndarray(proto))


def test_typed_values_one_per_element_decode():
    proto = _declared(types_pb2.DT_FLOAT, 2, 2)
    proto.float_val.extend([1, 2, 3, 4])

    np.testing.assert_array_equal(to_array("x", proto, TensorBudget(MIB)), [[1, 2], [3, 4]])


@pytest.mark.parametrize(
    ("proto", "message"),
    [
        (_declared(types_pb2.DT_FLOAT, 0, 2**62), "has an invalid shape [0, 4611686018427387904]"),
        (_declared(types_pb2.DT_FLOAT, 2**31, 2**31), "its non-zero dimensions multiply past"),
        (_declared(types_pb2.DT_FLOAT, -1, 3), "every dimension must be 0 or more"),
        (_declared(types_pb2.DT_FLOAT, *[1] * 1000), "more than 32 dimensions"),
        (_declared(types_pb2.DT_RESOURCE, 1), "has dtype DT_RESOURCE; supported: DT_BFLOAT16"),
        (_declared(77, 1), "has dtype 77; supported"),
        (
            tensor_pb2.TensorProto(
                dtype=types_pb2.DT_FLOAT,
                tensor_shape={"dim": [{"size": 3}]},
                tensor_content=b"\0" * 8,
            ),
            "has 8 bytes of tensor_content; shape [3] of float32 needs 12",
        ),
        (
            tensor_pb2.TensorProto(
                dtype=types_pb2.DT_STRING, tensor_shape={"dim": [{"size": 1}]}, tensor_content=b"a"
            ),
            "send its values in string_val",
        ),
        (
            tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, tensor_shape={"unknown_rank": True}),
            "has an unknown rank",
        ),
        (
            tensor_pb2.TensorProto(
                dtype=types_pb2.DT_INT8, tensor_shape={"dim": [{"size": 1}]}, int_val=[300]
            ),
            "has values that do not fit int8",
        ),
    ],
)
def test_malformed_tensor_protos_are_invalid_and_say_what_was_expected(proto, message):
    with pytest.raises(InvalidRequest) as refused:
        to_array("x", proto, TensorBudget(256 * MIB))

    assert message in refused.value.message
    assert refused.value.message.startswith("input 'x' ")
