"""The SDK's and CLI's credentials: a bearer token on every call (unary, streaming, each
retry), TLS and mutual TLS with certificates made here, and the environment defaults
(arguments win). Fake servicers on a real gRPC server over loopback."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

import fitserve
from fitserve import _credentials, cli
from fitserve.v1 import dataset_pb2_grpc, inference_pb2_grpc, model_pb2_grpc, training_pb2_grpc
from tests.tls import Pki, make_pki
from tests.unit.clients.test_client import (
    FakeDatasets,
    FakeInference,
    FakeModels,
    FakeTraining,
    state_event,
)

TOKEN = "fst_0123456789abcdefSECRET"
ENV = ("FITSERVE_TOKEN", "FITSERVE_TLS", "FITSERVE_TLS_CA", "FITSERVE_TLS_CERT", "FITSERVE_TLS_KEY")


class Recorder(grpc.ServerInterceptor):
    """Every call's method and metadata, as the server receives them (retries included)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, str | bytes]]] = []

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        metadata = dict(handler_call_details.invocation_metadata)  # type: ignore[attr-defined]
        self.calls.append((handler_call_details.method, metadata))  # type: ignore[attr-defined]
        return continuation(handler_call_details)

    def authorizations(self) -> list[str | bytes | None]:
        return [metadata.get("authorization") for _, metadata in self.calls]


@dataclass
class Fake:
    target: str
    recorder: Recorder
    training: FakeTraining
    inference: FakeInference


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _serve(credentials: grpc.ServerCredentials | None) -> Iterator[Fake]:
    recorder = Recorder()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), interceptors=[recorder])
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    fake = Fake(f"127.0.0.1:{port}", recorder, FakeTraining(), FakeInference())
    dataset_pb2_grpc.add_DatasetServiceServicer_to_server(FakeDatasets(), server)
    training_pb2_grpc.add_TrainingServiceServicer_to_server(fake.training, server)
    model_pb2_grpc.add_ModelServiceServicer_to_server(FakeModels(), server)
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(fake.inference, server)
    server.start()
    yield fake
    server.stop(grace=None).wait()


def _server_credentials(pki: Pki, *, mutual: bool) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials(
        [(pki.server_key.read_bytes(), pki.server_cert.read_bytes())],
        root_certificates=pki.ca_pem if mutual else None,
        require_client_auth=mutual,
    )


@pytest.fixture
def plain() -> Iterator[Fake]:
    yield from _serve(None)


@pytest.fixture
def tls(pki: Pki) -> Iterator[Fake]:
    yield from _serve(_server_credentials(pki, mutual=False))


@pytest.fixture
def mtls(pki: Pki) -> Iterator[Fake]:
    yield from _serve(_server_credentials(pki, mutual=True))


# -- the token ---------------------------------------------------------------------------


def test_the_token_goes_with_every_kind_of_call_and_every_retry(plain: Fake) -> None:
    plain.training.events = [state_event(1, fitserve.v1.training_pb2.JOB_STATE_SUCCEEDED)]
    plain.training.jobs["job-1"] = fitserve.v1.training_pb2.Job(id="job-1")
    plain.inference.refusals = 2  # Predict is refused twice, then answers: three attempts
    plain.inference.outputs = {"y": np.zeros((1, 2), np.float32)}
    with fitserve.Client(plain.target, timeout=10, token=TOKEN) as client:
        client.upload_dataset("d", x=np.zeros((4, 2)), y=np.zeros(4))  # client streaming
        list(client.watch_job("job-1"))  # server streaming
        with pytest.raises(fitserve.NotFoundError):
            client.get_model("m")  # unary, failing
        client.predict("busy", np.zeros((1, 3), np.float32))  # unary with gRPC retries

    methods = [method.rsplit("/", 1)[1] for method, _ in plain.recorder.calls]
    assert methods == ["UploadDataset", "WatchJob", "GetModel", "Predict", "Predict", "Predict"]
    assert plain.recorder.authorizations() == [f"Bearer {TOKEN}"] * 6


def test_the_token_comes_from_fitserve_token_unless_given(
    plain: Fake, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FITSERVE_TOKEN", "fst_from_env")
    for token, sent in ((None, "Bearer fst_from_env"), ("fst_arg", "Bearer fst_arg"), ("", None)):
        with fitserve.Client(plain.target, timeout=10, token=token) as client:
            client.list_models()
            next(iter(client.list_models()))
        assert plain.recorder.authorizations()[-1] == sent


def test_no_token_no_authorization(plain: Fake) -> None:
    with fitserve.Client(plain.target, timeout=10) as client:
        next(iter(client.list_models()))
    assert plain.recorder.authorizations() == [None]


@pytest.mark.parametrize(
    ("given", "token"),
    [("fst_a", "fst_a"), ("  fst_a\n", "fst_a"), ("Bearer fst_a", "fst_a"), ("", None)],
)
def test_tokens_are_trimmed(given: str, token: str | None) -> None:
    assert _credentials.resolve_token(given, {}) == token


@pytest.mark.parametrize("bad", ["fst_a b", "fst_\x00", "fst_é"])
def test_a_token_that_cannot_be_a_header_is_refused_without_showing_it(bad: str) -> None:
    with pytest.raises(ValueError, match="FITSERVE_TOKEN") as refused:
        fitserve.Client("127.0.0.1:1", token=bad)
    assert bad not in str(refused.value)


def test_the_token_is_passed_once() -> None:
    with pytest.raises(ValueError, match="pass the token once"):
        fitserve.Client("127.0.0.1:1", token="t", metadata=[("authorization", "Bearer u")])


def test_the_token_is_in_no_repr_or_error(plain: Fake) -> None:
    with fitserve.Client(plain.target, timeout=10, token=TOKEN) as client:
        assert TOKEN not in repr(client)
        assert TOKEN not in str(vars(client).get("_channel"))
        with pytest.raises(fitserve.NotFoundError) as error:
            client.get_model("m")
    assert TOKEN not in str(error.value)
    assert TOKEN not in repr(fitserve.TlsOptions(cert=b"-----BEGIN ", key=TOKEN.encode()))


# -- TLS -------------------------------------------------------------------------------


def test_tls_with_the_ca_reaches_a_tls_server_with_the_token(tls: Fake, pki: Pki) -> None:
    for ca in (pki.ca_pem, pki.ca_file, str(pki.ca_file), pki.ca_pem.decode()):
        options = fitserve.TlsOptions(ca=ca)
        with fitserve.Client(tls.target, timeout=10, token=TOKEN, tls=options) as client:
            assert next(iter(client.list_models())).name == "mnist"
    assert tls.recorder.authorizations() == [f"Bearer {TOKEN}"] * 4


@pytest.mark.parametrize("tls_arg", [False, True], ids=["plaintext", "system-roots"])
def test_a_client_that_cannot_speak_to_the_tls_server_is_unavailable(
    tls: Fake, tls_arg: bool
) -> None:
    with (
        fitserve.Client(tls.target, timeout=5, tls=tls_arg) as client,
        pytest.raises(fitserve.UnavailableError),
    ):
        next(iter(client.list_models()))
    assert tls.recorder.calls == []  # nothing reached a handler


def test_mutual_tls_needs_the_client_certificate(mtls: Fake, pki: Pki) -> None:
    without = fitserve.TlsOptions(ca=pki.ca_file)
    with (
        fitserve.Client(mtls.target, timeout=5, tls=without) as client,
        pytest.raises(fitserve.UnavailableError),
    ):
        next(iter(client.list_models()))
    assert mtls.recorder.calls == []

    with_cert = fitserve.TlsOptions(ca=pki.ca_file, cert=pki.client_cert, key=pki.client_key)
    with fitserve.Client(mtls.target, timeout=10, tls=with_cert) as client:
        assert next(iter(client.list_models())).name == "mnist"
    assert len(mtls.recorder.calls) == 1


def test_the_server_name_can_be_overridden(tmp_path: Path) -> None:
    other = make_pki(tmp_path / "pki", server_names=("fitserve.internal",))
    credentials = grpc.ssl_server_credentials(
        [(other.server_key.read_bytes(), other.server_cert.read_bytes())]
    )
    for fake in _serve(credentials):
        wrong_name = fitserve.TlsOptions(ca=other.ca_file)  # checked against 127.0.0.1
        with (
            fitserve.Client(fake.target, timeout=5, tls=wrong_name) as client,
            pytest.raises(fitserve.UnavailableError),
        ):
            next(iter(client.list_models()))
        named = fitserve.TlsOptions(ca=other.ca_file, server_name="fitserve.internal")
        with fitserve.Client(fake.target, timeout=10, tls=named) as client:
            assert next(iter(client.list_models())).name == "mnist"


def test_the_environment_gives_tls_and_the_token(
    mtls: Fake, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FITSERVE_TOKEN", TOKEN)
    monkeypatch.setenv("FITSERVE_TLS_CA", str(pki.ca_file))
    monkeypatch.setenv("FITSERVE_TLS_CERT", str(pki.client_cert))
    monkeypatch.setenv("FITSERVE_TLS_KEY", str(pki.client_key))
    with fitserve.Client(mtls.target, timeout=10) as client:
        assert next(iter(client.list_models())).name == "mnist"
    assert mtls.recorder.authorizations() == [f"Bearer {TOKEN}"]
    with (
        fitserve.Client(mtls.target, timeout=5, tls=False) as client,  # the argument wins
        pytest.raises(fitserve.UnavailableError),
    ):
        next(iter(client.list_models()))


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"FITSERVE_TLS": "0"}, None),
        ({"FITSERVE_TLS": "1"}, fitserve.TlsOptions()),
        ({"FITSERVE_TLS": "true"}, fitserve.TlsOptions()),
        ({"FITSERVE_TLS_CA": "/ca.pem"}, fitserve.TlsOptions(ca="/ca.pem")),
        (
            {"FITSERVE_TLS_CERT": "/c.pem", "FITSERVE_TLS_KEY": "/c.key"},
            fitserve.TlsOptions(cert="/c.pem", key="/c.key"),
        ),
    ],
)
def test_tls_from_the_environment(env: dict[str, str], expected: object) -> None:
    assert _credentials.resolve_tls(None, env) == expected


def test_arguments_win_over_the_environment() -> None:
    env = {"FITSERVE_TLS_CA": "/ca.pem", "FITSERVE_TLS": "1"}
    assert _credentials.resolve_tls(False, env) is None
    assert _credentials.resolve_tls(True, env) == fitserve.TlsOptions()
    given = fitserve.TlsOptions(ca=b"-----BEGIN CERTIFICATE-----")
    assert _credentials.resolve_tls(given, env) is given


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"FITSERVE_TLS_CERT": "/c.pem"}, "FITSERVE_TLS_CERT and FITSERVE_TLS_KEY go together"),
        ({"FITSERVE_TLS": "maybe"}, "FITSERVE_TLS='maybe'"),
    ],
)
def test_incomplete_tls_environment_is_refused(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _credentials.resolve_tls(None, env)


def test_a_certificate_needs_its_key() -> None:
    with pytest.raises(ValueError, match="certificate and key go together"):
        fitserve.TlsOptions(cert="/c.pem")


def test_an_unreadable_tls_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "ca.pem"
    with pytest.raises(OSError, match=f"TLS ca file {missing}: No such file"):
        fitserve.Client("127.0.0.1:1", tls=fitserve.TlsOptions(ca=missing))


# -- the command line --------------------------------------------------------------------


def test_cli_with_tls_ca_and_token(tls: Fake, pki: Pki, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--target", tls.target, "--token", TOKEN, "--tls", "--ca", str(pki.ca_file)]
    assert cli.main([*argv, "models", "list"]) == 0
    assert "mnist" in capsys.readouterr().out
    assert tls.recorder.authorizations() == [f"Bearer {TOKEN}"]


def test_cli_mtls_from_the_environment(
    mtls: Fake, pki: Pki, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FITSERVE_TOKEN", TOKEN)
    monkeypatch.setenv("FITSERVE_TLS_CA", str(pki.ca_file))
    monkeypatch.setenv("FITSERVE_TLS_CERT", str(pki.client_cert))
    monkeypatch.setenv("FITSERVE_TLS_KEY", str(pki.client_key))
    assert cli.main(["--target", mtls.target, "models", "list"]) == 0
    assert "mnist" in capsys.readouterr().out
    assert mtls.recorder.authorizations() == [f"Bearer {TOKEN}"]
    assert (
        cli.main(["--target", mtls.target, "--no-tls", "--timeout", "5", "models", "list"])
        == cli.EXIT_UNAVAILABLE
    )
    assert "error:" in capsys.readouterr().err


def test_cli_without_tls_to_a_tls_server_fails(
    tls: Fake, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        cli.main(["--target", tls.target, "--timeout", "5", "models", "list"])
        == cli.EXIT_UNAVAILABLE
    )
    assert capsys.readouterr().err.startswith("error: ")


def test_cli_help_never_shows_the_token(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FITSERVE_TOKEN", TOKEN)
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert "--token" in out
    assert "--ca" in out
    assert TOKEN not in out


def test_cli_server_commands_skip_the_credential_options() -> None:
    argv = ["--token", "t", "--tls", "--ca", "ca.pem", "--cert", "c", "--key", "k", "up", "-v"]
    assert cli._server_command(argv) == ("up", ["-v"])


def test_the_target_comes_from_the_argument_then_fitserve_target() -> None:
    from fitserve._credentials import resolve_target

    assert resolve_target("server:1", {"FITSERVE_TARGET": "other:2"}) == "server:1"
    assert resolve_target(None, {"FITSERVE_TARGET": " other:2 "}) == "other:2"
    assert resolve_target(None, {}) == "localhost:50051"
    assert resolve_target(None, {"FITSERVE_TARGET": ""}) == "localhost:50051"
