"""``python -m bench.soak`` (``make soak``): a bounded soak of a real stack under random faults.

A redis-server (with its AOF), one api+inference server on a fixed port and one Celery
worker, each a ``service.launch.Stack`` part of its own so each can be killed and started
again. For ``SOAK_SECONDS`` (default 180) it

- trains: small jobs (a model of their own each, a few epochs), two outstanding at a time;
- watches every job with the SDK's ``Job.events()`` (which resumes across outages);
- predicts on a model published before the faults start, in a loop;
- injects a fault every 8-20 s, chosen at random: SIGKILL of the worker's Celery main
  process (a new worker is started 2 s later), SIGTERM of the worker (a new one once it
  exits), Redis stopped for 2-5 s and started again on its port from its AOF, the server
  SIGTERMed and started again on its port. No fault corrupts data.

Then, with faults stopped, it waits for every job to finish and checks:

- every submitted job is terminal (SUCCEEDED, FAILED or CANCELLED) and still has a record;
  FAILED only with WORKER_LOST (out of attempts after SIGKILLs), counted apart;
- each SUCCEEDED job published exactly one version (version 1 of its own model, the only
  one on disk); any other job published none;
- each watcher saw exactly the job's final event stream: the same event ids, in order, no
  gap and no duplicate;
- Predict failed only with UNAVAILABLE (or RESOURCE_EXHAUSTED: shed by a server warming
  up after its restart), and only during a fault (from its start until ``RECOVERY``
  seconds after the part was back); the SDK is used without retries (one attempt), so
  every refusal counts;
- memory stayed flat: the peak RSS of every server process (and every worker, its Celery
  main process plus pool children) stays within ``RSS_BOUND`` x the first process's RSS
  once warmed up (its first sample after the first job finished).

The report goes to ``bench/results/soak.json`` and ``bench/results/soak.md`` (``--out``),
and the exit status is 1 when a check failed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil

import fitserve
from bench import procs
from fitserve.v1 import training_pb2
from service.domain.job_store import RESENT_MESSAGE
from service.launch.redis_server import RedisServer, start_redis
from service.launch.stack import ServerPart, Stack, WorkerPart
from service.launch.supervision import terminate

DEFAULT_SECONDS = 180.0
RECOVERY = 20.0  # s after a part is back during which Predict may still be UNAVAILABLE
RSS_BOUND = 1.3  # peak RSS of any process / the first process's warmed-up RSS
LEASE, REAPER, STOP_GRACE = 5.0, 1.0, 10.0
LAYERS = [
    {"type": "Dense", "units": 16, "activation": "relu", "input_shape": [4]},
    {"type": "Dense", "units": 3, "activation": "softmax"},
]
FAULTS = ("sigkill_worker", "sigterm_worker", "restart_redis", "restart_server")
TERMINAL = (
    training_pb2.JOB_STATE_SUCCEEDED,
    training_pb2.JOB_STATE_FAILED,
    training_pb2.JOB_STATE_CANCELLED,
)


@dataclass
class Fault:
    kind: str
    start: float  # monotonic, seconds since the soak began
    end: float = 0.0  # when the part was back (its replacement started)


@dataclass
class Watched:
    """What one job's watcher saw."""

    job_id: str
    model: str
    event_ids: list[str] = field(default_factory=list)
    error: str = ""


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


# -- the checks (pure: unit-tested in tests/unit/bench/test_soak.py) -----------------------


def stream_check(seen: list[str], final: list[str]) -> str:
    """ "" when a watcher saw exactly the final stream; else what differs."""
    if len(set(seen)) != len(seen):
        dupes = sorted({i for i in seen if seen.count(i) > 1})
        return f"duplicate events {dupes[:3]}"
    if seen != final:
        missing = [i for i in final if i not in set(seen)]
        extra = [i for i in seen if i not in set(final)]
        return f"{len(missing)} events missed {missing[:3]}, {len(extra)} not in the stream"
    return ""


RESENT = RESENT_MESSAGE.split("{worker}")[0]  # a job sent again by the reaper's log event
ALLOWED_DURING_FAULTS = ("UNAVAILABLE", "RESOURCE_EXHAUSTED")
"""UNAVAILABLE: the server is down or cannot reach Redis. RESOURCE_EXHAUSTED: Predict shed
(with a retry hint) by a server still warming up after its restart: its load shedding, as
documented in service/api/gate.py. Nothing else is acceptable, and neither outside a fault."""


def fault_of(when: float, faults: list[Fault], slack: float) -> Fault | None:
    """The fault whose window (its start until ``slack`` after it ended) holds ``when``."""
    return next((f for f in faults if f.start <= when <= (f.end or f.start) + slack), None)


def outside_faults(
    errors: list[tuple[float, str]], faults: list[Fault], slack: float
) -> list[tuple[float, str]]:
    """The Predict errors with another code than ``ALLOWED_DURING_FAULTS``, or that came
    outside every fault's window."""
    return [
        (round(when, 1), code)
        for when, code in errors
        if code not in ALLOWED_DURING_FAULTS or fault_of(when, faults, slack) is None
    ]


def rss_check(samples: dict[int, list[int]], bound: float) -> tuple[bool, int, int]:
    """(within the bound, baseline, peak): the baseline is the first process's first
    sample (samples: pid -> RSS bytes, in start order), the peak that of every process."""
    series = [s for s in samples.values() if s]
    if not series:
        return False, 0, 0
    baseline = series[0][0]
    peak = max(max(s) for s in series)
    return peak <= bound * baseline, baseline, peak


# -- the stack -----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Parts:
    """The soak's Redis, server and worker, each replaceable."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.data_dir = work / "data"
        self.port = _free_port()
        self.env = procs.env(
            FITSERVE_LOG_LEVEL="INFO",
            FITSERVE_JOB_LEASE_SECONDS=str(LEASE),
            FITSERVE_JOB_REAPER_PERIOD_SECONDS=str(REAPER),
            FITSERVE_WORKER_STOP_GRACE_SECONDS=str(STOP_GRACE),
        )
        self._redis_stack = Stack(work / "redis-part", server=None, worker=None).start()
        assert self._redis_stack.redis is not None
        self.redis: RedisServer = self._redis_stack.redis
        self.url = self._redis_stack.redis_url
        self.count = {"server": 0, "worker": 0}
        self.server = self._start("server")
        self.worker = self._start("worker")

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _start(self, role: str) -> Stack:
        self.count[role] += 1
        stack = Stack(
            self.work / f"{role}-{self.count[role]}",
            data_dir=self.data_dir,
            redis_url=self.url,
            server=ServerPart(port=self.port) if role == "server" else None,
            worker=WorkerPart(queues="train,cpu") if role == "worker" else None,
            env=self.env,
            cwd=procs.ROOT,
        )
        return stack.start()

    def server_proc(self) -> subprocess.Popen[bytes]:
        assert self.server.server is not None
        return self.server.server

    def worker_proc(self) -> subprocess.Popen[bytes]:
        assert self.worker.worker is not None
        return self.worker.worker

    def sigkill_worker(self) -> None:
        self.worker_proc().send_signal(signal.SIGKILL)
        self.worker_proc().wait()
        time.sleep(2)
        self.worker = self._start("worker")

    def sigterm_worker(self) -> None:
        self.worker_proc().send_signal(signal.SIGTERM)
        try:
            self.worker_proc().wait(timeout=STOP_GRACE + 20)
        except subprocess.TimeoutExpired:
            self.worker_proc().kill()
            self.worker_proc().wait()
        self.worker = self._start("worker")

    def restart_redis(self, down: float) -> None:
        terminate([self.redis.proc])
        time.sleep(down)
        folder = self.work / "redis-part" / "redis"
        self.redis = start_redis(folder, ports=[self.redis.port], attempts=0)

    def restart_server(self) -> None:
        self.server.stop()
        self.server = self._start("server")

    def rss(self) -> dict[str, tuple[int, int]]:
        """role -> (pid, RSS bytes of the process and its children)."""
        out = {}
        for role, proc in (("server", self.server.server), ("worker", self.worker.worker)):
            if proc is None or proc.poll() is not None:
                continue
            try:
                p = psutil.Process(proc.pid)
                total = p.memory_info().rss + sum(
                    c.memory_info().rss for c in p.children(recursive=True)
                )
            except psutil.Error:
                continue
            out[role] = (proc.pid, total)
        return out

    def stop(self) -> None:
        for stack in (self.server, self.worker):
            stack.stop()
        terminate([self.redis.proc])


# -- the load ------------------------------------------------------------------------------


class Soak:
    def __init__(self, parts: Parts, seconds: float, seed: int) -> None:
        self.parts, self.seconds = parts, seconds
        self.rng = random.Random(seed)
        self.t0 = time.monotonic()
        self.stop_load = threading.Event()
        self.jobs: dict[str, Watched] = {}
        self.faults: list[Fault] = []
        self.predicts = 0
        self.predict_errors: list[tuple[float, str]] = []
        self.predict_messages: dict[str, str] = {}  # code -> its first message
        self.rss: dict[str, dict[int, list[int]]] = {"server": {}, "worker": {}}
        self.warm = threading.Event()
        self.threads: list[threading.Thread] = []
        self.submit_errors: list[tuple[float, str]] = []
        self.jobs_client = self.client()

    def now(self) -> float:
        return time.monotonic() - self.t0

    def client(self) -> fitserve.Client:
        return fitserve.Client(self.parts.target, timeout=30, watch_retry_seconds=None)

    def run(self) -> None:
        with self.client() as client:
            x = np.random.default_rng(0).random((512, 4), dtype=np.float32)
            y = x[:, :3].argmax(axis=1)
            self.dataset = client.upload_dataset("soak-data", x=x, y=y).name
            first = self._train(client, "soak-served")
            assert first.wait(timeout=600).state == training_pb2.JOB_STATE_SUCCEEDED
        self.warm.set()
        self.t0 = time.monotonic()
        for target in (self._trainer, self._predictor, self._sampler):
            thread = threading.Thread(target=target, daemon=True, name=target.__name__)
            thread.start()
            self.threads.append(thread)
        self._faulter()
        self.stop_load.set()

    def _train(self, client: fitserve.Client, name: str) -> fitserve.Job:
        return client.train(
            name,
            layers=LAYERS,
            loss="sparse_categorical_crossentropy",
            dataset=self.dataset,
            epochs=8,
            batch_size=16,
            seed=0,
        )

    def _trainer(self) -> None:
        n = 0
        client = self.jobs_client  # open until the checks are done: the watchers use it
        while not self.stop_load.is_set():
            active = [t for t in self.threads if t.name.startswith("watch-") and t.is_alive()]
            if len(active) >= 2:
                time.sleep(0.5)
                continue
            n += 1
            name = f"soak-{n}"
            try:
                job = self._train(client, name)
            except fitserve.FitserveError as exc:
                self.submit_errors.append((self.now(), exc.code.name))
                time.sleep(1)
                continue
            watched = self.jobs[job.id] = Watched(job.id, name)
            thread = threading.Thread(
                target=self._watch, args=(job, watched), daemon=True, name=f"watch-{n}"
            )
            thread.start()
            self.threads.append(thread)

    def _watch(self, job: fitserve.Job, watched: Watched) -> None:
        try:
            for event in job.events():
                watched.event_ids.append(event.event_id)
        except fitserve.FitserveError as exc:
            watched.error = f"{exc.code.name}: {exc.details[:200]}"
        except Exception as exc:  # a bug of the soak's own is a failed check too
            watched.error = f"{type(exc).__name__}: {exc}"

    def _predictor(self) -> None:
        x = np.random.default_rng(1).random((4, 4), dtype=np.float32)
        with fitserve.Client(self.parts.target, timeout=5, predict_attempts=1) as client:
            while not self.stop_load.is_set():
                try:
                    client.predict("soak-served", x)
                except fitserve.FitserveError as exc:
                    self.predict_errors.append((self.now(), exc.code.name))
                    self.predict_messages.setdefault(exc.code.name, exc.details[:300])
                    time.sleep(0.2)
                self.predicts += 1
                time.sleep(0.05)

    def _sampler(self) -> None:
        while not self.stop_load.is_set():
            for role, (pid, rss) in self.parts.rss().items():
                self.rss[role].setdefault(pid, []).append(rss)
            time.sleep(2.0)

    def _faulter(self) -> None:
        while self.now() < self.seconds:
            time.sleep(self.rng.uniform(8, 20))
            if self.now() >= self.seconds:
                break
            kind = self.rng.choice(FAULTS)
            fault = Fault(kind, self.now())
            self.faults.append(fault)
            print(f"[{fault.start:6.1f} s] fault: {kind}", flush=True)
            if kind == "restart_redis":
                self.parts.restart_redis(self.rng.uniform(2, 5))
            else:
                getattr(self.parts, kind)()
            fault.end = self.now()

    def drain(self, timeout: float = 300) -> None:
        """Wait for every watcher to see its job end."""
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            if thread.name.startswith("watch-"):
                thread.join(max(0.0, deadline - time.monotonic()))

    def checks(self) -> tuple[list[Check], dict[str, Any]]:
        checks: list[Check] = []
        states: dict[str, int] = {}
        reasons: dict[str, int] = {}
        not_terminal, versions_bad, streams_bad = [], [], []
        resent = 0
        with self.client() as client:
            for job_id, watched in self.jobs.items():
                try:
                    record = client.job_record(job_id)
                except fitserve.FitserveError as exc:
                    not_terminal.append(f"{job_id}: {exc.code.name}")
                    continue
                state = training_pb2.JobState.Name(record.state).removeprefix("JOB_STATE_")
                states[state] = states.get(state, 0) + 1
                if record.error.reason:
                    reasons[record.error.reason] = reasons.get(record.error.reason, 0) + 1
                if record.state not in TERMINAL:
                    not_terminal.append(f"{job_id}: {state} attempt {record.attempt}")
                on_disk = _versions(self.parts.data_dir / "models" / watched.model)
                want = ["1"] if record.state == training_pb2.JOB_STATE_SUCCEEDED else []
                if on_disk != want or (want and record.model_version != 1):
                    versions_bad.append(f"{watched.model}: {on_disk} ({state})")
                try:
                    events = list(client.watch_job(job_id, timeout=30))
                    final = [e.event_id for e in events]
                except grpc.RpcError as exc:  # a job that never ended: its stream neither
                    events, final = [], [f"(stream did not end: {exc.code().name})"]
                if any(e.log.message.startswith(RESENT) for e in events if e.HasField("log")):
                    resent += 1  # its worker died between receiving and starting it
                problem = watched.error or stream_check(watched.event_ids, final)
                if problem:
                    streams_bad.append(f"{job_id}: {problem}")
        other_failures = {r: n for r, n in reasons.items() if r != "WORKER_LOST"}
        checks.append(
            Check(
                "every job terminal",
                not not_terminal and bool(self.jobs),
                f"{len(self.jobs)} jobs: {states}; not terminal: {not_terminal[:5]}; sent "
                f"again after their worker died before starting them: {resent}",
            )
        )
        checks.append(
            Check(
                "failures only WORKER_LOST",
                not other_failures,
                f"failure reasons: {reasons}",
            )
        )
        checks.append(
            Check(
                "one version per SUCCEEDED job, none otherwise",
                not versions_bad,
                f"wrong: {versions_bad[:5]}",
            )
        )
        checks.append(
            Check(
                "watch streams complete, no duplicates",
                not streams_bad,
                f"{len(self.jobs) - len(streams_bad)}/{len(self.jobs)} streams exact; "
                f"{streams_bad[:5]}",
            )
        )
        bad = outside_faults(self.predict_errors, self.faults, RECOVERY)
        codes: dict[str, int] = {}
        for _, code in self.predict_errors:
            codes[code] = codes.get(code, 0) + 1
        shed: dict[str, int] = {}  # RESOURCE_EXHAUSTED by the fault whose window held it
        for when, code in self.predict_errors:
            fault = fault_of(when, self.faults, RECOVERY)
            if code == "RESOURCE_EXHAUSTED" and fault is not None:
                shed[fault.kind] = shed.get(fault.kind, 0) + 1
        checks.append(
            Check(
                "Predict errors only UNAVAILABLE (or shed) during faults",
                not bad and self.predicts > 0,
                f"{self.predicts} calls, {len(self.predict_errors)} failed {codes}; "
                f"RESOURCE_EXHAUSTED within the window of {shed}; "
                f"outside a fault or another code: {bad[:5]}",
            )
        )
        memory = {}
        for role, samples in self.rss.items():
            ok, baseline, peak = rss_check(samples, RSS_BOUND)
            memory[role] = {"baseline_mb": baseline / 2**20, "peak_mb": peak / 2**20}
            checks.append(
                Check(
                    f"{role} RSS flat (peak <= {RSS_BOUND:g} x first)",
                    ok,
                    f"{len(samples)} processes, first {baseline / 2**20:.0f} MB, "
                    f"peak {peak / 2**20:.0f} MB",
                )
            )
        facts = {
            "states": states,
            "failure_reasons": reasons,
            "faults": [asdict(f) for f in self.faults],
            "predicts": self.predicts,
            "predict_errors": codes,
            "predict_shed_by_fault": shed,
            "predict_first_messages": self.predict_messages,
            "submit_errors": len(self.submit_errors),
            "resent_after_receive": resent,
            "memory": memory,
        }
        return checks, facts


def _versions(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


def markdown(checks: list[Check], facts: dict[str, Any], seconds: float, took: float) -> str:
    faults: dict[str, int] = {}
    for f in facts["faults"]:
        faults[f["kind"]] = faults.get(f["kind"], 0) + 1
    lines = [
        f"Soak of {seconds:g} s (took {took:.0f} s in all); faults injected: {faults}",
        "",
        "| check | result | detail |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {c.name} | {'PASS' if c.ok else 'FAIL'} | {c.detail} |" for c in checks]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    p.add_argument(
        "--seconds", type=float, default=float(os.environ.get("SOAK_SECONDS", DEFAULT_SECONDS))
    )
    p.add_argument("--seed", type=int, default=int(os.environ.get("SOAK_SEED", "0")))
    p.add_argument("--out", type=Path, default=procs.ROOT / "bench" / "results")
    a = p.parse_args(argv)
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="fitserve-soak-"))
    parts = Parts(work)
    try:
        soak = Soak(parts, a.seconds, a.seed)
        soak.run()
        print(f"[{soak.now():6.1f} s] faults stopped; waiting for the jobs", flush=True)
        soak.drain()
        checks, facts = soak.checks()
        soak.jobs_client.close()
    finally:
        parts.stop()
    took = time.monotonic() - started
    text = markdown(checks, facts, a.seconds, took)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "soak.md").write_text(text)
    result = {"seconds": a.seconds, "seed": a.seed, "took": took}
    result |= {"checks": [asdict(c) for c in checks], **facts}
    (a.out / "soak.json").write_text(json.dumps(result, indent=1) + "\n")
    print(text)
    passed = all(c.ok for c in checks)
    if passed:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"the stack's logs and data are kept in {work}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
