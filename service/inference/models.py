"""The versions this server serves: resolve a request, load on demand, batch, and run.

Versions load in a thread on first use (a load never blocks the event loop) and are kept
in an LRU bounded by count. Name/alias resolution is cached for ``resolve_ttl`` seconds,
so an alias switch or a new version is picked up within that time.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from service.config import BatchingSettings
from service.domain.model_store import ModelStore
from service.errors import FitserveError, InvalidRequest, Unavailable
from service.inference.batcher import Batcher, BatchStats
from service.inference.servable import Servable
from service.metrics import Metrics

log = logging.getLogger(__name__)


class VersionState(enum.StrEnum):
    NOT_LOADED = "NOT_LOADED"
    LOADING = "LOADING"
    AVAILABLE = "AVAILABLE"
    UNLOADING = "UNLOADING"
    FAILED = "FAILED"


@dataclass
class _Loaded:
    servable: Servable
    batcher: Batcher


@dataclass(frozen=True)
class Prediction:
    """Outputs of one Predict and the version that answered."""

    model: str
    version: int
    outputs: dict[str, np.ndarray]


class ServingModels:
    """Loads versions from the model store and answers predictions with batching."""

    def __init__(
        self,
        store: ModelStore,
        batching: BatchingSettings,
        metrics: Metrics,
        *,
        max_loaded: int = 8,
        resolve_ttl: float = 0.5,
    ) -> None:
        self._store, self._batching, self._metrics = store, batching, metrics
        self._max_loaded, self._ttl = max_loaded, resolve_ttl
        self._loaded: OrderedDict[tuple[str, int], _Loaded] = OrderedDict()
        self._loading: dict[tuple[str, int], asyncio.Task[_Loaded]] = {}
        self._failed: dict[tuple[str, int], str] = {}
        self._resolved: dict[tuple[str, int, str], tuple[float, int]] = {}

    async def predict(
        self, name: str, inputs: dict[str, np.ndarray], version: int = 0, alias: str = ""
    ) -> Prediction:
        """Run one request through its version's batcher."""
        started = time.monotonic()
        resolved = await self.resolve(name, version, alias)
        loaded = await self._get(name, resolved)
        checked, rows = loaded.servable.check_inputs(inputs)
        if rows == 0:
            raise InvalidRequest("inputs have no rows; send at least one")
        outputs = await loaded.batcher.submit(checked, rows)
        labels = (name, str(resolved))
        self._metrics.predict_latency.labels(*labels).observe(time.monotonic() - started)
        return Prediction(name, resolved, outputs)

    async def resolve(self, name: str, version: int = 0, alias: str = "") -> int:
        """The version a request means, cached briefly."""
        key = (name, version, alias)
        hit = self._resolved.get(key)
        now = time.monotonic()
        if hit and now - hit[0] < self._ttl:
            return hit[1]
        resolved = await asyncio.to_thread(self._store.resolve, name, version, alias)
        self._resolved[key] = (now, resolved)
        return resolved

    def status(self, name: str) -> dict[int, tuple[VersionState, str]]:
        """State of each version of a model on this server."""
        states = dict.fromkeys(self._store.versions(name), (VersionState.NOT_LOADED, ""))
        for (model, v), reason in self._failed.items():
            if model == name:
                states[v] = (VersionState.FAILED, reason)
        for model, v in self._loading:
            if model == name:
                states[v] = (VersionState.LOADING, "")
        for model, v in self._loaded:
            if model == name:
                states[v] = (VersionState.AVAILABLE, "")
        return states

    async def close(self) -> None:
        """Drain and unload every version."""
        for key in list(self._loaded):
            await self._unload(key)

    async def _get(self, name: str, version: int) -> _Loaded:
        key = (name, version)
        if (loaded := self._loaded.get(key)) is not None:
            self._loaded.move_to_end(key)
            return loaded
        task = self._loading.get(key)
        if task is None:
            task = asyncio.create_task(self._load(name, version))
            self._loading[key] = task
        return await asyncio.shield(task)

    async def _load(self, name: str, version: int) -> _Loaded:
        key = (name, version)
        started = time.monotonic()
        try:
            servable = await asyncio.to_thread(
                Servable, name, version, self._store.path(name, version)
            )
        except Exception as exc:
            self._failed[key] = f"{type(exc).__name__}: {exc}"
            log.exception("loading %s version %d failed", name, version)
            raise Unavailable(f"model {name!r} version {version} failed to load: {exc}") from None
        finally:
            self._loading.pop(key, None)
        self._failed.pop(key, None)
        loaded = _Loaded(servable, self._batcher(servable))
        self._loaded[key] = loaded
        self._metrics.model_load_seconds.labels(name).observe(time.monotonic() - started)
        self._metrics.loaded_versions.labels(name).inc()
        while len(self._loaded) > self._max_loaded:
            await self._unload(next(iter(self._loaded)))
        return loaded

    def _batcher(self, servable: Servable) -> Batcher:
        labels = (servable.model, str(servable.version))
        m = self._metrics

        def on_batch(stats: BatchStats) -> None:
            m.batch_size.labels(*labels).observe(stats.rows)
            m.predict_compute.labels(*labels).observe(stats.compute_seconds)
            for wait in stats.queue_waits:
                m.predict_queue_wait.labels(*labels).observe(wait)

        return Batcher(
            _guarded(servable),
            max_batch_size=self._batching.max_batch_size,
            max_queue=self._batching.max_queue,
            on_batch=on_batch,
            name=f"batcher-{servable.model}-{servable.version}",
        )

    async def _unload(self, key: tuple[str, int]) -> None:
        loaded = self._loaded.pop(key)
        await asyncio.to_thread(loaded.batcher.close)
        self._metrics.loaded_versions.labels(key[0]).dec()


def _guarded(servable: Servable) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """Turn a model failure into an error every waiter of the batch can read."""

    def run(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            return servable.run(batch)
        except FitserveError:
            raise
        except Exception as exc:
            log.exception("model %s version %d failed on a batch", servable.model, servable.version)
            raise Unavailable(
                f"model {servable.model!r} version {servable.version} failed on this batch: "
                f"{type(exc).__name__}"
            ) from None

    return run
