"""Worker processes: the Celery command line, starting one, and one per GPU (``--gpus``).

Each GPU worker sees only its GPU (CUDA_VISIBLE_DEVICES) and has its own Celery node name,
so the processes of one host never share a device or a name. They run supervised: when
one dies, the others are stopped and ``fitserve worker`` exits 1.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from service.config import Settings
from service.launch.supervision import spawn, stop_flag, supervise, terminate


def worker_argv(
    queues: str, concurrency: int, loglevel: str, node: str = "", *, quiet: bool = False
) -> list[str]:
    """The Celery command line of one fitserve worker process; ``node`` names it in
    Celery (default ``fitserve-<pid>``), which must differ between processes of a host;
    ``quiet``: without Celery's start banner."""
    return [
        sys.executable,
        "-m",
        "celery",
        *(["--quiet"] if quiet else []),
        "-A",
        "worker.app",
        "worker",
        "-Q",
        queues,
        "-c",
        str(concurrency),
        "--pool",
        "prefork",
        "-n",
        f"{node or f'fitserve-{os.getpid()}'}@%h",
        "--loglevel",
        loglevel,
        "--without-gossip",
        "--without-mingle",
    ]


def start_worker(
    env: Mapping[str, str],
    log: Path | int | None = None,
    cwd: Path | None = None,
    *,
    queues: str = "train,cpu",
    loglevel: str = "INFO",
    prefix: Sequence[str] = (),
    quiet: bool = False,
) -> subprocess.Popen[bytes]:
    """A worker process (prefork, one child) in its own session, whose process group
    holds its pool child too (a killpg of its pid reaches both)."""
    return spawn([*prefix, *worker_argv(queues, 1, loglevel, quiet=quiet)], env, log, cwd)


class GpuChoiceError(ValueError):
    """``--gpus`` names GPUs this machine does not have; the message says what to do."""


NO_GPUS = "no GPUs found; run without --gpus for a CPU worker"


def chosen_gpus(gpus: str, discovered: list[str]) -> list[str]:
    """The GPU ids ``--gpus`` selects: ``all``, a count ``N`` (the first N), or ids
    ``0,1`` (a single id with a trailing comma: ``3,``)."""
    if not discovered:
        raise GpuChoiceError(NO_GPUS)
    if gpus == "all":
        return list(discovered)
    if gpus.isdigit():
        return _first(int(gpus), discovered)
    ids = [part.strip() for part in gpus.split(",") if part.strip()]
    unknown = [i for i in ids if i not in discovered]
    if not ids or unknown:
        raise GpuChoiceError(
            f"--gpus {gpus}: no GPU {', '.join(unknown) or '(none given)'} here; "
            f"give all, a count, or ids among {', '.join(discovered)}"
        )
    return list(dict.fromkeys(ids))


def _first(count: int, discovered: list[str]) -> list[str]:
    if not 1 <= count <= len(discovered):
        raise GpuChoiceError(
            f"--gpus {count}: this machine has {len(discovered)} GPUs "
            f"({', '.join(discovered)}); give a count from 1 to {len(discovered)}"
        )
    return discovered[:count]


def plan_gpu_workers(
    gpus: str,
    discovered: list[str],
    queues: str,
    concurrency: int,
    loglevel: str,
    env: dict[str, str],
    supervisor_pid: int,
) -> list[tuple[dict[str, str], list[str]]]:
    """(environment, argv) of one worker process per chosen GPU, each seeing only its
    GPU (CUDA_VISIBLE_DEVICES) and with its own Celery node name."""
    return [
        (
            env | {"CUDA_VISIBLE_DEVICES": gpu},
            worker_argv(queues, concurrency, loglevel, f"fitserve-gpu{gpu}-{supervisor_pid}"),
        )
        for gpu in chosen_gpus(gpus, discovered)
    ]


def discover_gpus() -> list[str]:
    """GPU indexes ``nvidia-smi -L`` lists; none when it is missing or fails."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return re.findall(r"^GPU (\d+):", out, flags=re.MULTILINE)


def gpu_workers(gpus: str, queues: str, concurrency: int, settings: Settings) -> int:
    """Run one worker per GPU until SIGTERM/SIGINT (exit 0) or until one dies (exit 1)."""
    try:
        plan = plan_gpu_workers(
            gpus,
            discover_gpus(),
            queues,
            concurrency,
            settings.log_level,
            dict(os.environ),
            os.getpid(),
        )
    except GpuChoiceError as exc:
        print(f"fitserve worker: {exc}", file=sys.stderr, flush=True)
        return 2
    stopping = stop_flag()
    children = [
        (f"worker gpu {env['CUDA_VISIBLE_DEVICES']}", spawn(argv, env)) for env, argv in plan
    ]
    try:
        print(
            "fitserve worker: " + ", ".join(f"{name} pid {proc.pid}" for name, proc in children),
            flush=True,
        )
        return supervise(children, stopping, "fitserve worker", "every worker process")
    finally:
        terminate([proc for _, proc in children])
