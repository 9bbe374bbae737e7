"""The environment, command lines and core pinning of the processes a benchmark measures.

Redis, servers and workers are started and stopped by service.launch (its Stack); this
module gives them the benchmark's environment and a core to run on.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
LOADGEN_CORE = "0"
SERVER_CORE = "1"


def pin(core: str) -> list[str]:
    """``taskset -c core`` when taskset exists and the machine has more than one core (an
    argv prefix; empty otherwise)."""
    if shutil.which("taskset") and (os.cpu_count() or 1) > 1:
        return ["taskset", "-c", core]
    return []


def pinned(argv: list[str], core: str) -> list[str]:
    """``argv`` run on ``core`` (see ``pin``)."""
    return [*pin(core), *argv]


def python(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("FITSERVE_")}
    return base | {"TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(ROOT)} | extra


def wait_until(check: Callable[[], bool], what: str, timeout: float = 120.0) -> None:
    """Poll ``check`` until it is true, or raise after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready after {timeout} s")
        time.sleep(0.1)


def grpc_ready(target: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Wait until a server on ``target`` answers the health check."""

    def serving() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text(errors='replace')[-2000:]}")
        try:
            with grpc.insecure_channel(target) as ch:
                reply = health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(), timeout=1
                )
                return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
        except grpc.RpcError:
            return False

    wait_until(serving, f"server at {target}")
