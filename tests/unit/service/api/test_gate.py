"""CallGate: shedding a share of Predict calls only past the bound, refusing request bytes
that do not parse, and bounding open streams."""

from collections.abc import Callable

import pytest

from fitserve.v1 import training_pb2
from service.api.backlog import Backlog
from service.api.gate import STREAM_RETRY_HINT, WATCH_METHOD, CallGate, request_parser
from service.api.status import RpcOutcomes
from service.errors import InvalidRequest, ResourceExhausted
from service.metrics import Metrics
from tests.unit.service.api.test_backlog import Core, Queue


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_gate_never_sheds_while_the_measured_wait_is_under_the_bound():
    queue = Queue()
    clock = Clock()
    gate = CallGate(1024, RpcOutcomes(Metrics()), queue.backlog, max_wait=0.1, clock=clock)
    queue.arrive(3, now=0.0)  # a fresh server: three calls queued, none served yet
    for step in range(10):  # they wait 90 ms: under the bound, however slowly they drain
        clock.now = step * 0.01
        queue.backlog.update(clock.now)
        assert [gate.overloaded() for _ in range(200)] == [None] * 200
    clock.now = 0.1
    assert [gate.overloaded() for _ in range(200)] == [None] * 200  # at the bound: admitted


def test_the_gate_sheds_most_calls_once_the_oldest_has_waited_past_the_bound():
    queue = Queue()
    clock = Clock()
    gate = CallGate(1024, RpcOutcomes(Metrics()), queue.backlog, max_wait=0.01, clock=clock)
    queue.arrive(40, now=0.0)
    queue.backlog.update(0.0)
    clock.now = 1.0  # stuck for a second, far past the bound: the share is the maximum

    refusals = [gate.overloaded() for _ in range(2000)]
    refused = [r for r in refusals if r is not None]

    assert 0.9 < len(refused) / len(refusals) < 0.99
    assert "FITSERVE_INFERENCE__MAX_QUEUE_WAIT_MS" in refused[0].message
    assert "the oldest of 40 waiting calls has waited that long" in refused[0].message
    assert refused[0].retry_after_seconds == 1.0
    queue.take(40)  # the queue empties: nothing is shed any more, before the next reading
    assert [gate.overloaded() for _ in range(200)] == [None] * 200
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


# ---- bounds on open streams --------------------------------------------------------------


class Context:
    """What CallGate.admit uses of a grpc.aio servicer context."""

    def __init__(self) -> None:
        self.callbacks: list[Callable[[object], None]] = []

    def add_done_callback(self, callback: Callable[[object], None]) -> None:
        self.callbacks.append(callback)

    def end(self) -> None:  # what gRPC does when the call ends, however it ends
        for callback in self.callbacks:
            callback(self)


def test_a_stream_slot_is_given_back_once_whether_the_handler_or_grpc_ends_it():
    backlog = Backlog(Core().counts)
    gate = CallGate(1024, RpcOutcomes(Metrics()), backlog, max_streams=2, max_job_watchers=1)
    first, second = Context(), Context()
    leave = gate.admit(first, gate.bounds_of(WATCH_METHOD))  # type: ignore[arg-type]
    gate.admit(second, gate.bounds_of("/grpc.health.v1.Health/Watch"))  # type: ignore[arg-type]
    assert (gate.streams.open, gate.watchers.open, backlog.active) == (2, 1, 2)

    leave()  # the handler's finally
    first.end()  # and gRPC's done callback: counted once
    second.end()  # a stream suspended at a yield: only gRPC ends it

    assert (gate.streams.open, gate.watchers.open, backlog.active) == (0, 0, 0)


def test_past_a_bound_the_refusal_names_its_setting_and_holds_no_slot():
    gate = CallGate(1024, RpcOutcomes(Metrics()), max_streams=2, max_job_watchers=1)
    gate.admit(Context(), gate.bounds_of(WATCH_METHOD))  # type: ignore[arg-type]

    with pytest.raises(ResourceExhausted) as watchers:
        gate.admit(Context(), gate.bounds_of(WATCH_METHOD))  # type: ignore[arg-type]
    gate.admit(Context(), gate.bounds_of("/fitserve.v1.DatasetService/UploadDataset"))  # type: ignore[arg-type]
    with pytest.raises(ResourceExhausted) as streams:
        gate.admit(Context(), gate.bounds_of("/grpc.health.v1.Health/Watch"))  # type: ignore[arg-type]

    assert (gate.streams.open, gate.watchers.open) == (2, 1)
    assert "too many WatchJob streams open on this server" in watchers.value.message
    assert "FITSERVE_MAX_JOB_WATCHERS=1" in watchers.value.message
    assert "too many streaming calls open" in streams.value.message
    assert "FITSERVE_MAX_STREAMS=2" in streams.value.message
    assert streams.value.retry_after_seconds == STREAM_RETRY_HINT
