"""A version that fails to load: a status no client retries, naming the version and what
is wrong without server paths, remembered for load_failure_seconds (no reload per
request), forgotten when that passes or a model event comes."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from service.config import BatchingSettings, InferenceSettings
from service.domain.model_store import ModelStore
from service.errors import DataLoss, FailedPrecondition, Unavailable
from service.inference import models
from service.inference.models import ServingModels, VersionState
from service.metrics import Metrics


class _Broken:
    """Stands in for Servable: counts loads; fails as ``mode`` says."""

    loads = 0
    mode = "corrupt"

    def __init__(self, model: str, version: int, path: Path, **_: Any) -> None:
        type(self).loads += 1
        if self.mode == "corrupt":
            raise OSError(
                f"Cannot parse file b'{path}/saved_model.pb': Error parsing message with "
                "type 'tensorflow.SavedModel': Wire format was corrupt."
            )
        if self.mode == "memory":
            raise MemoryError("no room")
        self.inputs: list[Any] = []
        self.outputs: list[Any] = []
        self.nbytes = 0

    def warm_up(self, sizes: Any, calls: int) -> None:
        raise ValueError("Incompatible shapes: [1,3] vs. [1,4]")


@pytest.fixture
def broken(monkeypatch: pytest.MonkeyPatch) -> type[_Broken]:
    monkeypatch.setattr(models, "Servable", _Broken)
    monkeypatch.setattr(_Broken, "loads", 0)
    return _Broken


def _serving(tmp_path: Path, seconds: float) -> tuple[ServingModels, Metrics]:
    (tmp_path / "models" / "m" / "1").mkdir(parents=True)
    metrics = Metrics()
    settings = InferenceSettings(load_failure_seconds=seconds, warmup_calls=1)
    return ServingModels(
        ModelStore(tmp_path / "models"), BatchingSettings(), settings, metrics
    ), metrics


def _loads(metrics: Metrics, result: str) -> float:
    value = metrics.registry.get_sample_value(
        "fitserve_model_loads_total", {"model": "m", "version": "1", "result": result}
    )
    return value or 0.0


def test_a_corrupt_version_is_data_loss_named_without_paths_and_loaded_once(
    tmp_path: Path, broken: type[_Broken]
) -> None:
    serving, metrics = _serving(tmp_path, 30.0)

    async def twice() -> list[DataLoss]:
        errors = []
        for _ in range(3):
            with pytest.raises(DataLoss) as caught:
                await serving.signature("m", 1)
            errors.append(caught.value)
        return errors

    errors = asyncio.run(twice())

    assert broken.loads == 1
    assert _loads(metrics, "DATA_LOSS") == 1
    message = errors[0].message
    assert message.startswith("model 'm' version 1 cannot be loaded: its files are corrupt")
    assert "<data folder>/models/m/1/saved_model.pb" in message
    assert "Wire format was corrupt" in message
    assert str(tmp_path) not in message
    assert "tries it again 30 s after this failure" in message
    assert {e.message for e in errors} == {message}
    state, reason = serving.status("m")[1]
    assert (state, reason) == (VersionState.FAILED, message)


def test_a_remembered_failure_is_tried_again_once_its_time_passed(
    tmp_path: Path, broken: type[_Broken]
) -> None:
    serving, _metrics = _serving(tmp_path, 0.2)

    async def run() -> None:
        with pytest.raises(DataLoss):
            await serving.signature("m", 1)
        await asyncio.sleep(0.25)  # the remembered failure comes due
        with pytest.raises(DataLoss):
            await serving.signature("m", 1)

    asyncio.run(run())

    assert broken.loads == 2


def test_a_model_event_forgets_the_failure_and_a_fixed_version_loads(
    tmp_path: Path, broken: type[_Broken]
) -> None:
    serving, metrics = _serving(tmp_path, 30.0)

    async def run() -> None:
        with pytest.raises(DataLoss):
            await serving.signature("m", 1)
        await serving.refresh("other")  # another model's event changes nothing
        with pytest.raises(DataLoss):
            await serving.signature("m", 1)
        assert broken.loads == 1
        broken.mode = "warm-up fails"
        await serving.refresh("m")  # a version of m was published (or deleted)
        with pytest.raises(FailedPrecondition, match="fails when run on a batch of zeros"):
            await serving.signature("m", 1)

    try:
        asyncio.run(run())
    finally:
        broken.mode = "corrupt"

    assert broken.loads == 2
    assert _loads(metrics, "FAILED_PRECONDITION") == 1


def test_out_of_memory_stays_unavailable_and_is_not_remembered(
    tmp_path: Path, broken: type[_Broken]
) -> None:
    serving, metrics = _serving(tmp_path, 30.0)
    broken.mode = "memory"

    async def run() -> None:
        for _ in range(2):
            with pytest.raises(Unavailable, match="does not fit in this server's memory"):
                await serving.signature("m", 1)

    try:
        asyncio.run(run())
    finally:
        broken.mode = "corrupt"

    assert broken.loads == 2
    assert _loads(metrics, "UNAVAILABLE") == 2
