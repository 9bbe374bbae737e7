"""fitserve tensors against hostile shapes: refused as INVALID_ARGUMENT before numpy sees them,
with the request's budget shared by its inputs."""

from __future__ import annotations

import pytest

from fitserve.v1 import tensor_pb2
from fitserve.v1.tensor_pb2 import DataType
from service.api.converters import TensorBudget, tensor_to_array
from service.errors import InvalidRequest

MIB = 1024 * 1024


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ([0, 2**62], "has an invalid shape [0, 4611686018427387904]: its non-zero dimensions"),
        ([0, 2**31, 2**31, 2**31], "its non-zero dimensions multiply past"),
        ([2**62, 0], "its non-zero dimensions multiply past"),
        ([0, -5], "every dimension must be 0 or more"),
    ],
)
def test_a_shape_numpy_cannot_hold_is_invalid_even_with_no_elements(shape, message):
    tensor = tensor_pb2.Tensor(dtype=DataType.DATA_TYPE_FLOAT32, shape=shape, content=b"")

    with pytest.raises(InvalidRequest) as refused:
        tensor_to_array(tensor, "x", TensorBudget(4 * MIB), "inputs[x]")

    assert message in refused.value.message
    assert refused.value.field == "inputs[x]"


def test_a_million_dimensions_are_refused_without_reading_them():
    tensor = tensor_pb2.Tensor(dtype=DataType.DATA_TYPE_FLOAT32, shape=[1] * 1_000_000)

    with pytest.raises(InvalidRequest) as refused:
        tensor_to_array(tensor, "x")

    assert len(refused.value.message) < 200  # not the million dimensions, echoed
    assert "more than 32 dimensions" in refused.value.message


def test_an_empty_tensor_within_the_bounds_decodes():
    tensor = tensor_pb2.Tensor(dtype=DataType.DATA_TYPE_FLOAT32, shape=[0, 28, 28])

    assert tensor_to_array(tensor, "x", TensorBudget(4 * MIB)).shape == (0, 28, 28)


def test_a_huge_shape_with_no_content_says_how_many_bytes_it_needs():
    tensor = tensor_pb2.Tensor(dtype=DataType.DATA_TYPE_FLOAT32, shape=[2**20, 2**20])

    with pytest.raises(InvalidRequest, match="its non-zero dimensions multiply past the 4194304"):
        tensor_to_array(tensor, "x", TensorBudget(4 * MIB))


def test_budget_counts_elements_without_overflow():
    budget = TensorBudget(100)
    assert budget.elements("x", [10, 10]) == 100
    assert budget.elements("x", [10, 0, 10**30 // 10**29]) == 0
    with pytest.raises(InvalidRequest):
        budget.elements("x", [2**63, 2**63, 2**63])
