"""Property-based fuzzing of the RPCs that take the most hostile input, through a real
server: fitserve's Predict, TF Serving's PredictionService.Predict, Train and
UploadDataset (strategies in fuzz_strategies.py).

For every example: the status is never INTERNAL or UNKNOWN (nor any code a bad request
should not get: UNAVAILABLE, DEADLINE_EXCEEDED, ...), and RESOURCE_EXHAUSTED only ever
for a limit the request broke, never from load shedding (which is off here: it refuses
before the request is parsed, so it would hide what the fuzzer sends). A refused Train
leaves no key in Redis and no folder on disk; a refused upload leaves the dataset store
as it was. After each test the server answers the health check SERVING and a valid
Predict.

Requests go over the wire as bytes the test serialises itself (generic calls with no
serializer), so the wire-noise tests send bytes that are no protobuf at all.

Examples and reproducibility:

* ``FITSERVE_FUZZ_EXAMPLES`` (default 300) is the number of examples per test; the
  default keeps this file near a minute on 2 cores.
* By default the examples are derandomized: every run (CI, a developer) draws the same
  ones, so a failure in CI reproduces with the same command, and no example database is
  written.
* ``FITSERVE_FUZZ_RANDOM=1`` draws new examples each run and keeps the failing ones in
  hypothesis's database (``.hypothesis/``, git-ignored), which replays them first next
  time. For a long hunt::

      FITSERVE_FUZZ_RANDOM=1 FITSERVE_FUZZ_EXAMPLES=2000 .venv/bin/pytest tests/integration/test_fuzz.py

The server is a private one (its own Redis, no worker), so valid Train requests queue
jobs that no worker runs, and shared by the module; its caller is a trainer token, so
ownership and quotas are on the paths fuzzed.
"""

from __future__ import annotations

import math
import os
import time
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from hypothesis import HealthCheck, example, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from tensorflow.core.framework import tensor_pb2 as tf_tensor_pb2
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import predict_pb2 as tfs_predict_pb2

from fitserve.v1 import (
    dataset_pb2,
    dataset_pb2_grpc,
    inference_pb2,
    tensor_pb2,
    training_pb2,
    training_pb2_grpc,
)
from service.config import AuthSettings, InferenceSettings, Settings
from service.domain.jobs import JOB_PREFIX, PREFIX
from service.domain.model_store import ModelStore
from service.domain.tokens import Role, TokenStore
from service.inference.feedback import KEY_PREFIX as FEEDBACK_PREFIX
from tests.conftest import RunningServer, private_stack
from tests.integration import fuzz_strategies as fs

EXAMPLES = int(os.environ.get("FITSERVE_FUZZ_EXAMPLES", "300"))
# A Train or upload example takes about 0.1 s; a long hunt gets the time it needs.
# The server under test runs in this process, and its background work (the reaper's
# jitter, load shedding) draws from the global `random` while hypothesis draws examples:
# hypothesis then warns as if a strategy had used it. None of the strategies does.
pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(max(300, EXAMPLES)),
    pytest.mark.filterwarnings(
        "ignore:Do not use the `random` module inside strategies"
        ":hypothesis.errors.HypothesisDeprecationWarning"
    ),
]
Code = grpc.StatusCode

RANDOM = os.environ.get("FITSERVE_FUZZ_RANDOM", "") not in ("", "0")
FUZZ = hypothesis_settings(
    max_examples=EXAMPLES,
    deadline=None,  # every example is a gRPC call, some load a model or write files
    derandomize=not RANDOM,
    database=hypothesis_settings.default.database if RANDOM else None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=RANDOM,
)

PREDICT = "/fitserve.v1.InferenceService/Predict"
TF_PREDICT = "/tensorflow.serving.PredictionService/Predict"
TRAIN = "/fitserve.v1.TrainingService/Train"
UPLOAD = "/fitserve.v1.DatasetService/UploadDataset"
METHODS = [PREDICT, TF_PREDICT, TRAIN, UPLOAD]
MESSAGES = {
    PREDICT: inference_pb2.PredictRequest,
    TF_PREDICT: tfs_predict_pb2.PredictRequest,
    TRAIN: training_pb2.TrainRequest,
    UPLOAD: dataset_pb2.UploadDatasetRequest,
}
# What a refused request may be answered; anything else is a finding.
REFUSALS = {
    Code.INVALID_ARGUMENT,
    Code.NOT_FOUND,
    Code.FAILED_PRECONDITION,
    Code.RESOURCE_EXHAUSTED,
    Code.OUT_OF_RANGE,
    Code.PERMISSION_DENIED,  # the trainer token may not train into a model it did not create
}
SHEDDING = ("server overloaded", "queue is full")  # RESOURCE_EXHAUSTED that is no limit
TIMEOUT = 60.0  # seconds per call; a call that takes longer hangs


@dataclass(frozen=True)
class Outcome:
    code: Code
    details: str
    response: bytes | None


@dataclass
class Target:
    """The fuzzed server, its caller and what it keeps on disk and in Redis."""

    settings: Settings
    running: RunningServer
    channel: grpc.Channel
    token: str
    redis: redis.Redis

    @property
    def metadata(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.token}")]

    def unary(self, method: str, raw: bytes) -> Outcome:
        call = self.channel.unary_unary(method)  # no serializer: raw bytes both ways
        try:
            response = call(raw, timeout=TIMEOUT, metadata=self.metadata)
        except grpc.RpcError as exc:
            return Outcome(exc.code(), exc.details() or "", None)  # type: ignore[attr-defined]
        return Outcome(Code.OK, "", response)

    def stream(self, method: str, raws: list[bytes]) -> Outcome:
        call = self.channel.stream_unary(method)
        try:
            response = call(iter(raws), timeout=TIMEOUT, metadata=self.metadata)
        except grpc.RpcError as exc:
            return Outcome(exc.code(), exc.details() or "", None)  # type: ignore[attr-defined]
        return Outcome(Code.OK, "", response)

    def redis_state(self) -> dict[str, object]:
        """Every key but the feedback records (which OK predictions write): its content
        for strings and the shared hashes (owners, statistics, tokens), its size for job
        records and the rest. Two pipelined round trips, however many jobs there are."""
        r = self.redis
        keys = [k for k in r.scan_iter(count=1000) if not k.startswith(FEEDBACK_PREFIX)]
        with r.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.type(key)
            kinds = pipe.execute()
        with r.pipeline(transaction=False) as pipe:
            for key, kind in zip(keys, kinds, strict=True):
                if kind == "hash":
                    pipe.hlen(key) if key.startswith(JOB_PREFIX) else pipe.hgetall(key)
                elif kind == "string":
                    pipe.get(key)
                else:
                    size = {"list": pipe.llen, "set": pipe.scard, "zset": pipe.zcard}
                    size.get(kind, pipe.xlen)(key)
            values = pipe.execute()
        return {k: (kind, v) for k, kind, v in zip(keys, kinds, values, strict=True)}

    def files(self, *folders: Path) -> set[Path]:
        return {p for f in folders if f.exists() for p in f.rglob("*")}


def check(outcome: Outcome, method: str) -> None:
    """The status of one example is OK or a refusal, never INTERNAL or UNKNOWN."""
    said = f"{method} answered {outcome.code.name}: {outcome.details[:500]!r}"
    assert outcome.code not in (Code.INTERNAL, Code.UNKNOWN), said
    assert outcome.code == Code.OK or outcome.code in REFUSALS, said
    if outcome.code == Code.RESOURCE_EXHAUSTED:
        assert not any(s in outcome.details for s in SHEDDING), f"load shedding: {said}"


def parses(method: str, raw: bytes) -> bool:
    try:
        MESSAGES[method].FromString(raw)
    except Exception:
        return False
    return True


def _publish_model(models_dir: Path) -> None:
    """The cheapest model that exercises the batcher: 4 float32 in, 3 probabilities out."""
    import keras

    from service.training.exporting import export_version

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((fs.FEATURES,), name="x"),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    export_version(model, ModelStore(models_dir), fs.MODEL, "fuzz", {"created_at": time.time()})


def _wait_for_token(channel: grpc.Channel, token: str) -> None:
    """The server reads tokens every refresh_seconds: wait until it knows this one."""
    call = channel.unary_unary("/fitserve.v1.DatasetService/ListDatasets")
    deadline = time.monotonic() + 30
    while True:
        try:
            call(b"", timeout=5, metadata=[("authorization", f"Bearer {token}")])
            return
        except grpc.RpcError as exc:
            if time.monotonic() > deadline:
                raise AssertionError(f"the server never accepted the token: {exc}") from None
            time.sleep(0.1)  # the token refresh period is 0.2 s


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    root = tmp_path_factory.mktemp("fuzz")
    overrides = {
        "auth": AuthSettings(refresh_seconds=0.2, max_queued_jobs=10**6),
        # no load shedding (it refuses before parsing); NaN is refused (the default)
        "inference": InferenceSettings(max_queue_wait_ms=None, warmup_calls=1),
        "max_message_bytes": 4 * 1024 * 1024,  # the smallest allowed: giant inputs cost less
    }
    with private_stack(root, **overrides) as (settings, running):
        _publish_model(settings.models_dir)
        r = redis.Redis.from_url(settings.redis_url, decode_responses=True)
        token, _ = TokenStore(r).create("fuzzer", Role.TRAINER)
        with grpc.insecure_channel(running.target) as channel:
            _wait_for_token(channel, token)
            data = fs.npz(fs.valid_arrays(16))
            header = dataset_pb2.DatasetHeader(name=fs.DATASET, format="npz")
            stream = [dataset_pb2.UploadDatasetRequest(header=header)]
            stream.append(dataset_pb2.UploadDatasetRequest(chunk=data))
            t = Target(settings, running, channel, token, r)
            outcome = t.stream(UPLOAD, [m.SerializeToString() for m in stream])
            assert outcome.code == Code.OK, outcome
            stored = dataset_pb2.Dataset.FromString(outcome.response or b"")
            assert stored.id == fs.DATASET_ID  # the strategies name it by id too
            yield t
        r.close()


def assert_healthy(target: Target) -> None:
    """Health SERVING for the server and each fuzzed service, and a valid Predict."""
    stub = health_pb2_grpc.HealthStub(target.channel)
    for service in ("", *{m.split("/")[1] for m in METHODS}):
        answer = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING, service
    x = fs.to_wire(np.zeros((2, fs.FEATURES), np.float32))
    request = inference_pb2.PredictRequest(
        model=tensor_pb2.ModelRef(name=fs.MODEL), inputs={"x": x}
    )
    outcome = target.unary(PREDICT, request.SerializeToString())
    assert outcome.code == Code.OK, outcome
    response = inference_pb2.PredictResponse.FromString(outcome.response or b"")
    assert list(response.outputs["output_0"].shape) == [2, 3]


# ---- Predict --------------------------------------------------------------------------


def test_fuzz_predict(target: Target) -> None:
    answered: dict[Code, int] = {}

    @FUZZ
    @given(request=fs.predict_requests())
    def run(request: inference_pb2.PredictRequest) -> None:
        outcome = target.unary(PREDICT, request.SerializeToString())
        check(outcome, "Predict")
        answered[outcome.code] = answered.get(outcome.code, 0) + 1
        if outcome.code == Code.OK:
            response = inference_pb2.PredictResponse.FromString(outcome.response or b"")
            assert response.model_name == fs.MODEL
            assert response.request_id

    run()
    print(f"answered: { {c.name: n for c, n in answered.items()} }")
    assert answered.get(Code.OK, 0) > 0, f"no valid Predict reached the batcher: {answered}"
    assert_healthy(target)


def test_fuzz_tf_serving_predict(target: Target) -> None:
    answered: dict[Code, int] = {}

    @FUZZ
    @given(request=fs.tf_predict_requests())
    def run(request: tfs_predict_pb2.PredictRequest) -> None:
        outcome = target.unary(TF_PREDICT, request.SerializeToString())
        check(outcome, "tensorflow.serving Predict")
        answered[outcome.code] = answered.get(outcome.code, 0) + 1
        if outcome.code == Code.OK:
            response = tfs_predict_pb2.PredictResponse.FromString(outcome.response or b"")
            assert response.model_spec.name == fs.MODEL

    run()
    print(f"answered: { {c.name: n for c, n in answered.items()} }")
    assert answered.get(Code.OK, 0) > 0, f"no valid Predict reached the batcher: {answered}"
    assert_healthy(target)


@pytest.mark.parametrize(
    "shape", [[0, 2**62], [2**31, 2**31, 0], [0, 2**61]], ids=["0x2^62", "2^31x2^31x0", "0x2^61"]
)
def test_predict_empty_tensor_with_huge_dimensions_is_invalid_argument(
    target: Target, shape: list[int]
) -> None:
    x = tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=shape)
    request = inference_pb2.PredictRequest(
        model=tensor_pb2.ModelRef(name=fs.MODEL), inputs={"x": x}
    )
    outcome = target.unary(PREDICT, request.SerializeToString())
    assert outcome.code == Code.INVALID_ARGUMENT, outcome


def test_tf_serving_tensor_is_not_expanded_before_its_size_is_checked(target: Target) -> None:
    elements = 2**26  # 256 MiB of float32: safe to allocate once on a test machine
    proto = tf_tensor_pb2.TensorProto(
        dtype=types_pb2.DT_FLOAT, tensor_shape=fs.tf_shape([elements]), float_val=[1.0]
    )
    request = tfs_predict_pb2.PredictRequest(inputs={"x": proto})
    request.model_spec.name = fs.MODEL
    tracemalloc.start()
    try:
        outcome = target.unary(TF_PREDICT, request.SerializeToString())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    check(outcome, "tensorflow.serving Predict")
    assert peak < 64 * 1024**2, (
        f"a {request.ByteSize()}-byte request made the server allocate {peak:,} bytes"
    )


# ---- Train ----------------------------------------------------------------------------


def test_fuzz_train(target: Target) -> None:
    answered: dict[Code, int] = {}
    folders = (target.settings.models_dir, target.settings.jobs_dir)

    @FUZZ
    @given(request=fs.train_requests())
    def run(request: training_pb2.TrainRequest) -> None:
        raw = request.SerializeToString()
        redis_before, files_before = target.redis_state(), target.files(*folders)
        outcome = target.unary(TRAIN, raw)
        check(outcome, "Train")
        answered[outcome.code] = answered.get(outcome.code, 0) + 1
        if outcome.code == Code.OK:
            job = training_pb2.TrainResponse.FromString(outcome.response or b"").job
            assert job.state == training_pb2.JOB_STATE_QUEUED
            assert job.id
            assert target.redis.zscore(f"{PREFIX}jobs", job.id) is not None
            return
        assert target.files(*folders) == files_before, "a refused Train left files"
        after = target.redis_state()
        changed = sorted(
            k for k in after.keys() | redis_before.keys() if after.get(k) != redis_before.get(k)
        )
        assert not changed, f"a refused Train changed Redis keys {changed}"

    run()
    print(f"answered: { {c.name: n for c, n in answered.items()} }")
    assert answered.get(Code.OK, 0) > 0, f"no valid Train was queued: {answered}"
    assert answered.get(Code.INVALID_ARGUMENT, 0) > 0, answered
    assert_healthy(target)


def _bad_request_field(call: grpc.RpcError) -> str:
    status = rpc_status.from_call(call)  # type: ignore[arg-type]
    assert status is not None
    detail = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(detail)
    return str(detail.field_violations[0].field)


@pytest.mark.parametrize(
    ("where", "field"),
    [
        ("layer", "model.layers[0].units"),
        ("nested", "model.layers[0].input_shape[1].a"),
        ("optimizer", "compile.optimizer.params.learning_rate"),
        ("plugin", "callbacks.plugins[0].params.delta"),
    ],
)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=str)
def test_train_with_a_non_finite_struct_value_is_invalid_argument(
    target: Target, where: str, field: str, value: float
) -> None:
    """Found by test_fuzz_train: NaN or an infinity in a Struct (a layer argument, a
    parameter) failed json_format in converters.message_to_data: INTERNAL."""
    request = fs.valid_train_request()
    layer = request.model.layers.layers[0]
    if where == "layer":
        layer.update({"units": value})
    elif where == "nested":
        layer.update({"input_shape": [4, {"a": value}]})
    elif where == "optimizer":
        request.compile.optimizer.name = "adam"
        request.compile.optimizer.params.update({"learning_rate": value})
    else:
        request.callbacks.plugins.add(name="examples>Callback").params.update({"delta": value})
    before = target.redis_state()
    stub = training_pb2_grpc.TrainingServiceStub(target.channel)
    with pytest.raises(grpc.RpcError) as exc:
        stub.Train(request, timeout=TIMEOUT, metadata=target.metadata)
    assert exc.value.code() == Code.INVALID_ARGUMENT, exc.value  # type: ignore[attr-defined]
    assert "finite numbers only" in exc.value.details()  # type: ignore[attr-defined]
    assert _bad_request_field(exc.value) == field
    assert target.redis_state() == before


# ---- UploadDataset --------------------------------------------------------------------


def test_fuzz_upload_dataset(target: Target) -> None:
    answered: dict[Code, int] = {}
    store = target.settings.datasets_dir

    @FUZZ
    @given(messages=fs.uploads())
    def run(messages: list[dataset_pb2.UploadDatasetRequest]) -> None:
        before = target.files(store)
        redis_before = target.redis_state()
        outcome = target.stream(UPLOAD, [m.SerializeToString() for m in messages])
        check(outcome, "UploadDataset")
        answered[outcome.code] = answered.get(outcome.code, 0) + 1
        assert not target.files(store / "incoming"), "an upload left a part file"
        if outcome.code == Code.OK:
            dataset = dataset_pb2.Dataset.FromString(outcome.response or b"")
            assert dataset.id.startswith("sha256:")
            assert dataset.num_examples >= 0
            assert (store / "names" / f"{dataset.name}.json").exists()
            return
        assert target.files(store) == before, "a refused upload left files in the store"
        assert target.redis_state() == redis_before, "a refused upload changed Redis"

    run()
    print(f"answered: { {c.name: n for c, n in answered.items()} }")
    assert answered.get(Code.OK, 0) > 0, f"no upload was stored: {answered}"
    assert_healthy(target)


def test_upload_with_a_negative_size_is_invalid_argument(target: Target) -> None:
    """Found by test_fuzz_upload_dataset: a negative header.size_bytes was
    RESOURCE_EXHAUSTED ("dataset of -1 bytes is over the ... byte limit")."""
    store = target.settings.datasets_dir
    before = target.files(store)
    header = dataset_pb2.DatasetHeader(name="negative", format="npz", size_bytes=-1)
    messages = [dataset_pb2.UploadDatasetRequest(header=header)]
    messages.append(dataset_pb2.UploadDatasetRequest(chunk=fs.npz(fs.valid_arrays())))
    stub = dataset_pb2_grpc.DatasetServiceStub(target.channel)
    with pytest.raises(grpc.RpcError) as exc:
        stub.UploadDataset(iter(messages), timeout=TIMEOUT, metadata=target.metadata)
    assert exc.value.code() == Code.INVALID_ARGUMENT, exc.value  # type: ignore[attr-defined]
    assert _bad_request_field(exc.value) == "header.size_bytes"
    assert target.files(store) == before


def test_upload_whose_npy_header_numpy_cannot_tokenize_is_invalid_argument(
    target: Target,
) -> None:
    """Found by test_fuzz_upload_dataset (FITSERVE_FUZZ_RANDOM=1): an .npy header with an
    unclosed bracket or string made numpy raise tokenize.TokenError: INTERNAL."""
    store = target.settings.datasets_dir
    before, redis_before = target.files(store), target.redis_state()
    member = fs.npy_member("{'descr': '<f4', 'fortran_order': False, 'shape': (", b"")
    header = dataset_pb2.DatasetHeader(name="garbled", format="npz")
    messages = [dataset_pb2.UploadDatasetRequest(header=header)]
    messages.append(dataset_pb2.UploadDatasetRequest(chunk=fs.zipped([("x.npy", member)])))
    outcome = target.stream(UPLOAD, [m.SerializeToString() for m in messages])
    assert outcome.code == Code.INVALID_ARGUMENT, outcome
    assert "not a valid .npz file" in outcome.details
    assert target.files(store) == before
    assert target.redis_state() == redis_before


# ---- wire noise -----------------------------------------------------------------------


def test_fuzz_wire_noise_that_parses(target: Target) -> None:
    """Bytes that parse as the request (random fields, types and payloads, unknown fields):
    the handlers see messages no client library would build."""
    seen: dict[str, int] = {}

    @FUZZ
    @given(
        method=st.sampled_from(METHODS), raws=st.lists(fs.wire_messages(), min_size=1, max_size=3)
    )
    def run(method: str, raws: list[bytes]) -> None:
        if method == UPLOAD:
            outcome = target.stream(method, [r for r in raws if parses(method, r)])
        else:
            raw = next((r for r in raws if parses(method, r)), b"")
            outcome = target.unary(method, raw)
        check(outcome, method)
        key = f"{method.rsplit('/', 1)[1]} {outcome.code.name}"
        seen[key] = seen.get(key, 0) + 1

    run()
    print(f"answered: {seen}")
    assert_healthy(target)


def test_fuzz_wire_noise_that_does_not_parse(target: Target) -> None:
    """Bytes that are no request message (corrupt wire format, invalid UTF-8 in a string,
    nesting past protobuf's depth limit) are INVALID_ARGUMENT, never INTERNAL or UNKNOWN."""

    @FUZZ
    @given(
        method=st.sampled_from(METHODS), raw=st.one_of(st.binary(max_size=256), fs.wire_messages())
    )
    @example(method=PREDICT, raw=b"\xff")
    @example(method=TRAIN, raw=fs.nested_struct_train_request(200))
    @example(method=UPLOAD, raw=b"\x12\xff")
    def run(method: str, raw: bytes) -> None:
        if parses(method, raw):
            return  # test_fuzz_wire_noise_that_parses covers those
        outcome = target.stream(method, [raw]) if method == UPLOAD else target.unary(method, raw)
        check(outcome, method)
        assert outcome.code == Code.INVALID_ARGUMENT, outcome

    try:
        run()
    finally:
        assert_healthy(target)
