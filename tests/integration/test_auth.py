"""Bearer tokens with roles through a real server: every role against every RPC, ownership,
quotas, revocation across two api processes, the audit log and the start-up rules."""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import redis
from google.protobuf import message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tensorflow_serving.apis import prediction_service_pb2

from fitserve import _specs
from fitserve.v1 import (
    dataset_pb2,
    dataset_pb2_grpc,
    inference_pb2,
    model_pb2,
    model_pb2_grpc,
    training_pb2,
    training_pb2_grpc,
)
from service.config import AuthSettings, Settings
from service.domain.model_store import ModelStore
from service.domain.tokens import Role, TokenStore
from service.launch.serving import serve_argv
from service.launch.stack import ServerPart, Stack
from tests.conftest import ROOT, RunningServer, private_stack

Code = grpc.StatusCode
FAST = AuthSettings(refresh_seconds=0.2)
SERVICES = [
    training_pb2.DESCRIPTOR.services_by_name["TrainingService"],
    dataset_pb2.DESCRIPTOR.services_by_name["DatasetService"],
    model_pb2.DESCRIPTOR.services_by_name["ModelService"],
    inference_pb2.DESCRIPTOR.services_by_name["InferenceService"],
    prediction_service_pb2.DESCRIPTOR.services_by_name["PredictionService"],
]
READ = {
    "GetJob", "ListJobs", "WatchJob", "ListPlugins", "ListJobArtifacts", "GetDataset",
    "ListDatasets", "GetModel", "ListModels", "GetModelStatus", "GetModelMetadata",
}  # fmt: skip
PREDICT = {
    "Predict", "Feedback", "GetModelStatus", "GetModel", "ListModels", "Classify", "Regress",
    "MultiInference", "GetModelMetadata",
}  # fmt: skip
CHANGE = {
    "Train", "FineTune", "Evaluate", "CancelJob", "DownloadJobArtifact", "UploadDataset",
    "DeleteDataset", "SetAlias", "DeleteAlias", "DeleteVersion",
}  # fmt: skip
EXPECTED = {
    "admin": READ | PREDICT | CHANGE,
    "trainer": READ | PREDICT | CHANGE,
    "predictor": PREDICT,
    "viewer": READ,
}


def _bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[tuple[Settings, RunningServer, TokenStore]]:
    """A private server whose tokens the test makes (auth turns on with the first)."""
    with private_stack(tmp_path, auth=FAST) as (settings, running):
        store = TokenStore(redis.Redis.from_url(settings.redis_url, decode_responses=True))
        yield settings, running, store


def _tokens(store: TokenStore, **roles: str) -> dict[str, str]:
    made = {name: store.create(name, Role(role))[0] for name, role in roles.items()}
    time.sleep(4 * FAST.refresh_seconds)  # every server has re-read the tokens
    return made


def _call(channel: grpc.Channel, service: Any, method: Any, token: str | None) -> Code:
    """Call ``method`` with an empty request; the status it ends with (OK included)."""
    path = f"/{service.full_name}/{method.name}"
    request_class = message_factory.GetMessageClass(method.input_type)
    response_class = message_factory.GetMessageClass(method.output_type)
    kind = {(False, False): "unary_unary", (True, False): "stream_unary"}.get(
        (method.client_streaming, method.server_streaming),
        "unary_stream" if not method.client_streaming else "stream_stream",
    )
    call = getattr(channel, kind)(
        path,
        request_serializer=request_class.SerializeToString,
        response_deserializer=response_class.FromString,
    )
    request: Any = iter([]) if method.client_streaming else request_class()
    metadata = _bearer(token) if token else None
    try:
        result = call(request, metadata=metadata, timeout=30)
        if method.server_streaming:
            list(result)
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[attr-defined,no-any-return]
    return Code.OK


def test_every_role_against_every_rpc(
    secured: tuple[Settings, RunningServer, TokenStore],
) -> None:
    _, running, store = secured
    tokens = _tokens(store, **{role: role for role in EXPECTED})
    methods = [(s, m) for s in SERVICES for m in s.methods]
    assert {m.name for _, m in methods} == READ | PREDICT | CHANGE  # the table covers all
    wrong = []
    with grpc.insecure_channel(running.target) as channel:
        for role, allowed in EXPECTED.items():
            for service, method in methods:
                code = _call(channel, service, method, tokens[role])
                refused = code is Code.PERMISSION_DENIED
                if refused == (method.name in allowed) or code is Code.UNAUTHENTICATED:
                    wrong.append(f"{role} {method.name}: {code.name}")
        for service, method in methods:  # without a token: every one refused
            if (code := _call(channel, service, method, None)) is not Code.UNAUTHENTICATED:
                wrong.append(f"no token {method.name}: {code.name}")
            if (code := _call(channel, service, method, "fst_forged")) is not Code.UNAUTHENTICATED:
                wrong.append(f"forged token {method.name}: {code.name}")
    assert wrong == []


def test_refusals_say_what_is_wrong_and_health_stays_open(
    secured: tuple[Settings, RunningServer, TokenStore],
) -> None:
    _, running, store = secured
    tokens = _tokens(store, watcher="viewer")
    with grpc.insecure_channel(running.target) as channel:
        stub = model_pb2_grpc.ModelServiceStub(channel)
        with pytest.raises(grpc.RpcError) as missing:
            stub.ListModels(model_pb2.ListModelsRequest())
        assert missing.value.code() is Code.UNAUTHENTICATED
        assert "authorization: Bearer <token>" in str(missing.value.details())
        with pytest.raises(grpc.RpcError) as bad:
            stub.ListModels(model_pb2.ListModelsRequest(), metadata=[("authorization", "Basic x")])
        assert bad.value.code() is Code.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as denied:
            stub.SetAlias(
                model_pb2.SetAliasRequest(model_name="m", alias="stable", version=1),
                metadata=_bearer(tokens["watcher"]),
            )
        assert denied.value.code() is Code.PERMISSION_DENIED
        assert "'watcher' has role viewer, which may not call SetAlias" in str(
            denied.value.details()
        )
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING


# --- ownership and quotas ----------------------------------------------------------------


def _upload(channel: grpc.Channel, token: str, name: str, rows: int = 16) -> dataset_pb2.Dataset:
    content = _specs.npz_bytes(
        {"x": np.zeros((rows, 2), np.float32), "y": np.zeros((rows, 1), np.float32)}
    )
    header = _specs.npz_header(
        name, size_bytes=len(content), sha256=hashlib.sha256(content).hexdigest()
    )
    requests = _specs.upload_requests(header, _specs.memory_chunks(content, 64 * 1024))
    return dataset_pb2_grpc.DatasetServiceStub(channel).UploadDataset(  # type: ignore[no-any-return]
        requests, metadata=_bearer(token), timeout=30
    )


def _train(channel: grpc.Channel, token: str, model: str, dataset: str) -> training_pb2.Job:
    request = training_pb2.TrainRequest(
        model_name=model,
        model=_specs.model_spec([{"type": "Dense", "units": 1, "input_shape": [2]}], None),
        dataset=_specs.dataset_ref(dataset),
        compile=_specs.compile_options(
            optimizer="sgd", loss="mse", metrics=[], weighted_metrics=[], loss_weights=None
        ),
    )
    stub = training_pb2_grpc.TrainingServiceStub(channel)
    return stub.Train(request, metadata=_bearer(token), timeout=30).job


def _refused(code: Code, call: Callable[[], object]) -> str:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() is code, info.value.details()
    return str(info.value.details())


def test_a_trainer_changes_only_what_it_created(
    secured: tuple[Settings, RunningServer, TokenStore], caplog: pytest.LogCaptureFixture
) -> None:
    settings, running, store = secured
    t = _tokens(store, alice="trainer", bob="trainer", ops="admin")
    with grpc.insecure_channel(running.target) as channel:
        training = training_pb2_grpc.TrainingServiceStub(channel)
        models = model_pb2_grpc.ModelServiceStub(channel)
        datasets = dataset_pb2_grpc.DatasetServiceStub(channel)
        _upload(channel, t["alice"], "alice-data")
        job = _train(channel, t["alice"], "alice-model", "alice-data")  # no worker: stays queued
        assert job.owner == "alice"
        _publish_version(settings, "alice-model")

        cancel = training_pb2.CancelJobRequest(job_id=job.id)
        with caplog.at_level(logging.WARNING, logger="fitserve.audit"):
            message = _refused(
                Code.PERMISSION_DENIED,
                lambda: training.CancelJob(cancel, metadata=_bearer(t["bob"])),
            )
        assert f"job {job.id} was created by token 'alice'" in message
        [denied] = [r for r in caplog.records if r.name == "fitserve.audit"]
        assert (denied.outcome, denied.token_name) == ("denied", "bob")  # type: ignore[attr-defined]
        caplog.clear()
        _refused(
            Code.PERMISSION_DENIED, lambda: _train(channel, t["bob"], "alice-model", "alice-data")
        )
        alias = model_pb2.SetAliasRequest(model_name="alice-model", alias="stable", version=1)
        _refused(Code.PERMISSION_DENIED, lambda: models.SetAlias(alias, metadata=_bearer(t["bob"])))
        delete = dataset_pb2.DeleteDatasetRequest(dataset="alice-data")
        _refused(
            Code.PERMISSION_DENIED,
            lambda: datasets.DeleteDataset(delete, metadata=_bearer(t["bob"])),
        )
        _refused(Code.PERMISSION_DENIED, lambda: _upload(channel, t["bob"], "alice-data"))

        # bob may read alice's work, and use her dataset for a model of his own
        model = models.GetModel(
            model_pb2.GetModelRequest(name="alice-model"), metadata=_bearer(t["bob"])
        )
        assert model.versions[0].uri == ""  # no server paths for anyone but admins
        _train(channel, t["bob"], "bob-model", "alice-data")

        assert models.SetAlias(alias, metadata=_bearer(t["alice"])).version == 1
        admin_view = models.GetModel(
            model_pb2.GetModelRequest(name="alice-model"), metadata=_bearer(t["ops"])
        )
        assert admin_view.versions[0].uri.startswith(str(settings.data_dir))
        with caplog.at_level(logging.INFO, logger="fitserve.audit"):
            assert training.CancelJob(cancel, metadata=_bearer(t["ops"])).state in (
                training_pb2.JOB_STATE_CANCELLED,
                training_pb2.JOB_STATE_CANCELLING,
            )
        [line] = [r for r in caplog.records if r.name == "fitserve.audit" and r.levelname == "INFO"]
        assert (line.audit, line.token_name, line.target_job) == ("job.cancel", "ops", job.id)  # type: ignore[attr-defined]


def _publish_version(settings: Settings, name: str) -> None:
    """A version in the store as a worker would publish it (metadata only: never loaded)."""
    store = ModelStore(settings.models_dir)
    staging = store.staging_dir(name, "job-1")
    (staging / "fitserve.json").write_text('{"created_at": 1.0, "job_id": "job-1"}')
    store.publish(name, "job-1", staging)


def test_quotas_refuse_with_resource_exhausted_naming_the_quota(
    secured: tuple[Settings, RunningServer, TokenStore],
) -> None:
    _, running, store = secured
    token, _ = store.create("small", Role.TRAINER, max_queued_jobs=2, max_dataset_bytes=6000)
    time.sleep(4 * FAST.refresh_seconds)
    with grpc.insecure_channel(running.target) as channel:
        _upload(channel, token, "d1", rows=16)
        message = _refused(Code.RESOURCE_EXHAUSTED, lambda: _upload(channel, token, "d2", rows=600))
        assert "quota of 6000 dataset bytes" in message
        datasets = dataset_pb2_grpc.DatasetServiceStub(channel)
        assert [d.name for d in datasets.ListDatasets(
            dataset_pb2.ListDatasetsRequest(), metadata=_bearer(token)
        ).datasets] == ["d1"]  # fmt: skip
        first = _train(channel, token, "m1", "d1")
        _train(channel, token, "m2", "d1")
        message = _refused(Code.RESOURCE_EXHAUSTED, lambda: _train(channel, token, "m3", "d1"))
        assert "its quota of queued jobs is 2" in message
        training = training_pb2_grpc.TrainingServiceStub(channel)
        training.CancelJob(training_pb2.CancelJobRequest(job_id=first.id), metadata=_bearer(token))
        _train(channel, token, "m3", "d1")  # a finished job frees its place


# --- revocation, start-up rules -----------------------------------------------------------


def test_a_revoked_token_is_refused_by_every_api_process_within_seconds(tmp_path: Path) -> None:
    env = {"FITSERVE_AUTH__REFRESH_SECONDS": "0.5"}
    api = ServerPart(args=("--roles", "api"), env=env)
    data = tmp_path / "data"
    with Stack(tmp_path / "a", data_dir=data, server=api, worker=None, cwd=ROOT) as first:
        store = TokenStore(redis.Redis.from_url(first.redis_url, decode_responses=True))
        token, _ = store.create("ci", Role.VIEWER)
        with Stack(
            tmp_path / "b",
            data_dir=data,
            redis_url=first.redis_url,
            server=api,
            worker=None,
            cwd=ROOT,
        ) as second:
            targets = [first.target, second.target]
            assert all(_lists(t, token) is Code.OK for t in _settled(targets, token, Code.OK))
            store.revoke("ci")
            started = time.monotonic()
            refused = _settled(targets, token, Code.UNAUTHENTICATED)
            took = time.monotonic() - started
    assert len(refused) == 2
    assert took < 5.0, f"revocation took {took:.1f} s to reach both processes"


def _lists(target: str, token: str) -> Code:
    with grpc.insecure_channel(target) as channel:
        try:
            model_pb2_grpc.ModelServiceStub(channel).ListModels(
                model_pb2.ListModelsRequest(),
                metadata=_bearer(token) if token else None,
                timeout=10,
            )
        except grpc.RpcError as exc:
            return exc.code()  # type: ignore[attr-defined,no-any-return]
    return Code.OK


def _settled(targets: list[str], token: str, want: Code, within: float = 10.0) -> list[str]:
    """The targets, once every one answers ``want`` (polled: each re-reads on its own)."""
    deadline = time.monotonic() + within
    while (codes := [_lists(t, token) for t in targets]) != [want] * len(targets):
        assert time.monotonic() < deadline, f"still {codes} after {within} s"
        time.sleep(0.1)  # a poll of two other processes' state
    return targets


def test_binding_beyond_loopback_without_tokens_refuses_to_start(tmp_path: Path) -> None:
    with Stack(tmp_path, server=None, worker=None) as stack:
        env = {**os.environ, "FITSERVE_REDIS_URL": stack.redis_url}
        argv = [*serve_argv("--host", "0.0.0.0", "--port", "0", "--roles", "api")]
        argv += ["--data-dir", str(tmp_path / "d")]
        refused = subprocess.run(
            argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
        )
        assert refused.returncode == 2
        assert "binds beyond loopback and no token exists" in refused.stderr
        assert "fitserve tokens create --role admin" in refused.stderr

        TokenStore(redis.Redis.from_url(stack.redis_url, decode_responses=True)).create(
            "ops", Role.ADMIN
        )
        server = ServerPart(host="0.0.0.0", args=("--roles", "api"))
        with Stack(
            tmp_path / "s", redis_url=stack.redis_url, server=server, worker=None, cwd=ROOT
        ) as started:
            assert _lists(f"127.0.0.1:{started.port}", "fst_x") is Code.UNAUTHENTICATED


def test_auth_none_starts_anywhere_and_warns(tmp_path: Path) -> None:
    server = ServerPart(host="0.0.0.0", args=("--roles", "api"), env={"FITSERVE_AUTH": "none"})
    with Stack(tmp_path, server=server, worker=None, cwd=ROOT) as stack:
        assert _lists(f"127.0.0.1:{stack.port}", "") is Code.OK  # anyone may call
    log = stack.logs["server"].read_text()
    assert "authentication is OFF (FITSERVE_AUTH=none)" in log
