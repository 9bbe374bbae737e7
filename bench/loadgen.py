"""Closed-loop gRPC load generator: N asyncio callers, a warm-up, then a fixed duration.

Runs in its own process (pinned to a core by the harness) and sends a pre-serialized
request as raw bytes, so the client does the same small work for every server it drives.
Prints one JSON object: rps, samples/s, latency percentiles and errors by status code. With
``--server-pid``, also ``server_cpu_s``: the CPU seconds (user + system) that process used
during the measured window.
With FITSERVE_TOKEN in its environment every call carries ``authorization: Bearer <token>``
metadata, per call as the SDK sends it (``fitserve.Client(token=...)``).

    python -m bench.loadgen --target 127.0.0.1:50051 --request req.bin --rows 1 \
        --callers 64 --warmup 2 --duration 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil

METHOD = "/fitserve.v1.InferenceService/Predict"
MAX_MESSAGE = 512 * 1024 * 1024


async def _caller(
    call: Any,
    request: bytes,
    window: tuple[float, float],
    stop_at: float,
    latencies: list[float],
    errors: Counter[str],
    metadata: tuple[tuple[str, str], ...] | None,
) -> None:
    start, end = window
    while True:
        t0 = time.perf_counter()
        if t0 >= stop_at:
            return
        code = "OK"
        try:
            await call(request, timeout=30, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
        t1 = time.perf_counter()
        if start <= t0 and t1 <= end:
            if code == "OK":
                latencies.append(t1 - t0)
            else:
                errors[code] += 1


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...] | None:
    """The metadata each call sends: the bearer token, or none without one."""
    return (("authorization", f"Bearer {token}"),) if token else None


def cpu_seconds(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


async def _cpu_at(when: float, proc: psutil.Process) -> float:
    await asyncio.sleep(max(0.0, when - time.perf_counter()))
    return cpu_seconds(proc)


async def run(
    target: str,
    request: bytes,
    rows: int,
    callers: int,
    warmup: float,
    duration: float,
    token: str | None = None,
    server_pid: int | None = None,
) -> dict[str, Any]:
    """Drive ``target`` (with ``token`` on every call, if given) and return the
    measurements of the measured window (with ``server_pid``: that process's CPU in it)."""
    metadata = auth_metadata(token)
    options = [
        ("grpc.max_send_message_length", MAX_MESSAGE),
        ("grpc.max_receive_message_length", MAX_MESSAGE),
    ]
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        call: Any = channel.unary_unary(METHOD)
        now = time.perf_counter()
        window = (now + warmup, now + warmup + duration)
        latencies: list[float] = []
        errors: Counter[str] = Counter()
        server = psutil.Process(server_pid) if server_pid is not None else None
        cpu = (
            [asyncio.create_task(_cpu_at(when, server)) for when in window]
            if server is not None
            else []
        )
        tasks = [
            _caller(call, request, window, window[1], latencies, errors, metadata)
            for _ in range(callers)
        ]
        await asyncio.gather(*tasks)
        cpu_s = [await task for task in cpu]
    result = summarize(latencies, errors, rows, duration, callers)
    if cpu_s:
        result["server_cpu_s"] = cpu_s[1] - cpu_s[0]
    return result


def summarize(
    latencies: list[float], errors: Counter[str], rows: int, duration: float, callers: int
) -> dict[str, Any]:
    """Throughput and latency percentiles (milliseconds) of one run."""
    ms = np.array(latencies) * 1000.0
    pct = {f"p{p}_ms": float(np.percentile(ms, p)) if len(ms) else None for p in (50, 90, 99)}
    return {
        "callers": callers,
        "rows": rows,
        "duration_s": duration,
        "ok": len(latencies),
        "errors": dict(errors),
        "rps": len(latencies) / duration,
        "samples_per_s": len(latencies) * rows / duration,
        **pct,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--target", required=True)
    p.add_argument("--request", type=Path, required=True, help="a serialized PredictRequest")
    p.add_argument("--rows", type=int, default=1)
    p.add_argument("--callers", type=int, default=1)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--server-pid", type=int, help="report this process's CPU in the window")
    a = p.parse_args()
    result = asyncio.run(
        run(
            a.target,
            a.request.read_bytes(),
            a.rows,
            a.callers,
            a.warmup,
            a.duration,
            os.environ.get("FITSERVE_TOKEN") or None,
            a.server_pid,
        )
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
