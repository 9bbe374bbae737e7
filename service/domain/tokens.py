"""API tokens: who may call, in which role, within which quotas. Stored hashed in Redis.

A token is ``fst_`` and 43 URL-safe characters (32 random bytes). Redis holds only its
SHA-256 digest (a hash ``fitserve:tokens``: digest → JSON record), so whoever reads Redis
or its AOF learns who has access but holds no working credential. A fast hash is the right
one here: the secret is random and long, so nothing is gained by a slow one, and servers
check a token on every call. Every api and inference replica reads the same hash, and
re-reads it every few seconds (``service.api.auth``), so creating or revoking a token takes
effect everywhere within that time.

``TokenStore`` is the operator's side (the ``fitserve tokens`` command); servers only read.
"""

from __future__ import annotations

import enum
import hashlib
import json
import secrets
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import cast

import redis

from service.domain.files import write_private
from service.errors import AlreadyExists, InvalidRequest, NotFound

TOKENS_KEY = "fitserve:tokens"
# Set with the first token and never unset: from then on, auto mode requires tokens even
# when every one has been revoked (revoking the last token must not open the server).
ENABLED_KEY = "fitserve:auth_enabled"
PREFIX = "fst_"
NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.@")
MAX_NAME = 64


class Role(enum.StrEnum):
    """What a token may do (``service.api.auth`` maps each RPC to the roles allowed it)."""

    ADMIN = "admin"  # everything, on everyone's datasets, jobs and models
    TRAINER = "trainer"  # datasets, jobs and models it creates; reads and predicts on all
    PREDICTOR = "predictor"  # Predict, Feedback and model metadata
    VIEWER = "viewer"  # read-only


@dataclass(frozen=True)
class TokenRecord:
    """What Redis keeps of one token: never the token itself."""

    name: str
    role: Role
    created_at: float
    max_queued_jobs: int | None = None  # None: the server's default
    max_dataset_bytes: int | None = None

    def encode(self) -> str:
        return json.dumps({**asdict(self), "role": self.role.value})

    @classmethod
    def decode(cls, raw: str | bytes) -> TokenRecord:
        data = json.loads(raw)
        return cls(
            name=str(data["name"]),
            role=Role(data["role"]),
            created_at=float(data["created_at"]),
            max_queued_jobs=data.get("max_queued_jobs"),
            max_dataset_bytes=data.get("max_dataset_bytes"),
        )


def digest(token: str) -> str:
    """The SHA-256 of a token, as Redis stores it."""
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def new_token() -> str:
    return PREFIX + secrets.token_urlsafe(32)


def decode_table(raw: Mapping[str, str]) -> dict[str, TokenRecord]:
    """digest → record, from the Redis hash; records that do not parse are left out."""
    table: dict[str, TokenRecord] = {}
    for key, value in raw.items():
        try:
            table[key] = TokenRecord.decode(value)
        except (ValueError, KeyError, TypeError):
            continue
    return table


def check_name(name: str) -> str:
    if not name or len(name) > MAX_NAME or not set(name) <= NAME_CHARS:
        raise InvalidRequest(
            f"token name must be 1-{MAX_NAME} characters of letters, digits and -_.@",
            field="name",
        )
    return name


class TokenStore:
    """Create, list and revoke tokens (the operator's ``fitserve tokens`` command)."""

    def __init__(self, client: redis.Redis) -> None:
        self._r = client

    def create(
        self,
        name: str,
        role: Role,
        *,
        max_queued_jobs: int | None = None,
        max_dataset_bytes: int | None = None,
    ) -> tuple[str, TokenRecord]:
        """A new token: returns it (shown once, never stored) and its record."""
        check_name(name)
        if any(r.name == name for r in self.list()):
            raise AlreadyExists(f"a token named {name!r} exists; revoke it first or pick another")
        token = new_token()
        record = TokenRecord(name, role, time.time(), max_queued_jobs, max_dataset_bytes)
        with self._r.pipeline(transaction=True) as pipe:
            pipe.hset(TOKENS_KEY, digest(token), record.encode())
            pipe.set(ENABLED_KEY, "1")
            pipe.execute()
        return token, record

    def list(self) -> list[TokenRecord]:
        return sorted(decode_table(self._raw()).values(), key=lambda r: r.created_at)

    def revoke(self, name: str) -> TokenRecord:
        """Remove the token named ``name``; servers refuse it within their refresh period."""
        for key, record in decode_table(self._raw()).items():
            if record.name == name:
                self._r.hdel(TOKENS_KEY, key)
                return record
        raise NotFound(f"no token named {name!r}")

    def bootstrap_admin(self, path: Path, name: str = "fitserve-up-admin") -> bool:
        """The first admin token of a new stack, written to ``path`` (owner-only) for the
        operator to read; only when no token has ever existed here. Returns whether
        ``path`` holds a token that is valid now (made now, or by an earlier start).

        When Redis has lost its data (no token and no trace of one ever: a FLUSHALL, a
        Redis restarted without its AOF or RDB), the token ``path`` holds is registered
        again as that admin: the operator keeps the access they had, and no other token
        comes back (those must be created again)."""
        if path.exists():
            token = path.read_text().strip()
            if digest(token) in self._raw():
                return True
            if token.startswith(PREFIX) and not self._r.exists(ENABLED_KEY) and not self._raw():
                record = TokenRecord(name, Role.ADMIN, time.time())
                with self._r.pipeline(transaction=True) as pipe:
                    pipe.hset(TOKENS_KEY, digest(token), record.encode())
                    pipe.set(ENABLED_KEY, "1")
                    pipe.execute()
                return True
            return False
        if self._r.exists(ENABLED_KEY) or self._raw():
            return False  # tokens are managed already: never mint one behind the operator
        token, _ = self.create(name, Role.ADMIN)
        write_private(path, token + "\n")
        return True

    def _raw(self) -> dict[str, str]:
        raw = cast(Mapping[str | bytes, str | bytes], self._r.hgetall(TOKENS_KEY))
        return {_str(k): _str(v) for k, v in raw.items()}


def _str(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
