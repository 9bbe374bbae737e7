"""AsyncClient against the session's real server and worker (train, wait, predict, list),
and channels passed in to either client: used, and left open for their owner."""

from __future__ import annotations

import asyncio
import subprocess

import grpc
import grpc.aio
import numpy as np
import pytest

import fitserve
from tests.conftest import RunningServer
from tests.integration.conftest import MLP_LAYERS


def test_async_client_trains_waits_predicts_and_lists(
    server: RunningServer,
    worker: subprocess.Popen[bytes],
    digits: tuple[np.ndarray, np.ndarray],
) -> None:
    x, y = digits

    async def main() -> None:
        async with fitserve.AsyncClient(server.target, timeout=120) as client:
            dataset = await client.upload_dataset("sdk-async", x=x[:128], y=y[:128])
            job = await client.train(
                "sdk-async",
                layers=MLP_LAYERS,
                loss="sparse_categorical_crossentropy",
                metrics=["accuracy"],
                dataset=dataset,
                epochs=1,
            )
            assert isinstance(job, fitserve.AsyncJob)
            info = await job.wait(timeout=300, verbose=0)
            assert job.state is fitserve.JobState.SUCCEEDED
            assert info.model_version >= 1
            assert job.epochs == [1]
            assert set(job.history) >= {"loss", "accuracy"}
            probs = await client.predict("sdk-async", x[:3])
            assert isinstance(probs, np.ndarray)
            assert probs.shape == (3, 10)
            jobs = [j.id async for j in client.list_jobs(model_name="sdk-async")]
            assert jobs == [job.id]
            models = [m.name async for m in client.list_models()]
            assert "sdk-async" in models
            with pytest.raises(fitserve.InvalidArgumentError, match="is not a job id"):
                await client.get_job("no-such-job")
            with pytest.raises(ValueError, match="unknown job state"):
                client.list_jobs(state="DONE")

    asyncio.run(main())


def test_a_channel_passed_in_is_used_and_not_closed(server: RunningServer) -> None:
    with grpc.insecure_channel(server.target) as channel:
        with fitserve.Client(channel=channel, timeout=30) as client:
            list(client.list_models())
        # still open: a call on it after the client closed goes through
        list(fitserve.Client(channel=channel, timeout=30).list_models())

    async def main() -> None:
        async with grpc.aio.insecure_channel(server.target) as channel:
            async with fitserve.AsyncClient(channel=channel, timeout=30) as client:
                [m async for m in client.list_models()]
            assert channel.get_state() != grpc.ChannelConnectivity.SHUTDOWN
            again = fitserve.AsyncClient(channel=channel, timeout=30)
            [m async for m in again.list_models()]

    asyncio.run(main())
