"""Serving benchmarks: fitserve Predict against the echo and naive references."""

from __future__ import annotations

import json
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil
import redis

from bench import authcost, procs
from bench.loadgen import METHOD
from bench.models import MODEL, publish_reference
from service.domain.tokens import Role, TokenStore
from service.launch.serving import start_server
from service.launch.stack import ServerPart, Stack
from service.launch.supervision import terminate

LATENCY_TARGET_MS = 20.0


@dataclass(frozen=True)
class Plan:
    """Durations and concurrency levels of one run; ``auth_rounds``: how many times the auth
    on/off pair is measured (alternating which goes first)."""

    warmup: float
    duration: float
    sweep: tuple[int, ...]
    auth_rounds: int = 1

    @classmethod
    def of(cls, quick: bool) -> Plan:
        return cls(1.0, 2.0, (1, 64), 3) if quick else cls(2.0, 5.0, (1, 8, 64), 3)


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


def load(
    target: str,
    request: Path,
    rows: int,
    callers: int,
    plan: Plan,
    token: str | None = None,
    server_pid: int | None = None,
) -> dict[str, Any]:
    """Run the load generator in its own (pinned) process; with ``token``, every call
    carries it as bearer metadata (FITSERVE_TOKEN in the load generator's environment);
    with ``server_pid``, the result has that process's CPU seconds in the window."""
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
        *(["--server-pid", str(server_pid)] if server_pid is not None else []),
    )
    out = subprocess.run(
        procs.pinned(argv, procs.LOADGEN_CORE),
        cwd=procs.ROOT,
        env=procs.env(**({"FITSERVE_TOKEN": token} if token else {})),
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def start_reference(
    kind: str, model_dir: Path, log: Path, prefix: Sequence[str] = ()
) -> tuple[str, subprocess.Popen[bytes]]:
    """A reference server (``echo`` or ``naive``, bench.servers) on a port it picks itself;
    returns its address and process once it listens."""
    argv = procs.python("bench.servers", kind, "--port", "0", "--model-dir", str(model_dir))
    proc, ready = start_server(argv, procs.env(), log, procs.ROOT, prefix=prefix)
    return f"127.0.0.1:{ready.port}", proc


class Servers:
    """The three servers under test, each pinned to the server core. They read the model
    store in ``work/data``; their logs go to ``logs`` (default: ``work``)."""

    def __init__(self, work: Path, redis_url: str, logs: Path | None = None) -> None:
        self.work, self.redis_url, self.logs = work, redis_url, logs or work
        self.running: dict[int, Callable[[], None]] = {}  # pid -> how to stop it
        self.started = 0

    def start(self, kind: str, **settings: str) -> tuple[str, subprocess.Popen[bytes]]:
        self.started += 1
        pin = procs.pin(procs.SERVER_CORE)
        if kind != "fitserve":
            model_dir = self.work / "data" / "models" / MODEL / "1"
            log = self.logs / f"{kind}-{self.started}.log"
            target, proc = start_reference(kind, model_dir, log, pin)
            self.running[proc.pid] = lambda: terminate([proc])
            return target, proc
        stack = self._fitserve(pin, settings)
        assert stack.server is not None
        self.running[stack.server.pid] = stack.stop
        return stack.target, stack.server

    def _fitserve(self, pin: list[str], settings: dict[str, str]) -> Stack:
        """A server on the shared Redis; its log in ``fitserve-<n>/server.log``."""
        return Stack(
            self.logs / f"fitserve-{self.started}",
            data_dir=self.work / "data",
            redis_url=self.redis_url,
            server=ServerPart(env=settings, prefix=pin),
            worker=None,
            env=procs.env(FITSERVE_LOG_LEVEL="WARNING"),
            cwd=procs.ROOT,
        ).start()

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        self.running.pop(proc.pid)()

    def stop_all(self) -> None:
        for pid in list(self.running):
            self.running.pop(pid)()


def run(quick: bool) -> dict[str, Any]:
    """Every serving case of bench/README.md; returns the raw results."""
    plan = Plan.of(quick)
    with tempfile.TemporaryDirectory(prefix="fitserve-bench-") as tmp:
        work = Path(tmp)
        model_dir = publish_reference(work / "data" / "models")
        with Stack(work, server=None, worker=None) as redis:
            servers = Servers(work, redis.redis_url)
            try:
                return _cases(servers, work, model_dir, plan)
            finally:
                servers.stop_all()


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
    results["auth"] = _auth(work, one, plan)
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


def _auth(work: Path, request: Path, plan: Plan) -> dict[str, Any]:
    """fitserve with auth off (FITSERVE_AUTH=none) and on (the default mode once a token
    exists; the load generator sends a predictor token), 1 row at 64 callers and 1 caller.

    Both servers run at once, on their own Redis (a token in the shared one would turn auth
    on for every later server of this run), with the same settings otherwise. Each round
    measures both, alternating which goes first, so a drift in the machine's load falls on
    both sides; report.auth_checks takes the median of the paired rounds. While one side is
    measured the other is suspended (SIGSTOP): an idle fitserve takes ~5 % of a core, and it
    would take it from the server core of the one measured. The measured server's CPU in
    each window is recorded too (meant to move less than rps when other processes take turns
    on the core; under heavy load it moves too, bench/README.md), and the token check alone,
    in-process (bench.authcost), which such load moves least of all.
    """
    with Stack(work / "auth", server=None, worker=None) as stack:
        with redis.Redis.from_url(stack.redis_url, decode_responses=True) as client:
            token, _ = TokenStore(client).create("bench-predictor", Role.PREDICTOR)
        servers = Servers(work, stack.redis_url, logs=work / "auth")
        try:
            started = {
                "off": servers.start("fitserve", FITSERVE_AUTH="none"),
                "on": servers.start("fitserve"),
            }
            tokens = {"off": None, "on": token}
            refused = _without_token(started["on"][0], request)
            inprocess = authcost.measure(stack.redis_url, token)
            rounds = []
            for i in range(plan.auth_rounds):
                order = ("off", "on") if i % 2 == 0 else ("on", "off")
                measured: dict[str, list[dict[str, Any]]] = {}
                for side, other in (order, order[::-1]):
                    with _suspended(started[other][1].pid):
                        target = started[side][0]
                        pid = started[side][1].pid
                        measured[side] = [
                            load(target, request, 1, callers, plan, tokens[side], pid)
                            for callers in (64, 1)
                        ]
                rounds.append({"first": order[0], **measured})
        finally:
            servers.stop_all()
    return {"rounds": rounds, "without_token": refused, "inprocess": inprocess}


@contextmanager
def _suspended(pid: int) -> Iterator[None]:
    """The process stopped (SIGSTOP) for the block, continued after it whatever happens."""
    proc = psutil.Process(pid)
    proc.suspend()
    try:
        yield
    finally:
        proc.resume()


def _without_token(target: str, request: Path) -> str:
    """The status of a Predict sent with no token: UNAUTHENTICATED when auth is on."""
    with grpc.insecure_channel(target) as channel:
        predict: Any = channel.unary_unary(METHOD)  # raw bytes in and out
        try:
            predict(request.read_bytes(), timeout=30)
        except grpc.RpcError as exc:
            return str(exc.code().name)
    return "OK"


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
