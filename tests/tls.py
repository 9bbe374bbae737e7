"""Certificates made in the test (trustme): a CA, a server certificate and a client one,
written as PEM files, as an operator would hand them to fitserve. Nothing leaves the machine."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import trustme


@dataclass(frozen=True)
class Pki:
    """A CA and what it signed, as files in ``folder``."""

    folder: Path
    ca: trustme.CA
    ca_file: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    @property
    def ca_pem(self) -> bytes:
        return self.ca_file.read_bytes()


def make_pki(folder: Path, server_names: tuple[str, ...] = ("localhost", "127.0.0.1")) -> Pki:
    """A new CA in ``folder``, with a server certificate for ``server_names`` and a client
    certificate, each with its key."""
    folder.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(organization_name="fitserve tests")
    server = ca.issue_cert(*server_names)
    client = ca.issue_cert("client@fitserve.test", common_name="fitserve test client")
    files = {
        "ca.pem": ca.cert_pem.bytes(),
        "server.pem": b"".join(blob.bytes() for blob in server.cert_chain_pems),
        "server.key": server.private_key_pem.bytes(),
        "client.pem": b"".join(blob.bytes() for blob in client.cert_chain_pems),
        "client.key": client.private_key_pem.bytes(),
    }
    for name, content in files.items():
        (folder / name).write_bytes(content)
        (folder / name).chmod(0o600)
    return Pki(
        folder,
        ca,
        folder / "ca.pem",
        folder / "server.pem",
        folder / "server.key",
        folder / "client.pem",
        folder / "client.key",
    )
