"""AsyncClient against the session's real server and worker (train, wait, predict, list),
and channels passed in to either client: used, and left open for their owner."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

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


def test_async_client_covers_datasets_jobs_artifacts_models_and_feedback(
    server: RunningServer,
    worker: subprocess.Popen[bytes],
    digits: tuple[np.ndarray, np.ndarray],
    tmp_path: Path,
) -> None:
    x, y = digits
    npz = tmp_path / "digits.npz"
    np.savez(npz, x=x[:96], y=y[:96])

    async def main() -> None:
        async with fitserve.AsyncClient(server.target, timeout=120) as client:
            dataset = await client.upload_dataset_file("sdk-async-file", npz)
            assert dataset.name == "sdk-async-file"
            assert (await client.get_dataset("sdk-async-file")).id == dataset.id

            trained = await client.train(
                "sdk-async-more",
                layers=MLP_LAYERS,
                loss="sparse_categorical_crossentropy",
                metrics=["accuracy"],
                dataset=dataset,
                epochs=1,
                callbacks={"csv_logger": True},
            )
            info = await trained.wait(timeout=300, verbose=0)
            first = info.model_version
            paths = {a.path for a in await client.list_artifacts(trained.id)}
            assert "history.csv" in paths
            history = await client.download_artifact(trained.id, "history.csv")
            assert isinstance(history, bytes)
            assert history.startswith(b"epoch")
            written = await client.download_artifact(trained.id, "history.csv", tmp_path)
            assert written == tmp_path / "history.csv"
            assert written.read_bytes() == history

            evaluated = await client.evaluate("sdk-async-more", dataset=dataset, version=first)
            assert isinstance(evaluated, fitserve.AsyncJob)
            await evaluated.wait(timeout=300, verbose=0)
            assert evaluated.state is fitserve.JobState.SUCCEEDED
            model = await client.get_model("sdk-async-more")
            assert "accuracy" in model.versions[0].metrics

            tuned = await client.fine_tune(
                "sdk-async-more",
                version=first,
                train_last_n_layers=1,
                dataset=dataset,
                loss="sparse_categorical_crossentropy",
                epochs=1,
            )
            second = (await tuned.wait(timeout=300, verbose=0)).model_version
            assert second == first + 1

            await client.set_alias("sdk-async-more", "stable", first)
            prediction = await client.predict_full("sdk-async-more", x[:4], alias="stable")
            assert prediction.version == first
            reply = await client.feedback(prediction.request_id, y[:4])
            assert (reply.model_name, reply.version, reply.rows) == ("sdk-async-more", first, 4)
            with pytest.raises(fitserve.FailedPreconditionError, match="stable"):
                await client.delete_version("sdk-async-more", first)  # an alias points at it
            await client.delete_alias("sdk-async-more", "stable")
            await client.delete_version("sdk-async-more", second)
            versions = [v.version for v in (await client.get_model("sdk-async-more")).versions]
            assert versions == [first]

            losses = await client.list_plugins("loss")
            assert any(p.name == "examples>huber" for p in losses.plugins)
            with pytest.raises(fitserve.InvalidArgumentError, match="not a plugin kind"):
                await client.list_plugins("bogus")
            with pytest.raises(fitserve.NotFoundError):
                await client.download_artifact(trained.id, "no-such-file.csv")
            with pytest.raises(fitserve.NotFoundError):  # to a folder: no .part left behind
                await client.download_artifact(trained.id, "no-such-file.csv", tmp_path)
            with pytest.raises(fitserve.NotFoundError):
                await client.evaluate("sdk-async-no-such-model", dataset=dataset)

            await client.delete_dataset("sdk-async-file")
            with pytest.raises(fitserve.NotFoundError):
                await client.get_dataset("sdk-async-file")

    asyncio.run(main())
    assert not list(tmp_path.glob("*.part"))  # no partial download left
