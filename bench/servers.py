"""Reference servers on the same port setup as fitserve's, for the serving ratios.

- ``echo``: the transport ceiling. A grpc.aio server whose Predict handler returns the
  request bytes unchanged (same payload size); no Python gRPC server can beat it.
- ``naive``: what a user writes by hand. A grpc.aio server that decodes the tensor and
  calls the SavedModel's serving function once per request, with no batching.

    python -m bench.servers echo --port 50100
    python -m bench.servers naive --port 0 --model-dir models/mlp/1 --ready-file ready.json

With ``--ready-file`` a server reports the port it bound the way fitserve's do
(service.launch.ready), so the harness starts both kinds alike, on port 0.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2_grpc

from bench.loadgen import MAX_MESSAGE
from service.launch.ready import write_ready

OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.so_reuseport", 1),
]


def _echo_handler() -> grpc.GenericRpcHandler:
    async def predict(request: bytes, context: Any) -> bytes:
        return request

    return grpc.method_handlers_generic_handler(
        "fitserve.v1.InferenceService",
        {"Predict": grpc.unary_unary_rpc_method_handler(predict)},
    )


def _naive_handler(model_dir: str) -> grpc.GenericRpcHandler:
    import tensorflow as tf

    from fitserve.v1 import inference_pb2, tensor_pb2

    fn = tf.saved_model.load(model_dir).signatures["serving_default"]
    (input_name,) = fn.structured_input_signature[1]

    async def predict(raw: bytes, context: Any) -> bytes:
        request = inference_pb2.PredictRequest.FromString(raw)
        tensor = next(iter(request.inputs.values()))
        x = np.frombuffer(tensor.content, "<f4").reshape(tuple(tensor.shape))
        outputs = fn(**{input_name: tf.constant(x)})
        reply = inference_pb2.PredictResponse(model_name=request.model.name, version=1)
        for name, value in outputs.items():
            array = value.numpy()
            reply.outputs[name].CopyFrom(
                tensor_pb2.Tensor(
                    dtype=tensor_pb2.DATA_TYPE_FLOAT32,
                    shape=array.shape,
                    content=array.astype("<f4").tobytes(),
                )
            )
        return reply.SerializeToString()

    return grpc.method_handlers_generic_handler(
        "fitserve.v1.InferenceService",
        {"Predict": grpc.unary_unary_rpc_method_handler(predict)},
    )


async def serve(kind: str, port: int, model_dir: str, ready_file: Path | None) -> None:
    server = grpc.aio.server(options=OPTIONS)
    handler = _echo_handler() if kind == "echo" else _naive_handler(model_dir)
    server.add_generic_rpc_handlers([handler])
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    if ready_file is not None:
        write_ready(ready_file, bound, None)
    await server.wait_for_termination()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("kind", choices=["echo", "naive"])
    p.add_argument("--port", type=int, default=0, help="0 (default): a free one")
    p.add_argument("--model-dir", default="")
    p.add_argument("--ready-file", type=Path, help="once listening, report the port here")
    a = p.parse_args()
    asyncio.run(serve(a.kind, a.port, a.model_dir, a.ready_file))


if __name__ == "__main__":
    main()
