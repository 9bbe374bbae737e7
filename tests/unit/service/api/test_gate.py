"""CallGate: shedding a share of Predict calls only past the bound, and refusing request
bytes that do not parse."""

import pytest

from fitserve.v1 import training_pb2
from service.api.backlog import Backlog
from service.api.gate import CallGate, request_parser
from service.api.status import RpcOutcomes
from service.errors import InvalidRequest
from service.metrics import Metrics
from tests.unit.service.api.test_backlog import Core


def test_the_gate_refuses_only_with_a_backlog_over_the_bound_and_names_the_setting():
    core = Core()
    backlog = Backlog(core.counts)
    gate = CallGate(1024, RpcOutcomes(Metrics()), backlog, max_wait=0.01)
    assert gate.overloaded() is None

    backlog.wait_seconds = 1.0  # far past the bound: the share refused is the maximum
    refusals = [gate.overloaded() for _ in range(2000)]
    refused = [r for r in refusals if r is not None]

    assert 0.9 < len(refused) / len(refusals) < 0.99
    assert "FITSERVE_INFERENCE__MAX_QUEUE_WAIT_MS" in refused[0].message
    assert refused[0].retry_after_seconds == 1.0
    assert CallGate(1024, RpcOutcomes(Metrics())).overloaded() is None  # shedding off


# ---- request messages that do not parse ------------------------------------------------


def _deep_struct_train_request(levels: int) -> bytes:
    """A TrainRequest whose one layer holds a value nested ``levels`` lists deep."""
    request = training_pb2.TrainRequest(model_name="deep")
    value = request.model.layers.layers.add().fields["units"]
    for _ in range(levels):
        value = value.list_value.values.add()
    value.number_value = 1
    return request.SerializeToString()


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"\xff\xff\xff\xff", "its bytes are not a serialized protobuf message of that type"),
        (b"garbage, not a protobuf", "its bytes are not a serialized protobuf message"),
        (_deep_struct_train_request(200), "nested deeper than protobuf's recursion limit"),
        (b"\x0a\x02\xc3\x28", "a string field is not valid UTF-8"),  # model_name
    ],
)
def test_bytes_that_are_not_the_request_message_are_invalid_with_a_short_reason(raw, reason):
    parse = request_parser(training_pb2.TrainRequest.FromString)

    with pytest.raises(InvalidRequest) as refused:
        parse(raw)

    message = refused.value.message
    assert message.startswith("request is not a valid fitserve.v1.TrainRequest: ")
    assert reason in message
    assert "upb" not in message  # no protobuf internals
    assert "Error parsing" not in message


def test_a_request_nested_within_the_limit_parses():
    parse = request_parser(training_pb2.TrainRequest.FromString)

    assert parse(_deep_struct_train_request(20)).model_name == "deep"
