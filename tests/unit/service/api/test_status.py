import grpc
import pytest
from google.rpc import code_pb2, error_details_pb2, status_pb2

from service import errors
from service.api.status import PUSHBACK_KEY, code_of, to_status

CODES = [
    (errors.InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.DataLoss, grpc.StatusCode.DATA_LOSS),
    (errors.Unimplemented, grpc.StatusCode.UNIMPLEMENTED),
    (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
]


def details(status: grpc.Status) -> status_pb2.Status:
    (raw,) = [v for k, v in status.trailing_metadata if k == "grpc-status-details-bin"]
    return status_pb2.Status.FromString(raw)


@pytest.mark.parametrize(("cls", "code"), CODES, ids=[c.__name__ for c, _ in CODES])
def test_each_domain_error_maps_to_its_code(cls, code):
    assert code_of(cls("x")) is code


@pytest.mark.parametrize(("cls", "code"), CODES, ids=[c.__name__ for c, _ in CODES])
def test_each_domain_error_names_its_code_without_grpc(cls, code):
    assert type(cls.code) is str
    assert cls.code == code.name


def test_every_domain_error_has_a_code():
    mapped = {cls for cls, _ in CODES}

    assert set(errors.FitserveError.__subclasses__()) == mapped


def test_a_subclass_maps_like_its_parent_and_the_base_is_internal():
    class ModelMissing(errors.NotFound):
        pass

    assert code_of(ModelMissing("x")) is grpc.StatusCode.NOT_FOUND
    assert code_of(errors.FitserveError("x")) is grpc.StatusCode.INTERNAL


@pytest.mark.parametrize(("cls", "code"), CODES, ids=[c.__name__ for c, _ in CODES])
def test_to_status_carries_code_and_message(cls, code):
    status = to_status(cls("model 'm' has no version 4"))

    assert status.code is code
    assert status.details == "model 'm' has no version 4"
    rich = details(status)
    assert rich.code == getattr(code_pb2, code.name)
    assert rich.message == "model 'm' has no version 4"
    assert list(rich.details) == []


def test_to_status_with_a_field_carries_a_bad_request_detail():
    status = to_status(errors.InvalidRequest("fit.epochs: must be >= 1", field="fit.epochs"))

    rich = details(status)
    assert status.code is grpc.StatusCode.INVALID_ARGUMENT
    assert len(rich.details) == 1
    bad = error_details_pb2.BadRequest()
    assert rich.details[0].Unpack(bad)
    assert [(v.field, v.description) for v in bad.field_violations] == [
        ("fit.epochs", "fit.epochs: must be >= 1")
    ]


def pushback(status: grpc.Status) -> list[str | bytes]:
    return [v for k, v in status.trailing_metadata if k == PUSHBACK_KEY]


def test_a_full_queue_sends_retry_info_and_pushback_in_ms():
    status = to_status(errors.ResourceExhausted("queue full", retry_after_seconds=0.25))

    hint = error_details_pb2.RetryInfo()
    assert details(status).details[0].Unpack(hint)
    assert hint.retry_delay.ToNanoseconds() == 250_000_000
    assert pushback(status) == ["250"]


def test_resource_exhausted_that_waiting_cannot_cure_says_do_not_retry():
    assert pushback(to_status(errors.ResourceExhausted("over the size limit"))) == ["-1"]
    assert pushback(to_status(errors.Unavailable("Redis is down"))) == []


def test_messages_and_fields_are_capped_so_the_trailers_fit_grpc_s_metadata_limit():
    from service.api.status import MAX_FIELD_BYTES, MAX_MESSAGE_BYTES, capped

    exc = errors.InvalidRequest("é" * 10_000, field="f" * 10_000)
    status = to_status(exc)
    sent = details(status)
    assert len(sent.message.encode()) <= MAX_MESSAGE_BYTES
    assert sent.message.endswith("… (cut)")
    bad_request = error_details_pb2.BadRequest()
    assert sent.details[0].Unpack(bad_request)
    violation = bad_request.field_violations[0]
    assert len(violation.field.encode()) <= MAX_FIELD_BYTES
    assert len(violation.description.encode()) <= MAX_MESSAGE_BYTES
    assert capped("short") == "short"
    assert sum(len(v) for _, v in status.trailing_metadata) < 8 * 1024
