"""The RPC wrappers: unexpected errors become INTERNAL without leaking details."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import redis

from fitserve.v1 import model_pb2, model_pb2_grpc
from service.api.status import Context, RpcOutcomes, Servicer, unary
from service.errors import NotFound
from service.metrics import Metrics


class Broken(Servicer, model_pb2_grpc.ModelServiceServicer):
    @unary
    async def GetModel(
        self, request: model_pb2.GetModelRequest, context: Context
    ) -> model_pb2.Model:
        if request.name == "missing":
            raise NotFound("model 'missing' not found")
        if request.name == "no-redis":
            raise redis.ConnectionError("No connection available.")
        raise RuntimeError("secret internal detail")


async def _call(name: str, metrics: Metrics) -> grpc.aio.AioRpcError:
    server = grpc.aio.server()
    model_pb2_grpc.add_ModelServiceServicer_to_server(Broken(RpcOutcomes(metrics)), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = model_pb2_grpc.ModelServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await stub.GetModel(model_pb2.GetModelRequest(name=name), timeout=10)
            return exc.value
    finally:
        await server.stop(0)


def test_unexpected_error_is_internal_with_request_id_and_no_detail() -> None:
    metrics = Metrics()
    error = asyncio.run(_call("boom", metrics))
    assert error.code() == grpc.StatusCode.INTERNAL
    assert "quote request id" in (error.details() or "")
    assert "secret" not in (error.details() or "")
    count = metrics.registry.get_sample_value(
        "fitserve_rpc_requests_total", {"method": "GetModel", "code": "INTERNAL"}
    )
    assert count == 1.0


def test_domain_error_keeps_its_code_and_message() -> None:
    metrics = Metrics()
    error = asyncio.run(_call("missing", metrics))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert error.details() == "model 'missing' not found"


def test_redis_out_of_reach_is_unavailable_not_internal() -> None:
    metrics = Metrics()
    error = asyncio.run(_call("no-redis", metrics))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "Redis did not answer (ConnectionError: No connection available.)" in (
        error.details() or ""
    )
    count = metrics.registry.get_sample_value(
        "fitserve_rpc_requests_total", {"method": "GetModel", "code": "UNAVAILABLE"}
    )
    assert count == 1.0
