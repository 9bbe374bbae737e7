"""How a Client proves who it is and whom it talks to: a bearer token and TLS.

Arguments win over the environment: ``Client(token=None, tls=None)`` (the defaults) read
``FITSERVE_TOKEN`` and ``FITSERVE_TLS`` / ``FITSERVE_TLS_CA`` / ``FITSERVE_TLS_CERT`` /
``FITSERVE_TLS_KEY``; any other value given is used as is, the environment ignored.

The token travels as per-call metadata ``authorization: Bearer <token>`` on every call
(unary, streaming, and each retry of a call, as gRPC resends a call's metadata), over TLS
and plaintext alike: gRPC's call credentials would refuse a plaintext channel. It is never
printed: no repr, error message or log line here holds it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc

__all__ = ["TlsOptions", "auth_metadata", "resolve_tls", "resolve_token"]

PemSource = bytes | str | os.PathLike[str]
"""PEM content (bytes, or text with a ``-----BEGIN`` line) or the path of a PEM file."""

TARGET_ENV = "FITSERVE_TARGET"
DEFAULT_TARGET = "localhost:50051"
TOKEN_ENV = "FITSERVE_TOKEN"
TLS_ENV = "FITSERVE_TLS"
CA_ENV = "FITSERVE_TLS_CA"
CERT_ENV = "FITSERVE_TLS_CERT"
KEY_ENV = "FITSERVE_TLS_KEY"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


@dataclass(frozen=True)
class TlsOptions:
    """TLS of a Client's channel: whom to trust and, for mutual TLS, who the client is.

    `ca`: the certificates the server's must chain to (None: the system's roots). `cert`
    and `key`: the client's certificate chain and private key, for a server that requires
    client certificates (both or neither). Each is PEM bytes, PEM text, or a file path.
    `server_name`: the name to check the server's certificate against, when it differs
    from the target's host (e.g. connecting by IP address).
    """

    ca: PemSource | None = None
    cert: PemSource | None = None
    key: PemSource | None = field(default=None, repr=False)
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("TLS client certificate and key go together: give both or neither")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> TlsOptions | None:
        """The options the environment gives: files named by FITSERVE_TLS_CA, _CERT and
        _KEY, or the system's roots with FITSERVE_TLS=1; None: plaintext."""
        env = os.environ if environ is None else environ
        ca, cert, key = (env.get(name) or None for name in (CA_ENV, CERT_ENV, KEY_ENV))
        flag = env.get(TLS_ENV, "").strip().lower()
        if flag not in _TRUE + _FALSE:
            raise ValueError(f"{TLS_ENV}={flag!r}: expected 1 or 0")
        if ca is None and cert is None and key is None:
            return cls() if flag in _TRUE else None
        if (cert is None) != (key is None):
            raise ValueError(f"{CERT_ENV} and {KEY_ENV} go together: set both or neither")
        return cls(ca=ca, cert=cert, key=key)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """gRPC credentials holding the PEM content; raises OSError naming an unreadable file."""
        return grpc.ssl_channel_credentials(
            root_certificates=_pem(self.ca, "ca"),
            private_key=_pem(self.key, "key"),
            certificate_chain=_pem(self.cert, "cert"),
        )

    def channel_options(self) -> list[tuple[str, Any]]:
        """The channel options these settings need (the server name override)."""
        if not self.server_name:
            return []
        return [("grpc.ssl_target_name_override", self.server_name)]


def _pem(source: PemSource | None, what: str) -> bytes | None:
    if source is None:
        return None
    if isinstance(source, bytes):
        return source
    if isinstance(source, str) and "-----BEGIN " in source:
        return source.encode("ascii")
    path = os.fspath(source)
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise OSError(exc.errno, f"TLS {what} file {path}: {exc.strerror}") from None


def resolve_tls(
    tls: bool | TlsOptions | None, environ: Mapping[str, str] | None = None
) -> TlsOptions | None:
    """What `Client(tls=...)` means: None reads the environment, False is plaintext,
    True the system's roots, options are used as given."""
    if tls is None:
        return TlsOptions.from_env(environ)
    if tls is True:
        return TlsOptions()
    if tls is False:
        return None
    if not isinstance(tls, TlsOptions):
        raise TypeError(f"tls must be True, False, None or fitserve.TlsOptions, not {type(tls)}")
    return tls


def resolve_target(target: str | None, environ: Mapping[str, str] | None = None) -> str:
    """The server address: the argument, else FITSERVE_TARGET, else localhost:50051 (the
    CLI's --target default is the same)."""
    if target is None:
        target = (os.environ if environ is None else environ).get(TARGET_ENV, "")
    return target.strip() or DEFAULT_TARGET


def resolve_token(token: str | None, environ: Mapping[str, str] | None = None) -> str | None:
    """The bearer token: the argument, else FITSERVE_TOKEN; "" means none. A leading
    "Bearer " is dropped; a value that cannot be a gRPC header is refused (not shown)."""
    if token is None:
        token = (os.environ if environ is None else environ).get(TOKEN_ENV, "")
    token = token.strip()
    if token[:7].lower() == "bearer ":
        token = token[7:].strip()
    if not token:
        return None
    if not token.isascii() or not token.isprintable() or " " in token:
        raise ValueError(
            "the fitserve token holds spaces or characters outside printable ASCII; "
            f"check the token argument or {TOKEN_ENV}"
        )
    return token


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The metadata that carries ``token``: ``authorization: Bearer <token>``."""
    return () if token is None else (("authorization", f"Bearer {token}"),)
