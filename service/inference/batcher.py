"""Dynamic batching of Predict requests for one loaded version.

Requests queue up while the model is busy; when it is free, one dedicated thread takes
everything queued (up to ``max_batch_size`` rows) as one batch. A lone request on an idle
model therefore goes out at once, and under load batches grow by themselves. The queue is
bounded: past ``max_queue`` waiting requests, ``submit`` refuses with ResourceExhausted.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from service.errors import ResourceExhausted, Unavailable

Arrays = dict[str, np.ndarray]


@dataclass
class _Pending:
    inputs: Arrays
    rows: int
    future: asyncio.Future[Arrays]
    loop: asyncio.AbstractEventLoop
    enqueued: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class BatchStats:
    """What one batch did, for metrics."""

    requests: int
    rows: int
    queue_waits: list[float]
    compute_seconds: float


class Batcher:
    """Runs ``run`` on batches formed from concurrent ``submit`` calls."""

    def __init__(
        self,
        run: Callable[[Arrays], Arrays],
        *,
        max_batch_size: int,
        max_queue: int,
        on_batch: Callable[[BatchStats], None] = lambda _: None,
        name: str = "batcher",
    ) -> None:
        self._run, self._on_batch = run, on_batch
        self._max_rows, self._max_queue = max_batch_size, max_queue
        self._queue: deque[_Pending] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        """Requests waiting for a batch."""
        return len(self._queue)

    async def submit(self, inputs: Arrays, rows: int) -> Arrays:
        """Queue one request and wait for its slice of the batch's outputs."""
        loop = asyncio.get_running_loop()
        pending = _Pending(inputs, rows, loop.create_future(), loop)
        with self._cond:
            if self._closed:
                raise Unavailable("this model version is unloading; retry")
            if len(self._queue) >= self._max_queue:
                raise ResourceExhausted(
                    f"the model's queue is full ({self._max_queue} requests); retry with backoff"
                )
            self._queue.append(pending)
            self._cond.notify()
        return await pending.future

    def close(self) -> None:
        """Finish the queued requests, then stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()

    def _loop(self) -> None:
        while batch := self._next_batch():
            self._execute(batch)

    def _next_batch(self) -> list[_Pending]:
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            batch: list[_Pending] = []
            rows = 0
            while self._queue and (not batch or rows + self._queue[0].rows <= self._max_rows):
                item = self._queue.popleft()
                batch.append(item)
                rows += item.rows
            return batch

    def _execute(self, batch: list[_Pending]) -> None:
        started = time.monotonic()
        try:
            outputs = self._run(_concat([p.inputs for p in batch]))
            parts = _split(outputs, [p.rows for p in batch])
        except Exception as exc:
            _deliver(batch, error=exc)
        else:
            _deliver(batch, results=parts)
        done = time.monotonic()
        self._on_batch(
            BatchStats(
                len(batch),
                sum(p.rows for p in batch),
                [started - p.enqueued for p in batch],
                done - started,
            )
        )


def _concat(inputs: list[Arrays]) -> Arrays:
    if len(inputs) == 1:
        return inputs[0]
    return {k: np.concatenate([i[k] for i in inputs]) for k in inputs[0]}


def _split(outputs: Arrays, rows: list[int]) -> list[Arrays]:
    total = sum(rows)
    for name, value in outputs.items():
        if value.shape[:1] != (total,):
            raise RuntimeError(f"output {name!r} has {value.shape[:1]} rows for {total} input rows")
    bounds = np.cumsum(rows)[:-1]
    per_output = {k: np.split(v, bounds) for k, v in outputs.items()}
    return [{k: per_output[k][i] for k in outputs} for i in range(len(rows))]


def _deliver(
    batch: list[_Pending], results: list[Arrays] | None = None, error: Exception | None = None
) -> None:
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Pending, Arrays | None]]] = {}
    for i, pending in enumerate(batch):
        by_loop.setdefault(pending.loop, []).append((pending, results[i] if results else None))
    for loop, items in by_loop.items():
        loop.call_soon_threadsafe(_resolve, items, error)


def _resolve(items: list[tuple[_Pending, Arrays | None]], error: Exception | None) -> None:
    for pending, result in items:
        if pending.future.done():
            continue
        if error is not None:
            pending.future.set_exception(error)
        else:
            pending.future.set_result(result or {})
