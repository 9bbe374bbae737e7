"""A few seconds of the benchmark harness: every reference server and fitserve answer the
load generator, and the results are well formed. Not a timing test: no speed is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import redis

from bench import authcost, procs, serving
from bench.models import publish_reference
from service.config import AuthSettings, Settings
from service.domain.tokens import Role, TokenStore
from service.launch.supervision import terminate
from tests.conftest import RunningServer, private_stack

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


def test_with_auth_on_the_load_generator_sends_the_token_and_reads_the_server_cpu(
    tmp_path: Path,
) -> None:
    fast = AuthSettings(refresh_seconds=0.2)
    with private_stack(tmp_path, auth=fast) as (settings, running):
        publish_reference(settings.models_dir, versions=1)
        with redis.Redis.from_url(settings.redis_url, decode_responses=True) as client:
            token, _ = TokenStore(client).create("bench-predictor", Role.PREDICTOR)
        time.sleep(4 * fast.refresh_seconds)  # the server has re-read the tokens
        request = serving.request_file(tmp_path, 1)
        assert serving._without_token(running.target, request) == "UNAUTHENTICATED"
        refused = serving.load(running.target, request, 1, 4, PLAN)
        assert refused["ok"] == 0
        assert refused["errors"].get("UNAUTHENTICATED", 0) > 0
        serving.load(running.target, request, 1, 1, PLAN, token)  # loads the model
        # the server runs in this process
        result = serving.load(running.target, request, 1, 4, PLAN, token, os.getpid())
        assert result.pop("server_cpu_s") > 0
        _check(result, rows=1)
        cost = authcost.measure(settings.redis_url, token, number=100, repeat=2)
        assert cost["on_us"] > 0
        assert cost["off_us"] > 0
        with pytest.raises(Exception, match="not valid"):
            authcost.measure(settings.redis_url, "fst_" + "x" * 43, number=10, repeat=1)
