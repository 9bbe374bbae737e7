"""What the token check itself costs one call, in-process, without RPC.

``Authenticator.authenticate`` (service.api.auth) with a predictor token sent as metadata,
against the same with FITSERVE_AUTH=none (the interceptor runs in every mode, so this is what
turning auth on adds in Python). Both read the tokens from a real Redis the way a server
does. Each is the fastest of several timed loops, the one least disturbed by other processes,
so this number holds on a shared machine where the end-to-end pair of bench.serving moves
with the load; it leaves out gRPC's own handling of the extra header.
"""

from __future__ import annotations

import asyncio
import logging
import timeit
from collections.abc import Sequence
from typing import Any

from prometheus_client import CollectorRegistry

from bench.loadgen import METHOD, auth_metadata
from service.api.auth import Authenticator
from service.api.status import RpcOutcomes
from service.config import Settings
from service.metrics import Metrics

# What a grpc.aio server hands the handler besides the token.
BASE_METADATA = (("user-agent", "grpc-python-asyncio/1.0 grpc-c/1.0 (linux; chttp2)"),)


class _Context:
    """The one part of a grpc.aio servicer context that authenticate reads."""

    def __init__(self, metadata: Sequence[tuple[str, str]]) -> None:
        self._metadata = tuple(metadata)

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata


def per_call_us(seconds: Sequence[float], number: int) -> float:
    """Microseconds per call of the fastest of several timed loops of ``number`` calls."""
    return min(seconds) / number * 1e6


def _time(auth: Authenticator, context: Any, number: int, repeat: int) -> float:
    times = timeit.repeat(lambda: auth.authenticate(context, METHOD), number=number, repeat=repeat)
    return per_call_us(times, number)


def measure(redis_url: str, token: str, number: int = 20_000, repeat: int = 7) -> dict[str, Any]:
    """authenticate's µs per call with auth on (``token``, which must be in that Redis) and
    off; raises if the token is not accepted, or auth is not on."""
    return asyncio.run(_measure(redis_url, token, number, repeat))


async def _measure(redis_url: str, token: str, number: int, repeat: int) -> dict[str, Any]:
    sides = {
        "on": (Settings(host="127.0.0.1", redis_url=redis_url), auth_metadata(token) or ()),
        "off": (Settings(host="127.0.0.1", redis_url=redis_url, auth="none"), ()),
    }
    result: dict[str, Any] = {"number": number, "repeat": repeat}
    auth_log = logging.getLogger("service.api.auth")
    level = auth_log.level
    auth_log.setLevel(logging.ERROR)  # the "authentication is OFF" warning is meant for servers
    try:
        for side, (settings, metadata) in sides.items():
            auth = Authenticator(settings, RpcOutcomes(Metrics(CollectorRegistry())))
            await auth.start()
            try:
                context: Any = _Context((*BASE_METADATA, *metadata))
                caller = auth.authenticate(context, METHOD)
                if side == "on" and (not auth.required or not caller.name):
                    raise RuntimeError("auth is not on, or the token was not accepted")
                result[f"{side}_us"] = _time(auth, context, number, repeat)
            finally:
                await auth.close()
    finally:
        auth_log.setLevel(level)
    return result
