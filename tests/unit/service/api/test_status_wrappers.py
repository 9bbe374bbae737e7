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
        if request.name == "wait":  # until the client gives up
            ENTERED.set()
            await asyncio.Event().wait()
        raise RuntimeError("secret internal detail")


ENTERED = asyncio.Event()


async def _gone(metrics: Metrics) -> tuple[grpc.StatusCode, grpc.StatusCode]:
    """A call past its deadline and a cancelled call, both inside the handler."""
    server = grpc.aio.server()
    model_pb2_grpc.add_ModelServiceServicer_to_server(Broken(RpcOutcomes(metrics)), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = model_pb2_grpc.ModelServiceStub(channel)
            request = model_pb2.GetModelRequest(name="wait")
            with pytest.raises(grpc.aio.AioRpcError) as late:
                await stub.GetModel(request, timeout=1.0)
            ENTERED.clear()
            call = stub.GetModel(request, timeout=60)
            await ENTERED.wait()  # in the handler now
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            for _ in range(100):  # the server sees the cancel a moment later
                got = metrics.registry.get_sample_value(
                    "fitserve_rpc_requests_total", {"method": "GetModel", "code": "CANCELLED"}
                )
                if got:
                    break
                await asyncio.sleep(0.05)  # the polling period
            return late.value.code(), await call.code()
    finally:
        await server.stop(0)


def test_deadlines_and_cancellations_are_counted_and_timed_as_the_client_sees_them() -> None:
    metrics = Metrics()
    assert (
        metrics.registry.get_sample_value(
            "fitserve_rpc_requests_total", {"method": "GetModel", "code": "CANCELLED"}
        )
        is None
    )
    late, cancelled = asyncio.run(_gone(metrics))
    assert (late, cancelled) == (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)
    for code in ("DEADLINE_EXCEEDED", "CANCELLED"):
        labels = {"method": "GetModel", "code": code}
        assert metrics.registry.get_sample_value("fitserve_rpc_requests_total", labels) == 1.0
        assert metrics.registry.get_sample_value("fitserve_rpc_duration_seconds_count", labels) == 1
    # every code of the servicer's methods was there at zero from the start
    zero = {"method": "GetModel", "code": "DATA_LOSS"}
    assert metrics.registry.get_sample_value("fitserve_rpc_requests_total", zero) == 0.0


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
