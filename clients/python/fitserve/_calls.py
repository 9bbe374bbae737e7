"""What the sync `Client` and the `AsyncClient` share about making calls: which calls are
retried and how (gRPC's own retry policy, in the channel's service config), the pause
before an SDK-level retry, and how long a call may take."""

from __future__ import annotations

import contextlib
import json
import random

import grpc
from google.protobuf import message
from google.rpc import error_details_pb2, status_pb2

__all__ = ["IDEMPOTENT_METHODS", "retry_pause", "service_config"]

PUSHBACK_KEY = "grpc-retry-pushback-ms"
STATUS_DETAILS_KEY = "grpc-status-details-bin"
RETRY_CODES = ("RESOURCE_EXHAUSTED", "UNAVAILABLE")
_INITIAL_BACKOFF = 0.05
_MAX_BACKOFF = 2.0

# Calls that change nothing, or change it to the same end however often they run: safe to
# send again when the first attempt may or may not have reached the server. Not here:
# UploadDataset (a client stream, too big to buffer), Train, FineTune and Evaluate (a new
# job each time; Train and FineTune are retried by the SDK when they carry an
# idempotency key), CancelJob and the deletions (a second one answers differently),
# Feedback (counted twice), WatchJob and DownloadJobArtifact (streams; Job.events()
# resumes a watch itself).
IDEMPOTENT_METHODS: dict[str, tuple[str, ...]] = {
    "fitserve.v1.InferenceService": ("Predict", "GetModelStatus"),
    "fitserve.v1.TrainingService": (
        "GetJob",
        "ListJobs",
        "ListPlugins",
        "ListJobArtifacts",
    ),
    "fitserve.v1.ModelService": ("ListModels", "GetModel", "SetAlias"),
    "fitserve.v1.DatasetService": ("GetDataset", "ListDatasets"),
}


def _policy(attempts: int) -> dict[str, object]:
    return {
        "maxAttempts": attempts,
        "initialBackoff": f"{_INITIAL_BACKOFF}s",
        "maxBackoff": f"{_MAX_BACKOFF:g}s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": list(RETRY_CODES),
    }


def service_config(attempts: int, predict_attempts: int) -> str:
    """gRPC's retry policy for the idempotent calls (`IDEMPOTENT_METHODS`): on
    RESOURCE_EXHAUSTED (a full queue, a shed call) and UNAVAILABLE, up to `attempts` in all
    (`predict_attempts` for Predict), after the server's pushback (grpc-retry-pushback-ms,
    which the server sends with its RetryInfo; a negative one: never) or an exponential
    backoff from 50 ms to 2 s, within the call's deadline. Retries pause while calls keep
    failing (retry throttling: a bucket of 10 tokens, -1 per failure, +0.1 per success,
    retrying above 5), so an overloaded server is not hit harder. Nothing else is
    retried: DATA_LOSS, FAILED_PRECONDITION and the caller's own mistakes would fail the
    same way again."""
    configs: list[dict[str, object]] = []
    for service, methods in IDEMPOTENT_METHODS.items():
        for method in methods:
            tries = predict_attempts if method == "Predict" else attempts
            if tries >= 2:
                configs.append(
                    {
                        "name": [{"service": service, "method": method}],
                        "retryPolicy": _policy(min(tries, 5)),
                    }
                )
    if not configs:
        return json.dumps({})
    return json.dumps(
        {"methodConfig": configs, "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1}}
    )


def retry_pause(error: grpc.RpcError, attempt: int) -> float | None:
    """Seconds to wait before attempt `attempt + 1` of a call whose attempt `attempt`
    (from 1) failed with `error`; None when it must not be retried. Only UNAVAILABLE and
    RESOURCE_EXHAUSTED are; the server's hint (gRPC pushback, or the RetryInfo of the
    status details) wins over the exponential backoff, and a RESOURCE_EXHAUSTED without
    a hint, or with a negative pushback (a request over a size limit), is not retried."""
    code = _code(error)
    if code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED):
        return None
    hint = server_hint(error)
    if hint is not None:
        return hint if hint >= 0 else None
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return None
    step = min(_MAX_BACKOFF, _INITIAL_BACKOFF * 2 ** (attempt - 1))
    return random.uniform(0, step)  # full jitter, as gRPC's own retries


def server_hint(error: grpc.RpcError) -> float | None:
    """The server's retry hint in seconds (negative: do not retry), None when it sent
    none: the grpc-retry-pushback-ms trailer, else a google.rpc.RetryInfo in
    grpc-status-details-bin."""
    trailing = getattr(error, "trailing_metadata", None)
    pairs = (trailing() if callable(trailing) else None) or ()
    for key, value in pairs:
        if key == PUSHBACK_KEY:
            with contextlib.suppress(ValueError, TypeError):
                return int(value) / 1000
    for key, value in pairs:
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            return _retry_info(value)
    return None


def _retry_info(raw: bytes) -> float | None:
    status = status_pb2.Status()
    try:
        status.ParseFromString(raw)
    except message.DecodeError:
        return None
    for detail in status.details:
        info = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            nanos: int = info.retry_delay.ToNanoseconds()
            return nanos / 1e9
    return None


def _code(error: BaseException) -> grpc.StatusCode | None:
    code = getattr(error, "code", None)
    value = code() if callable(code) else None
    return value if isinstance(value, grpc.StatusCode) else None
