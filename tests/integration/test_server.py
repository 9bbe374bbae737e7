"""The server's ecosystem contract: health per service, reflection, metrics, roles."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import textwrap
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import fitserve
from service.config import Settings
from tests.conftest import ROOT, RunningServer

pytestmark = pytest.mark.integration
SERVICES = [
    "fitserve.v1.DatasetService",
    "fitserve.v1.InferenceService",
    "fitserve.v1.ModelService",
    "fitserve.v1.TrainingService",
]


def test_health_reports_every_service(channel: grpc.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    for service in ["", *SERVICES]:
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
    with pytest.raises(grpc.RpcError) as exc:
        stub.Check(health_pb2.HealthCheckRequest(service="fitserve.v1.Nope"), timeout=5)
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]


def test_reflection_lists_the_services(channel: grpc.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    reply = next(iter(stub.ServerReflectionInfo(iter([request]), timeout=5)))
    names = {s.name for s in reply.list_services_response.service}
    assert set(SERVICES) <= names
    assert "grpc.health.v1.Health" in names


def test_metrics_endpoint_counts_requests_by_code(
    channel: grpc.Channel, server: RunningServer
) -> None:
    from fitserve.v1 import model_pb2, model_pb2_grpc

    stub = model_pb2_grpc.ModelServiceStub(channel)
    with pytest.raises(grpc.RpcError):
        stub.GetModel(model_pb2.GetModelRequest(name="metrics-probe-missing"))
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        body = response.read().decode()
    line = 'fitserve_rpc_requests_total{code="NOT_FOUND",method="GetModel"} '
    assert line in body  # every code is there from the start: the count is what says it
    assert float(body.split(line, 1)[1].split()[0]) >= 1
    assert "# TYPE fitserve_predict_batch_size histogram" in body


def test_job_statistics_come_from_redis(
    client: fitserve.Client, server: RunningServer, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    def finished() -> float:
        url = f"http://127.0.0.1:{server.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            body = response.read().decode()
        match = re.search(
            r'fitserve_jobs_finished_total\{kind="TRAIN",outcome="SUCCEEDED"\} (\S+)', body
        )
        return float(match.group(1)) if match else 0.0

    before = finished()
    x, y = digits
    ds = client.upload_dataset("stats", x=x[:32], y=y[:32])
    layers = [{"type": "Flatten", "input_shape": [28, 28]}, {"type": "Dense", "units": 10}]
    client.train(
        "stats", layers=layers, loss="sparse_categorical_crossentropy", dataset=ds, seed=0
    ).wait(timeout=120)
    assert finished() == before + 1


@pytest.mark.parametrize("plugins", [False, True], ids=["no-plugins", "example-plugins"])
def test_api_role_imports_no_tensorflow(settings: Settings, plugins: bool) -> None:
    """fitserve's api code imports no TensorFlow; installed plugin modules bring their own
    Keras (the example package, installed by make install, is hidden for the first case)."""
    hide = (
        ""
        if plugins
        else textwrap.dedent("""
        import importlib.metadata as metadata
        _entry_points = metadata.entry_points
        metadata.entry_points = lambda **kw: (
            [] if kw.get("group") == "fitserve.plugins" else _entry_points(**kw)
        )
    """)
    )
    code = hide + textwrap.dedent(f"""
        import asyncio, sys
        from service.config import Settings
        from service.api.server import create_server

        async def main():
            s = Settings(roles=["api"], port=0, metrics_port=0, redis_url={settings.redis_url!r},
                         data_dir={str(settings.data_dir)!r})
            server, port = await create_server(s)
            await server.start(serve_metrics_http=False)
            await server.stop(0)

        asyncio.run(main())
        heavy = sorted(m for m in ("tensorflow", "keras") if m in sys.modules)
        print("loaded:", heavy)
    """)
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert ("loaded: ['keras', 'tensorflow']" if plugins else "loaded: []") in out.stdout


def test_a_second_server_on_the_port_of_a_running_one_fails_naming_it(
    server: RunningServer, settings: Settings
) -> None:
    from service.api.server import AddressInUse, create_server

    port = int(server.target.rsplit(":", 1)[1])
    second = settings.model_copy(update={"port": port, "roles": ["api"]})

    with pytest.raises(AddressInUse, match=f"address in use: 127.0.0.1:{port} is taken"):
        asyncio.run(create_server(second))
    with grpc.insecure_channel(server.target) as channel:  # the first one is untouched
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
