"""The server's TLS settings (FITSERVE_TLS__*) and the umask (FITSERVE_UMASK): read from the
environment, and TLS files checked with messages that name the setting and the path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pydantic
import pytest

from service.config import Settings, TlsFileError, TlsSettings
from tests.conftest import ROOT
from tests.tls import Pki, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def test_tls_is_off_by_default() -> None:
    tls = Settings().tls
    assert not tls.enabled
    assert tls.mode == "plaintext"


def test_the_tls_variables_turn_tls_and_mtls_on(monkeypatch: pytest.MonkeyPatch, pki: Pki) -> None:
    monkeypatch.setenv("FITSERVE_TLS__CERT_FILE", str(pki.server_cert))
    monkeypatch.setenv("FITSERVE_TLS__KEY_FILE", str(pki.server_key))
    assert Settings().tls.mode == "TLS"
    monkeypatch.setenv("FITSERVE_TLS__CLIENT_CA_FILE", str(pki.ca_file))
    tls = Settings().tls
    assert tls.mode == "mTLS"
    cert, key, client_ca = tls.read()
    assert (cert, key, client_ca) == (
        pki.server_cert.read_bytes(),
        pki.server_key.read_bytes(),
        pki.ca_pem,
    )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"cert_file": "a.pem"}, "FITSERVE_TLS__CERT_FILE and FITSERVE_TLS__KEY_FILE go together"),
        ({"key_file": "a.key"}, "FITSERVE_TLS__CERT_FILE and FITSERVE_TLS__KEY_FILE go together"),
        ({"client_ca_file": "ca.pem"}, "FITSERVE_TLS__CLIENT_CA_FILE .* needs"),
    ],
)
def test_an_incomplete_tls_setting_is_refused(fields: dict[str, str], message: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=message):
        TlsSettings.model_validate(fields)


def test_a_missing_file_names_its_setting_and_path(pki: Pki, tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    tls = TlsSettings(cert_file=missing, key_file=pki.server_key)
    with pytest.raises(TlsFileError, match=f"FITSERVE_TLS__CERT_FILE={missing}: cannot read it"):
        tls.read()
    tls = TlsSettings(cert_file=pki.server_cert, key_file=pki.server_key, client_ca_file=missing)
    with pytest.raises(TlsFileError, match=f"FITSERVE_TLS__CLIENT_CA_FILE={missing}: cannot read"):
        tls.read()


def test_an_unreadable_key_names_its_setting(pki: Pki, tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads any file")
    key = tmp_path / "server.key"
    key.write_bytes(pki.server_key.read_bytes())
    key.chmod(0)
    tls = TlsSettings(cert_file=pki.server_cert, key_file=key)
    with pytest.raises(TlsFileError, match=f"FITSERVE_TLS__KEY_FILE={key}: cannot read it"):
        tls.read()


def test_a_file_that_is_not_pem_is_refused(pki: Pki, tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    tls = TlsSettings(cert_file=junk, key_file=pki.server_key)
    with pytest.raises(TlsFileError, match=f"FITSERVE_TLS__CERT_FILE={junk}: not a PEM file"):
        tls.read()


def test_a_key_of_another_certificate_is_refused(pki: Pki) -> None:
    tls = TlsSettings(cert_file=pki.server_cert, key_file=pki.client_key)
    with pytest.raises(TlsFileError, match="are not a certificate and its private key"):
        tls.read()


def test_serve_with_a_missing_certificate_stops_at_once_naming_it(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FITSERVE_")}
    env |= {
        "FITSERVE_TLS__CERT_FILE": str(tmp_path / "server.pem"),
        "FITSERVE_TLS__KEY_FILE": str(tmp_path / "server.key"),
    }
    argv = [sys.executable, "-m", "service.main", "serve", "--port", "0"]
    argv += ["--data-dir", str(tmp_path / "data")]
    done = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"fitserve serve: FITSERVE_TLS__CERT_FILE={tmp_path / 'server.pem'}: "
        "cannot read it (No such file or directory)"
    )


@pytest.mark.parametrize(
    ("value", "umask"), [("077", 0o077), ("0o027", 0o027), ("0022", 0o022), ("null", None)]
)
def test_the_umask_is_octal(monkeypatch: pytest.MonkeyPatch, value: str, umask: int | None) -> None:
    monkeypatch.setenv("FITSERVE_UMASK", value)
    assert Settings().umask == umask


def test_the_umask_is_owner_only_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FITSERVE_UMASK", raising=False)
    assert Settings().umask == 0o077


@pytest.mark.parametrize("value", ["8", "rwx", "1000"])
def test_a_umask_that_is_not_octal_is_refused(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("FITSERVE_UMASK", value)
    with pytest.raises(pydantic.ValidationError, match="umask"):
        Settings()
