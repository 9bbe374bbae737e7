"""The versions this server serves: routes, loading, warm-up, draining and the LRU bound.

A *route* is what a request names, ``(model, version, alias)``, and the version it goes
to. Routes are resolved against the store once and then kept; they change only when
``refresh`` re-resolves them (on a model event, or by the store poll). When a route's
target changes, the new version is loaded and warmed up *before* the route switches, so
traffic never waits for a load; the old version, once no route points at it, is taken out
of service, drains the requests that hold it, and unloads. A request holds its version
from resolution to answer with no await in between lookup and hold, so a switch under
load fails nothing. Loaded versions are bounded by count and by variable bytes (LRU).

A version that fails to load answers with what is wrong, in a status no client retries:
DATA_LOSS when its files are unreadable (a corrupt saved_model.pb, missing variables),
FAILED_PRECONDITION when it loads but fails its warm-up. That failure is remembered for
``load_failure_seconds``, so retried or repeated requests do not load it again and again;
a model event for the model (a version published or deleted, an alias moved) forgets it
at once. Out of memory stays UNAVAILABLE (retrying may succeed) and is not remembered.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.config import BatchingSettings, InferenceSettings
from service.domain.model_store import ModelStore
from service.errors import (
    DataLoss,
    FailedPrecondition,
    FitserveError,
    InvalidRequest,
    NotFound,
    Unavailable,
    redacted,
)
from service.inference.batcher import Batcher, BatchPolicy, BatchStats
from service.inference.servable import OUT_OF_MEMORY, Servable, TensorSpec
from service.metrics import Metrics, multiprocess

log = logging.getLogger(__name__)
GAUGE_PERIOD = 1.0  # seconds between samples of the gauges with --processes
DETAIL_CHARS = 400  # of the underlying error, in a load failure's message

Key = tuple[str, int]
Route = tuple[str, int, str]


class VersionState(enum.StrEnum):
    NOT_LOADED = "NOT_LOADED"
    LOADING = "LOADING"
    AVAILABLE = "AVAILABLE"
    UNLOADING = "UNLOADING"
    FAILED = "FAILED"


@dataclass
class _Loaded:
    """A loaded version and the requests holding it (it unloads only when none do)."""

    servable: Servable
    batcher: Batcher
    holders: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.idle.set()

    def hold(self) -> None:
        self.holders += 1
        self.idle.clear()

    def release(self) -> None:
        self.holders -= 1
        if self.holders == 0:
            self.idle.set()


@dataclass(frozen=True)
class _Failure:
    """Why a version failed to load, answered without loading it again until ``until``
    (``time.monotonic()``)."""

    error: FitserveError
    until: float

    def again(self) -> FitserveError:
        """A fresh copy to raise (raising one instance again and again grows its traceback)."""
        return type(self.error)(self.error.message)


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
        inference: InferenceSettings,
        metrics: Metrics,
        arriving: Callable[[], int] | None = None,
    ) -> None:
        self._store, self._batching, self._settings = store, batching, inference
        self._arriving = arriving  # calls the server holds that are not at a handler yet
        self._metrics = metrics
        self._loaded: OrderedDict[Key, _Loaded] = OrderedDict()
        self._loading: dict[Key, asyncio.Task[None]] = {}
        self._unloading: set[Key] = set()
        self._failed: dict[Key, _Failure] = {}
        # Messages name the store as a caller knows it, never by its path on this server.
        self._hidden = {str(p): "<data folder>/models" for p in (store.root, store.root.resolve())}
        self._routes: dict[Route, int] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._unloads: set[asyncio.Task[None]] = set()

    # -- requests ------------------------------------------------------------------

    async def resolve(self, name: str, version: int = 0, alias: str = "") -> int:
        """The version a request means; a known route answers without awaiting anything."""
        route = (name, version, alias)
        if (target := self._routes.get(route)) is not None:
            return target
        target = await asyncio.to_thread(self._store.resolve, name, version, alias)
        return self._routes.setdefault(route, target)

    async def predict(
        self, name: str, version: int, inputs: dict[str, np.ndarray], deadline: float | None
    ) -> Prediction:
        """Run one request on a resolved version through its batcher."""
        loaded = await self._hold(name, version)
        try:
            checked, rows = loaded.servable.check_inputs(inputs)
            if rows == 0:
                raise InvalidRequest("inputs have no rows; send at least one", field="inputs")
            outputs = await loaded.batcher.submit(checked, rows, deadline)
        finally:
            loaded.release()
        return Prediction(name, version, outputs)

    async def signature(self, name: str, version: int) -> tuple[list[TensorSpec], list[TensorSpec]]:
        """Inputs and outputs of a version's serving signature (loading it if needed)."""
        loaded = await self._hold(name, version)
        loaded.release()
        return loaded.servable.inputs, loaded.servable.outputs

    def status(self, name: str) -> dict[int, tuple[VersionState, str]]:
        """State of each version of a model on this server (reads the store: use a thread)."""
        states = dict.fromkeys(self._store.versions(name), (VersionState.NOT_LOADED, ""))
        for table, state in (
            (self._failed, VersionState.FAILED),
            (self._loading, VersionState.LOADING),
            (dict.fromkeys(self._unloading), VersionState.UNLOADING),
            (self._loaded, VersionState.AVAILABLE),  # a reloaded copy wins over the old one
        ):
            for model, v in table:
                if model == name:
                    failure = self._failed.get((model, v))
                    states[v] = (state, failure.error.message if failure else "")
        return states

    # -- versions ------------------------------------------------------------------

    async def preload(self, names: list[str]) -> None:
        """Load the default version (stable, else latest) of each model."""
        for name in names:
            await self.signature(name, await self.resolve(name))

    async def refresh(self, model: str | None = None) -> None:
        """Re-resolve the routes of ``model`` (every model: None), switching warm. A
        refresh for one model (its model event: a version published or deleted, an alias
        moved) also forgets its versions' load failures, so they are tried again."""
        if model is not None:
            for key in [k for k in self._failed if k[0] == model]:
                del self._failed[key]
        names = sorted({r[0] for r in self._routes} if model is None else {model})
        for name in names:
            async with self._locks.setdefault(name, asyncio.Lock()):
                await self._refresh_model(name)

    async def close(self) -> None:
        """Stop background work, then drain and unload every version."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for key in list(self._loaded):
            self._retire(key)
        await asyncio.gather(*self._unloads, return_exceptions=True)

    async def sample_gauges(self, period: float = GAUGE_PERIOD) -> None:
        """Copy queue depth and in-flight counts into their gauges every ``period`` s.

        With ``serve --processes N`` the gauges live in per-process files, which a gauge
        read by a function at scrape time never reaches; there this task keeps them
        current instead (spawned by the server when metrics are aggregated).
        """
        m = self._metrics
        while True:
            for (name, version), loaded in list(self._loaded.items()):
                labels = (name, str(version))
                m.queue_depth.labels(*labels).set(loaded.batcher.depth)
                m.in_flight.labels(*labels).set(loaded.holders)
            await asyncio.sleep(period)  # a sampling period, not a wait for a condition

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run background work owned by this object (cancelled by ``close``)."""
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("background model work failed", exc_info=exc)

    async def _refresh_model(self, name: str) -> None:
        before = {r: v for r, v in self._routes.items() if r[0] == name}
        for route, current in before.items():
            target = await self._re_resolve(route)
            if target is None:
                self._routes.pop(route, None)
            elif target != current and await self._warm(name, target):
                self._routes[route] = target
        targets = {v for r, v in self._routes.items() if r[0] == name}
        for key in [(name, v) for v in set(before.values())]:
            if key[1] not in targets:
                self._retire(key)

    async def _re_resolve(self, route: Route) -> int | None:
        try:
            return await asyncio.to_thread(self._store.resolve, *route)
        except NotFound:
            return None

    async def _warm(self, name: str, version: int) -> bool:
        """Load (and warm up) a version before a route switches to it."""
        try:
            await self.signature(name, version)
        except FitserveError as exc:
            log.warning("not switching %s to version %d: %s", name, version, exc.message)
            return False
        return True

    async def _hold(self, name: str, version: int) -> _Loaded:
        """The loaded version, held for one request; loads it first if needed."""
        key = (name, version)
        while True:
            if (loaded := self._loaded.get(key)) is not None:
                self._loaded.move_to_end(key)
                loaded.hold()
                return loaded
            task = self._loading.get(key)
            if task is None:
                if (failure := self._failed.get(key)) and time.monotonic() < failure.until:
                    raise failure.again()  # remembered: no load until it is due again
                task = self._loading[key] = asyncio.create_task(self._load(key))
            await asyncio.shield(task)

    async def _load(self, key: Key) -> None:
        started = time.monotonic()
        labels = (key[0], str(key[1]))
        self._metrics.prepare_version(*key)
        try:
            servable = await asyncio.to_thread(self._build, key)
        except FitserveError as error:
            self._metrics.model_loads.labels(*labels, error.code).inc()
            self._metrics.model_load_failures.labels(error.code).inc()
            remembered = not isinstance(error, Unavailable | NotFound)
            until = time.monotonic() + (self._settings.load_failure_seconds if remembered else 0)
            self._failed[key] = _Failure(error, until)
            log.warning("loading %s version %d failed: %s", *key, error.message)
            raise
        finally:
            self._loading.pop(key, None)
        self._failed.pop(key, None)
        self._metrics.model_loads.labels(*labels, "OK").inc()
        self._loaded[key] = loaded = _Loaded(servable, self._batcher(servable))
        self._track(key, loaded, time.monotonic() - started)
        self._evict()

    def _build(self, key: Key) -> Servable:
        """Load and warm up a version (in a thread: this is slow); a failure raises the
        domain error its requests get (``_load_failure``)."""
        policy = self._policy(key[0])
        path = self._store.path(*key)
        try:
            servable = Servable(*key, path, allow_nan=self._settings.allow_nan_inputs)
        except Exception as exc:
            log.debug("loading %s version %d", *key, exc_info=True)
            raise self._load_failure(key, exc, warming=False) from exc
        sizes = policy.allowed_batch_sizes or sorted({1, policy.max_batch_size})
        try:
            servable.warm_up(sizes, self._settings.warmup_calls)
        except Exception as exc:
            log.debug("warming up %s version %d", *key, exc_info=True)
            raise self._load_failure(key, exc, warming=True) from exc
        return servable

    def _load_failure(self, key: Key, exc: Exception, *, warming: bool) -> FitserveError:
        """What a request for a version that failed to load is told: which version, what
        is wrong (the error, its paths named from the data folder), what to do."""
        name, version = key
        what = f"model {name!r} version {version}"
        detail = redacted(f"{type(exc).__name__}: {exc}", self._hidden)[:DETAIL_CHARS]
        if isinstance(exc, OUT_OF_MEMORY):
            return Unavailable(f"{what} does not fit in this server's memory ({detail}); retry")
        if not self._store.path(name, version).is_dir():
            return NotFound(f"{what} was deleted while it loaded")
        again = (
            f"; this server tries it again {self._settings.load_failure_seconds:g} s after "
            f"this failure, or once a version of {name!r} is published"
        )
        if warming:
            return FailedPrecondition(
                f"{what} loads but fails when run on a batch of zeros ({detail}); publish a "
                f"fixed version or delete this one{again}"
            )
        return DataLoss(
            f"{what} cannot be loaded: its files are corrupt or incomplete ({detail}); "
            f"publish a new version, or delete this one (DeleteVersion){again}"
        )

    def _policy(self, name: str) -> BatchPolicy:
        b = self._batching.for_model(name)
        return BatchPolicy(
            max_batch_size=b.max_batch_size,
            batch_timeout=b.batch_timeout_ms / 1000,
            max_queue=b.max_queue,
            allowed_batch_sizes=tuple(b.allowed_batch_sizes),
            threads=b.batch_threads,
            latency_target=b.latency_target_ms / 1000 if b.latency_target_ms else None,
        )

    def _evict(self) -> None:
        """Unload least recently used versions past the count and byte bounds."""
        s = self._settings
        while len(self._loaded) > 1 and (
            len(self._loaded) > s.max_loaded_versions
            or sum(x.servable.nbytes for x in self._loaded.values()) > s.max_loaded_bytes
        ):
            self._retire(next(iter(self._loaded)))

    def _retire(self, key: Key) -> None:
        """Take a version out of service now; it unloads once its holders are done."""
        loaded = self._loaded.pop(key, None)
        if loaded is None:
            return
        self._unloading.add(key)
        task = asyncio.create_task(self._unload(key, loaded))
        self._unloads.add(task)
        task.add_done_callback(self._unloads.discard)

    async def _unload(self, key: Key, loaded: _Loaded) -> None:
        try:
            await loaded.idle.wait()
            await asyncio.to_thread(loaded.batcher.close)
        finally:
            self._unloading.discard(key)
            if key not in self._loaded:  # unless a new copy took the version's metrics
                self._untrack(key)
        log.info("unloaded %s version %d", *key)

    def _batcher(self, servable: Servable) -> Batcher:
        labels = (servable.model, str(servable.version))
        m = self._metrics

        def on_batch(stats: BatchStats) -> None:
            m.batch_size.labels(*labels).observe(stats.rows)
            m.batch_requests.labels(*labels).observe(stats.requests)
            m.predict_compute.labels(*labels).observe(stats.compute_seconds)
            m.batch_timeout.labels(*labels).set(stats.batch_timeout)
            for wait in stats.queue_waits:
                m.predict_queue_wait.labels(*labels).observe(wait)

        def on_reject(reason: str) -> None:
            m.rejections.labels(*labels, reason).inc()

        return Batcher(
            servable.run,
            self._policy(servable.model),
            on_batch=on_batch,
            on_reject=on_reject,
            label=servable.where,
            arriving=self._arriving,
        )

    def _track(self, key: Key, loaded: _Loaded, seconds: float) -> None:
        labels = (key[0], str(key[1]))
        m = self._metrics
        m.prepare_version(*key, [o.name for o in loaded.servable.outputs])
        m.model_load_seconds.labels(*labels).observe(seconds)
        m.loaded_versions.labels(*labels).set(1)
        m.loaded_bytes.labels(*labels).set(loaded.servable.nbytes)
        if not multiprocess():
            m.queue_depth.labels(*labels).set_function(_getter(lambda: loaded.batcher.depth))
            m.in_flight.labels(*labels).set_function(_getter(lambda: loaded.holders))
        log.info("loaded %s version %d in %.2f s", *key, seconds)

    def _untrack(self, key: Key) -> None:
        """Remove every series of the version (``Metrics.forget_version``)."""
        self._metrics.forget_version(*key)


def _getter(fn: Callable[[], int]) -> Callable[[], float]:
    return lambda: float(fn())
