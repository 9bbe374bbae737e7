"""Who is calling: bearer tokens with roles, checked on every call before its handler.

``Authenticator`` is a server interceptor. It wraps each method's handler once: the wrapper
reads the ``authorization: Bearer <token>`` metadata, finds the token in a table kept in
memory (a dict lookup: a valid token costs Predict well under a microsecond more than none;
``make bench`` measures it), refuses a missing or unknown token with UNAUTHENTICATED and a
role the method does not allow with PERMISSION_DENIED, and sets ``caller_var`` for the
handler, which checks ownership (a trainer changes only what it created; ``owns``).

The table is the Redis hash of ``service.domain.tokens``, re-read every
``FITSERVE_AUTH__REFRESH_SECONDS``: a token created or revoked by ``fitserve tokens`` takes
effect on every replica within that time. While Redis cannot be read, the last table read
stays in force, so Predict rides through a Redis restart.

Whether tokens are required (``FITSERVE_AUTH``): ``tokens`` always; ``none`` never (warned
at every start); ``auto`` (the default) when the server binds beyond loopback, or once a
token has been created (and still after the last one is revoked: that locks the server,
it never opens it). A server that binds beyond loopback with ``auto`` and no token refuses to
start. Health checks and reflection are always open.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import ipaddress
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeAlias, cast

import grpc
import redis.asyncio as aioredis

from service import errors
from service.api.status import Context, RpcOutcomes
from service.config import Settings
from service.domain.tokens import ENABLED_KEY, TOKENS_KEY, Role, TokenRecord, decode_table, digest

log = logging.getLogger(__name__)
audit_log = logging.getLogger("fitserve.audit")

Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"

_T, _D, _M, _I, _S = (
    "/fitserve.v1.TrainingService/",
    "/fitserve.v1.DatasetService/",
    "/fitserve.v1.ModelService/",
    "/fitserve.v1.InferenceService/",
    "/tensorflow.serving.PredictionService/",
)
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
READ = frozenset(
    {
        *(_T + m for m in ("GetJob", "ListJobs", "WatchJob", "ListPlugins", "ListJobArtifacts")),
        *(_D + m for m in ("GetDataset", "ListDatasets")),
        *(_M + m for m in ("GetModel", "ListModels")),
        _I + "GetModelStatus",
        _S + "GetModelMetadata",
    }
)
PREDICT = frozenset(
    {
        _I + "Predict",
        _I + "Feedback",
        _I + "GetModelStatus",
        _M + "GetModel",
        _M + "ListModels",
        *(_S + m for m in ("Predict", "Classify", "Regress", "MultiInference", "GetModelMetadata")),
    }
)
TRAIN = frozenset(
    {
        *(_T + m for m in ("Train", "FineTune", "Evaluate", "CancelJob", "DownloadJobArtifact")),
        *(_D + m for m in ("UploadDataset", "DeleteDataset")),
        *(_M + m for m in ("SetAlias", "DeleteAlias", "DeleteVersion")),
    }
)
ALLOWED: dict[Role, frozenset[str]] = {
    Role.VIEWER: READ,
    Role.PREDICTOR: PREDICT,
    Role.TRAINER: READ | PREDICT | TRAIN,
}  # admin: every method, also those not listed here


@dataclass(frozen=True)
class Caller:
    """The identity a call runs as. ``name`` is "" when auth is off (anyone may do anything)."""

    name: str
    role: Role
    record: TokenRecord | None = None

    @property
    def is_admin(self) -> bool:
        return self.role is Role.ADMIN

    def owns(self, owner: str) -> bool:
        """May this caller change what ``owner`` created? Admins (and everyone when auth is
        off) may change anything; a trainer only what it created."""
        return self.is_admin or (bool(owner) and owner == self.name)

    def check_owner(self, owner: str, what: str) -> None:
        """Refuse, with PERMISSION_DENIED, a change to ``what`` that this caller did not create."""
        if not self.owns(owner):
            audit("denied", outcome="denied", target=what, owner=owner or "-")
            by = f"token {owner!r}" if owner else "no token (before auth, or by an admin)"
            raise errors.PermissionDenied(
                f"{what} was created by {by}; token {self.name!r} ({self.role.value}) may "
                "change only what it created (an admin token may change anything)"
            )


OPEN = Caller("", Role.ADMIN)
caller_var: contextvars.ContextVar[Caller] = contextvars.ContextVar("caller", default=OPEN)


def current_caller() -> Caller:
    return caller_var.get()


def audit(action: str, outcome: str = "ok", **fields: Any) -> None:
    """One structured line per change (logger ``fitserve.audit``): who did what to what;
    refusals by role or ownership too (``outcome`` "denied", at WARNING)."""
    caller = caller_var.get()
    audit_log.log(
        logging.INFO if outcome == "ok" else logging.WARNING,
        "%s by %s: %s",
        action,
        caller.name or "(no token)",
        ", ".join(f"{k}={v}" for k, v in fields.items()) or "-",
        extra={
            "audit": action,
            "token_name": caller.name,
            "role": caller.role.value,
            "outcome": outcome,
            **{f"target_{k}": v for k, v in fields.items()},
        },
    )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class AuthNotConfigured(RuntimeError):
    """The server would listen beyond loopback with no way to tell callers apart."""


class TokenTable:
    """The token hash of Redis, re-read every ``refresh`` seconds; lookups are in memory."""

    def __init__(self, client: aioredis.Redis, refresh: float) -> None:
        self._r, self._refresh = client, refresh
        self._by_digest: dict[str, TokenRecord] = {}
        self._by_token: dict[str, Caller] = {}  # tokens seen valid since the last read
        self.loaded = False
        self.enabled = False  # a token has existed: auto mode requires tokens from then on
        self._task: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._by_digest)

    async def read(self) -> None:
        async with self._r.pipeline(transaction=False) as pipe:
            pipe.hgetall(TOKENS_KEY)
            pipe.exists(ENABLED_KEY)
            raw, enabled = await pipe.execute()
        table = decode_table(cast(dict[str, str], raw))
        # Sticky: Redis losing its data (no token, no trace of one) must not open a server
        # that required tokens; it refuses every token until new ones are created.
        self.enabled = self.enabled or bool(enabled) or bool(table)
        if table != self._by_digest:
            self._by_digest, self._by_token = table, {}
        self.loaded = True

    def lookup(self, token: str) -> Caller | None:
        if (caller := self._by_token.get(token)) is not None:
            return caller
        record = self._by_digest.get(digest(token))
        if record is None:
            return None  # unknown tokens are never cached: a flood of them costs no memory
        caller = self._by_token[token] = Caller(record.name, record.role, record)
        return caller

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._follow())

    async def _follow(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(self._refresh)  # the refresh period itself
            try:
                await self.read()
            except Exception as exc:  # keep the last table: Predict rides through Redis restarts
                if not failing:
                    log.warning(
                        "could not re-read tokens (%s); the last ones read stay in force", exc
                    )
                failing = True
            else:
                if failing:
                    log.info("tokens re-read after Redis came back")
                failing = False

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._r.aclose()


class Authenticator(grpc.aio.ServerInterceptor):
    """Checks every call's token and role before its handler (see the module docstring)."""

    def __init__(self, settings: Settings, outcomes: RpcOutcomes) -> None:
        self.mode = settings.auth.mode
        self._outcomes = outcomes
        self._loopback = is_loopback(settings.host)
        self.table: TokenTable | None = None
        if self.mode != "none":
            client = aioredis.Redis.from_url(
                settings.redis_url, decode_responses=True, socket_timeout=5, max_connections=4
            )
            self.table = TokenTable(client, settings.auth.refresh_seconds)
        self._wrapped: dict[str, Handler] = {}

    async def start(self) -> None:
        """Read the tokens once; refuse to start where anyone on the network could call."""
        if self.table is None:
            log.warning(
                "authentication is OFF (FITSERVE_AUTH=none): every caller may train, delete "
                "and predict; use it only behind a gateway that authenticates"
            )
            return
        try:
            await self._first_read()
        except AuthNotConfigured:
            await self.table.close()
            raise
        if not self.required:
            log.warning(
                "authentication is off while no token exists (loopback only); it turns on "
                "with the first `fitserve tokens create`"
            )
        self.table.start()

    async def _first_read(self) -> None:
        assert self.table is not None
        try:
            await self.table.read()
        except Exception as exc:
            if not self._loopback or self.mode == "tokens":
                raise AuthNotConfigured(
                    f"could not read tokens from Redis ({exc}); refusing to start without them"
                ) from exc
            log.warning("could not read tokens from Redis (%s); retrying", exc)
        if self.mode == "auto" and not self._loopback and self.table.loaded and not self.table:
            # beyond loopback, a token must exist to start (revoked ones do not count)
            raise AuthNotConfigured(
                "this server binds beyond loopback and no token exists: create one first "
                "(fitserve tokens create --role admin --name ops), or set FITSERVE_AUTH=none "
                "if a gateway in front of it authenticates"
            )

    @property
    def required(self) -> bool:
        if self.table is None:
            return False
        return self.mode == "tokens" or not self._loopback or self.table.enabled

    async def close(self) -> None:
        if self.table is not None:
            await self.table.close()

    def authenticate(self, context: Context, method: str) -> Caller:
        """The caller of this call, or the refusal (UNAUTHENTICATED, PERMISSION_DENIED)."""
        if not self.required:
            return OPEN
        token = _bearer(context)
        if token is None:
            raise errors.Unauthenticated(
                "this call needs a token: send metadata 'authorization: Bearer <token>' "
                "(the SDK's Client(token=...), the CLI's --token, or FITSERVE_TOKEN)"
            )
        assert self.table is not None
        caller = self.table.lookup(token)
        if caller is None:
            raise errors.Unauthenticated("the token is not valid (unknown, or revoked)")
        if caller.role is not Role.ADMIN and method not in ALLOWED[caller.role]:
            name = method.rsplit("/", 1)[-1]
            entered = caller_var.set(caller)
            audit("denied", outcome="denied", method=name)
            caller_var.reset(entered)
            raise errors.PermissionDenied(
                f"token {caller.name!r} has role {caller.role.value}, which may not call "
                f"{name}; ask an admin for a token with a role that may"
            )
        return caller

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        method: str = handler_call_details.method
        if (wrapped := self._wrapped.get(method)) is not None:
            return wrapped
        handler = await continuation(handler_call_details)
        if handler is None or method.startswith(OPEN_PREFIXES) or self.table is None:
            return handler  # open methods, and every method with FITSERVE_AUTH=none
        wrapped = self._wrapped[method] = self._wrap(handler, method)
        return wrapped

    def _wrap(self, handler: Handler, method: str) -> Handler:
        name = method.rsplit("/", 1)[-1]
        kwargs = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(handler.unary_unary, method, name), **kwargs
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._unary(handler.stream_unary, method, name), **kwargs
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(handler.unary_stream, method, name), **kwargs
            )
        return grpc.stream_stream_rpc_method_handler(
            self._stream(handler.stream_stream, method, name), **kwargs
        )

    def _unary(self, inner: Any, method: str, name: str) -> Callable[..., Awaitable[Any]]:
        async def call(request: Any, context: Context) -> Any:
            try:
                caller = self.authenticate(context, method)
            except errors.FitserveError as exc:
                await self._outcomes.fail(context, name, exc)
            token = caller_var.set(caller)
            try:
                return await inner(request, context)
            finally:
                caller_var.reset(token)

        return call

    def _stream(self, inner: Any, method: str, name: str) -> Any:
        if not inspect.isasyncgenfunction(inner):
            return self._unary(inner, method, name)

        async def stream(request: Any, context: Context) -> AsyncIterator[Any]:
            try:
                caller = self.authenticate(context, method)
            except errors.FitserveError as exc:
                await self._outcomes.fail(context, name, exc)
            caller_var.set(caller)  # no reset: see service.api.status.stream_out
            async for item in inner(request, context):
                yield item

        return stream


def _bearer(context: Context) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            text = value.decode() if isinstance(value, bytes) else value
            scheme, _, token = text.partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None
