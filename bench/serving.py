"""Serving benchmarks: fitserve Predict against the echo and naive references."""

from __future__ import annotations

import json
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from bench import procs
from bench.models import MODEL, publish_reference

LATENCY_TARGET_MS = 20.0


@dataclass(frozen=True)
class Plan:
    """Durations and concurrency levels of one run."""

    warmup: float
    duration: float
    sweep: tuple[int, ...]

    @classmethod
    def of(cls, quick: bool) -> Plan:
        return cls(1.0, 2.0, (1, 64)) if quick else cls(2.0, 5.0, (1, 8, 64))


def request_file(work: Path, rows: int) -> Path:
    """A serialized PredictRequest with ``rows`` random 28x28 images."""
    from fitserve import to_tensor
    from fitserve.v1 import inference_pb2, tensor_pb2

    x = np.random.default_rng(rows).random((rows, 28, 28), dtype=np.float32)
    request = inference_pb2.PredictRequest(
        model=tensor_pb2.ModelRef(name=MODEL), inputs={"": to_tensor(x)}
    )
    path = work / f"request-{rows}.bin"
    path.write_bytes(request.SerializeToString())
    return path


def load(target: str, request: Path, rows: int, callers: int, plan: Plan) -> dict[str, Any]:
    """Run the load generator in its own (pinned) process."""
    argv = procs.python(
        "bench.loadgen",
        "--target",
        target,
        "--request",
        str(request),
        "--rows",
        str(rows),
        "--callers",
        str(callers),
        "--warmup",
        str(plan.warmup),
        "--duration",
        str(plan.duration),
    )
    out = subprocess.run(
        procs.pinned(argv, procs.LOADGEN_CORE),
        cwd=procs.ROOT,
        env=procs.env(),
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


class Servers:
    """The three servers under test, each pinned to the server core."""

    def __init__(self, work: Path, redis_url: str) -> None:
        self.work, self.redis_url = work, redis_url
        self.running: list[subprocess.Popen[bytes]] = []

    def start(self, kind: str, **settings: str) -> tuple[str, subprocess.Popen[bytes]]:
        port = _free_port()
        target = f"127.0.0.1:{port}"
        log = self.work / f"{kind}-{port}.log"
        if kind == "fitserve":
            argv = procs.python("service.main", "serve", "--port", str(port), "--metrics-port", "0")
            extra = {
                "FITSERVE_DATA_DIR": str(self.work / "data"),
                "FITSERVE_REDIS_URL": self.redis_url,
                "FITSERVE_LOG_LEVEL": "WARNING",
                **settings,
            }
        else:
            model_dir = str(self.work / "data" / "models" / MODEL / "1")
            argv = procs.python(
                "bench.servers", kind, "--port", str(port), "--model-dir", model_dir
            )
            extra = {}
        proc = procs.start(procs.pinned(argv, procs.SERVER_CORE), log, **extra)
        self.running.append(proc)
        procs.grpc_ready(target, proc, log)
        return target, proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        procs.stop(proc)
        self.running.remove(proc)

    def stop_all(self) -> None:
        for proc in list(self.running):
            self.stop(proc)


def _free_port() -> int:
    from service.stack import free_port

    return free_port()


def run(quick: bool) -> dict[str, Any]:
    """Every serving case of BENCHMARKS.md; returns the raw results."""
    from service.stack import start_redis

    plan = Plan.of(quick)
    with tempfile.TemporaryDirectory(prefix="fitserve-bench-") as tmp:
        work = Path(tmp)
        model_dir = publish_reference(work / "data" / "models")
        redis_port = _free_port()
        redis = start_redis(work / "redis", redis_port)
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
        servers = Servers(work, redis_url)
        try:
            return _cases(servers, work, model_dir, plan)
        finally:
            servers.stop_all()
            procs.stop(redis)


def _cases(servers: Servers, work: Path, model_dir: Path, plan: Plan) -> dict[str, Any]:
    one, big = request_file(work, 1), request_file(work, 512)
    results: dict[str, Any] = {"plan": plan.__dict__, "sweep": {}, "rows512": {}}
    for kind in ("echo", "naive", "fitserve"):
        target, proc = servers.start(kind)
        results["sweep"][kind] = [load(target, one, 1, c, plan) for c in plan.sweep]
        results["rows512"][kind] = load(target, big, 512, 16, plan)
        if kind == "fitserve":
            results["alias_switch"] = _alias_switch(target, one, plan)
        servers.stop(proc)
    results["overload"] = _overload(servers, one, plan)
    results["latency_target"] = _latency_target(servers, one, plan)
    results["inprocess"] = _inprocess(model_dir, plan)
    return results


def _alias_switch(target: str, request: Path, plan: Plan) -> dict[str, Any]:
    """64 callers on the default version while `stable` flips between 1 and 2 every 2 s."""
    import fitserve

    stop = threading.Event()
    switches = 0

    def flip() -> None:
        nonlocal switches
        with fitserve.Client(target) as client:
            while not stop.wait(2.0):
                client.set_alias(MODEL, "stable", 1 + switches % 2)
                switches += 1

    thread = threading.Thread(target=flip, daemon=True)
    thread.start()
    long_plan = Plan(plan.warmup, max(plan.duration, 6.0), plan.sweep)
    try:
        result = load(target, request, 1, 64, long_plan)
    finally:
        stop.set()
        thread.join()
    return result | {"switches": switches}


def _overload(servers: Servers, request: Path, plan: Plan) -> dict[str, Any]:
    """256 callers against a small queue bound: rejections, accepted p99, server memory."""
    target, proc = servers.start("fitserve", FITSERVE_BATCHING__MAX_QUEUE="16")
    rss = psutil.Process(proc.pid)
    load(target, request, 1, 256, Plan(0.5, 1.0, ()))  # reach steady state first
    before = rss.memory_info().rss
    result = load(target, request, 1, 256, plan)
    after = rss.memory_info().rss
    servers.stop(proc)
    return result | {"rss_before_mb": before / 2**20, "rss_after_mb": after / 2**20}


def _latency_target(servers: Servers, request: Path, plan: Plan) -> dict[str, Any]:
    """64 callers against a server holding its batcher p99 under LATENCY_TARGET_MS."""
    target, proc = servers.start(
        "fitserve", FITSERVE_BATCHING__LATENCY_TARGET_MS=str(LATENCY_TARGET_MS)
    )
    result = load(target, request, 1, 64, plan)
    servers.stop(proc)
    return result | {"target_ms": LATENCY_TARGET_MS}


def _inprocess(model_dir: Path, plan: Plan) -> list[dict[str, Any]]:
    argv = procs.python(
        "bench.inprocess", "--model-dir", str(model_dir), "--seconds", str(plan.duration)
    )
    out = subprocess.run(
        procs.pinned(argv, procs.SERVER_CORE),
        cwd=procs.ROOT,
        env=procs.env(),
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    result: list[dict[str, Any]] = json.loads(out.stdout.strip().splitlines()[-1])
    return result
