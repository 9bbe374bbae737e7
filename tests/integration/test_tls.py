"""fitserve's gRPC port over TLS and mutual TLS, with a CA and certificates made here: the
SDK and the CLI with the CA, plaintext and untrusting clients refused, client
certificates required under mTLS, and `fitserve serve` configured by FITSERVE_TLS__*
(whose files, like everything it writes under the data dir, are owner-only)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import fitserve
from fitserve import cli
from service.config import Settings, TlsSettings
from service.launch.stack import ServerPart, Stack
from tests.conftest import ROOT, RunningServer, private_stack
from tests.tls import Pki, make_pki

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_server(
    pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Settings, RunningServer]]:
    tls = TlsSettings(cert_file=pki.server_cert, key_file=pki.server_key)
    with private_stack(tmp_path_factory.mktemp("tls"), tls=tls, roles=["api"]) as running:
        yield running


@pytest.fixture(scope="module")
def mtls_server(
    pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Settings, RunningServer]]:
    tls = TlsSettings(
        cert_file=pki.server_cert, key_file=pki.server_key, client_ca_file=pki.ca_file
    )
    with private_stack(tmp_path_factory.mktemp("mtls"), tls=tls, roles=["api"]) as running:
        yield running


@pytest.fixture(autouse=True)
def no_client_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("FITSERVE_TOKEN", "FITSERVE_TLS", "FITSERVE_TLS_CA"):
        monkeypatch.delenv(name, raising=False)
    for name in ("FITSERVE_TLS_CERT", "FITSERVE_TLS_KEY"):
        monkeypatch.delenv(name, raising=False)


def _arrays() -> dict[str, np.ndarray]:
    x = np.arange(24, dtype=np.float32).reshape(6, 4)
    return {"x": x, "y": np.arange(6)}


def test_the_sdk_with_the_ca_uploads_and_lists_over_tls(
    tls_server: tuple[Settings, RunningServer], pki: Pki
) -> None:
    _, running = tls_server
    with fitserve.Client(
        running.target, timeout=30, tls=fitserve.TlsOptions(ca=pki.ca_pem), token="fst_test"
    ) as client:
        dataset = client.upload_dataset("over-tls", **_arrays())
        assert [d.name for d in client.list_datasets()] == ["over-tls"]
    assert dataset.num_examples == 6


@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "system-roots"])
def test_a_client_without_the_servers_ca_is_unavailable(
    tls_server: tuple[Settings, RunningServer], tls: bool
) -> None:
    _, running = tls_server
    with (
        fitserve.Client(running.target, timeout=10, tls=tls) as client,
        pytest.raises(fitserve.UnavailableError),
    ):
        list(client.list_datasets())


def test_the_health_service_answers_over_tls(
    tls_server: tuple[Settings, RunningServer], pki: Pki
) -> None:
    _, running = tls_server
    credentials = grpc.ssl_channel_credentials(root_certificates=pki.ca_pem)
    with grpc.secure_channel(running.target, credentials) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=10
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_mtls_refuses_a_client_without_a_certificate_and_serves_one_with_it(
    mtls_server: tuple[Settings, RunningServer], pki: Pki
) -> None:
    _, running = mtls_server
    with (
        fitserve.Client(running.target, timeout=10, tls=fitserve.TlsOptions(ca=pki.ca_file)) as c,
        pytest.raises(fitserve.UnavailableError),
    ):
        list(c.list_datasets())

    stranger = make_pki(pki.folder / "stranger")  # a certificate another CA signed
    options = fitserve.TlsOptions(
        ca=pki.ca_file, cert=stranger.client_cert, key=stranger.client_key
    )
    with (
        fitserve.Client(running.target, timeout=10, tls=options) as c,
        pytest.raises(fitserve.UnavailableError),
    ):
        list(c.list_datasets())

    options = fitserve.TlsOptions(ca=pki.ca_file, cert=pki.client_cert, key=pki.client_key)
    with fitserve.Client(running.target, timeout=30, tls=options) as c:
        assert list(c.list_datasets()) == []


def test_the_cli_with_tls_and_ca(
    tls_server: tuple[Settings, RunningServer], pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    _, running = tls_server
    argv = ["--target", running.target, "--tls", "--ca", str(pki.ca_file), "--token", "fst_t"]
    assert cli.main([*argv, "datasets", "list"]) == 0
    assert "NAME" in capsys.readouterr().out
    assert (
        cli.main(["--target", running.target, "--timeout", "10", "datasets", "list"])
        == cli.EXIT_UNAVAILABLE
    )
    assert capsys.readouterr().err.startswith("error: ")


def test_the_cli_with_mtls_from_the_environment(
    mtls_server: tuple[Settings, RunningServer],
    pki: Pki,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, running = mtls_server
    monkeypatch.setenv("FITSERVE_TLS_CA", str(pki.ca_file))
    monkeypatch.setenv("FITSERVE_TLS_CERT", str(pki.client_cert))
    monkeypatch.setenv("FITSERVE_TLS_KEY", str(pki.client_key))
    assert cli.main(["--target", running.target, "datasets", "list"]) == 0
    assert "NAME" in capsys.readouterr().out


def test_fitserve_serve_takes_tls_from_the_environment_and_writes_owner_only_files(
    pki: Pki, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FITSERVE_")}
    env |= {"PYTHONPATH": str(ROOT), "FITSERVE_LOG_FORMAT": "text"}
    tls_env = {
        "FITSERVE_TLS__CERT_FILE": str(pki.server_cert),
        "FITSERVE_TLS__KEY_FILE": str(pki.server_key),
    }
    part = ServerPart(args=("--roles", "api"), env=tls_env)
    with Stack(tmp_path, server=part, worker=None, env=env, cwd=ROOT) as stack:
        tls = fitserve.TlsOptions(ca=pki.ca_file)
        with fitserve.Client(stack.target, timeout=30, tls=tls) as client:
            client.upload_dataset("private", **_arrays())
        with (
            fitserve.Client(stack.target, timeout=10, tls=False) as client,
            pytest.raises(fitserve.UnavailableError),
        ):
            list(client.list_datasets())
        banner = stack.logs["server"].read_text()
    assert f"; TLS (certificate {pki.server_cert})" in banner

    datasets = stack.data_dir / "datasets"
    made = [datasets, *datasets.rglob("*")]
    assert any(p.suffix == ".npz" for p in made)
    modes = {p.relative_to(stack.data_dir): stat.S_IMODE(p.stat().st_mode) for p in made}
    expected = {p.relative_to(stack.data_dir): 0o700 if p.is_dir() else 0o600 for p in made}
    assert modes == expected
