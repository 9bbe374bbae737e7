"""A few seconds of the benchmark harness: every reference server and fitserve answer the
load generator, and the results are well formed. Not a timing test: no speed is asserted."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from bench import procs, serving
from bench.models import publish_reference
from service.config import Settings
from service.launch.supervision import terminate
from tests.conftest import RunningServer

pytestmark = pytest.mark.integration
PLAN = serving.Plan(warmup=0.2, duration=0.5, sweep=(4,))
KEYS = {
    "callers",
    "rows",
    "duration_s",
    "ok",
    "errors",
    "rps",
    "samples_per_s",
    "p50_ms",
    "p90_ms",
    "p99_ms",
}


def _check(result: dict[str, object], rows: int) -> None:
    assert set(result) == KEYS
    assert result["errors"] == {}
    assert isinstance(result["ok"], int)
    assert result["ok"] > 0
    assert result["samples_per_s"] == pytest.approx(result["rps"] * rows)  # type: ignore[operator]
    assert 0 < result["p50_ms"] <= result["p90_ms"] <= result["p99_ms"]  # type: ignore[operator]


@pytest.mark.parametrize("kind", ["echo", "naive"])
def test_reference_servers_answer_the_load_generator(kind: str, tmp_path: Path) -> None:
    model_dir = publish_reference(tmp_path / "models", versions=1)
    target, proc = serving.start_reference(kind, model_dir, tmp_path / "server.log")
    try:
        procs.grpc_ready(target, proc, tmp_path / "server.log")
        _check(serving.load(target, serving.request_file(tmp_path, 2), 2, 4, PLAN), rows=2)
    finally:
        terminate([proc])


def test_fitserve_answers_the_load_generator(
    server: RunningServer, settings: Settings, tmp_path: Path
) -> None:
    publish_reference(settings.models_dir, versions=1)
    _check(serving.load(server.target, serving.request_file(tmp_path, 1), 1, 4, PLAN), rows=1)


def test_inprocess_ceiling_reports_each_batch_size(tmp_path: Path) -> None:
    model_dir = publish_reference(tmp_path / "models", versions=1)
    argv = procs.python("bench.inprocess", "--model-dir", str(model_dir), "--seconds", "0.2")
    out = subprocess.run(
        argv, cwd=procs.ROOT, env=procs.env(), capture_output=True, text=True, check=True
    )
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    assert [r["batch"] for r in rows] == [1, 32, 512]
    assert all(r["samples_per_s"] == pytest.approx(r["calls_per_s"] * r["batch"]) for r in rows)
