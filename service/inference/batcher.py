"""Dynamic batching of Predict requests for one loaded version.

Requests queue up; dedicated threads (``threads`` of them) take queued requests, up to
``max_batch_size`` rows, as one batch. When to send a batch:

* A batch goes out when it is full, or when its oldest request has waited
  ``batch_timeout``.
* The timeout is only spent when more requests are known to be coming. A lone request
  on an idle model (nothing else queued, the previous batch held one request) goes out at
  once. Otherwise, when the server says how many calls it holds that have not reached the
  batcher yet (``arriving``: on a gRPC server, the calls waiting in gRPC's own queue, see
  ``service.api``'s backlog estimator), the batch waits for those and no more: a busy server, whose
  callers' next calls are already queued in gRPC, fills big batches, and a server with a
  few callers does not wait for callers that do not exist. The count is the server's,
  not this model's: with several busy models, a batch may wait out the timeout for calls
  that go to another. Without ``arriving``, the batch waits for a full batch. Under load,
  batches also grow by themselves: whatever queues while the model is busy forms the next
  batch.

  Why it matters: on one core the per-batch work (the TensorFlow call, the wake-ups) takes
  the interpreter from the event loop that decodes requests, so larger batches are more
  requests per second (the numbers: bench/README.md, "What changed").

The queue is bounded: past ``max_queue`` waiting requests, ``submit`` refuses with
``QueueFull`` (RESOURCE_EXHAUSTED) carrying a retry hint, the time the queue needs to
drain. A request whose deadline has passed is dropped before compute (DeadlineExceeded).
Batches are padded to ``allowed_batch_sizes`` so the model only ever sees a few shapes.
A batch that fails fails every waiter with the same error. With a ``latency_target``, the
timeout is not fixed: ``service.inference.latency.LatencyTarget`` adapts it after every
batch from the latencies the batch's requests saw.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from service.errors import DeadlineExceeded, FitserveError, ResourceExhausted, Unavailable
from service.inference.latency import LatencyTarget
from service.inference.padding import run_padded

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]


class QueueFull(ResourceExhausted):
    """The version's queue is full; ``retry_after_seconds`` is when it should have room."""


class BatchFailed(Unavailable):
    """The model failed on a batch; every request of the batch gets this, and may retry."""


@dataclass(frozen=True)
class BatchPolicy:
    """The knobs of one batcher (see BatchingSettings for their meaning)."""

    max_batch_size: int = 64
    batch_timeout: float = 0.0
    max_queue: int = 1024
    allowed_batch_sizes: tuple[int, ...] = ()
    threads: int = 1
    latency_target: float | None = None  # seconds; adapts batch_timeout when set


@dataclass
class _Pending:
    inputs: Arrays
    rows: int
    future: asyncio.Future[Arrays]
    loop: asyncio.AbstractEventLoop
    deadline: float | None
    enqueued: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class BatchStats:
    """What one batch did, for metrics."""

    requests: int
    rows: int
    padded_rows: int
    queue_waits: list[float]
    compute_seconds: float
    batch_timeout: float = 0.0  # the timeout in force after this batch


class Batcher:
    """Runs ``run`` on batches formed from concurrent ``submit`` calls."""

    def __init__(
        self,
        run: Callable[[Arrays], Arrays],
        policy: BatchPolicy,
        *,
        on_batch: Callable[[BatchStats], None] = lambda _: None,
        on_reject: Callable[[str], None] = lambda _: None,
        label: str = "this model",
        arriving: Callable[[], int] | None = None,
    ) -> None:
        self._run, self._policy, self._label = run, policy, label
        self._arriving = arriving
        self._on_batch, self._on_reject = on_batch, on_reject
        self._queue: deque[_Pending] = deque()
        self._queued_rows = 0
        self._last_requests = 0
        self._filling = 0  # rows a thread waits to fill a batch with (0: none waits)
        self._batch_seconds = 0.0  # moving average, for the retry hint
        self._timeout = policy.batch_timeout
        self._controller = (
            LatencyTarget(policy.latency_target, policy.batch_timeout)
            if policy.latency_target
            else None
        )
        self._cond = threading.Condition()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._loop, name=f"batcher-{label}-{i}", daemon=True)
            for i in range(policy.threads)
        ]
        for thread in self._threads:
            thread.start()

    @property
    def depth(self) -> int:
        """Requests waiting for a batch."""
        return len(self._queue)

    async def submit(self, inputs: Arrays, rows: int, deadline: float | None = None) -> Arrays:
        """Queue one request and wait for its slice of the batch's outputs.

        ``deadline`` is a ``time.monotonic()`` instant; past it the request is dropped.
        """
        loop = asyncio.get_running_loop()
        pending = _Pending(inputs, rows, loop.create_future(), loop, deadline)
        with self._cond:
            self._admit(pending)
            self._queue.append(pending)
            self._queued_rows += rows
            if self._queued_rows >= self._filling:  # wake a batch thread only when it is due
                self._cond.notify()
        return await pending.future

    def close(self) -> None:
        """Finish the queued requests, then stop the threads."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join()

    def _admit(self, pending: _Pending) -> None:
        """Refuse a request the batcher cannot take (called holding the lock)."""
        if self._closed:
            self._on_reject("unloading")
            raise Unavailable(f"{self._label} is unloading; retry")
        if pending.deadline is not None and pending.enqueued >= pending.deadline:
            self._on_reject("deadline")
            raise DeadlineExceeded(f"the deadline passed before {self._label} could run it")
        if len(self._queue) >= self._policy.max_queue:
            self._on_reject("queue_full")
            retry = self._retry_after()
            raise QueueFull(
                f"{self._label}'s queue is full ({self._policy.max_queue} requests); "
                f"retry in {retry * 1000:.0f} ms with backoff",
                retry,
            )

    def _retry_after(self) -> float:
        """Roughly how long until the queue has drained: batches queued x batch time."""
        batches = self._queued_rows / self._policy.max_batch_size + 1
        seconds = batches * max(self._batch_seconds, 0.001) / self._policy.threads
        return min(max(seconds, 0.001), 5.0)

    def _loop(self) -> None:
        while batch := self._next_batch():
            self._execute(batch)

    def _next_batch(self) -> list[_Pending]:
        """The next batch to run; empty once closed and drained."""
        with self._cond:
            while True:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return []
                self._wait_to_fill()
                if batch := self._take():
                    self._last_requests = len(batch)
                    return batch

    def _wait_to_fill(self) -> None:
        """Hold the oldest request up to the timeout, when more are known to be coming."""
        if self._timeout <= 0 or (len(self._queue) <= 1 and self._last_requests <= 1):
            return  # a lone request on an idle model goes out at once
        fill = self._policy.max_batch_size
        if self._queued_rows >= fill:
            return
        if self._arriving is not None:
            # Calls the server holds that have not reached the batcher yet: wait for them
            # (up to the timeout), and for nothing more. Read without the lock, so
            # requests keep queueing meanwhile (those are in ``arriving`` already).
            rows = self._queued_rows
            self._cond.release()
            try:
                arriving = self._read_arriving()
            finally:
                self._cond.acquire()
            if not self._queue or self._closed:
                return
            fill = min(fill, rows + arriving)
        until = self._queue[0].enqueued + self._timeout
        self._filling = fill  # submit wakes this thread once the batch has filled
        try:
            while self._queue and not self._closed and self._queued_rows < fill:
                left = until - time.monotonic()
                if left <= 0:
                    return
                self._cond.wait(left)
        finally:
            self._filling = 0

    def _read_arriving(self) -> int:
        """``arriving()``; a failing reader is dropped (logged once), never the thread."""
        reader = self._arriving
        if reader is None:
            return 0
        try:
            return reader()
        except Exception as exc:
            self._arriving = None
            log.warning(
                "%s: cannot read the calls arriving (%s); batches wait for a full batch "
                "or the timeout from now on",
                self._label,
                exc,
            )
            return 0

    def _take(self) -> list[_Pending]:
        """Pop up to a full batch, failing requests whose deadline has passed."""
        batch: list[_Pending] = []
        rows, now = 0, time.monotonic()
        while self._queue and (
            not batch or rows + self._queue[0].rows <= self._policy.max_batch_size
        ):
            item = self._queue.popleft()
            self._queued_rows -= item.rows
            if item.deadline is not None and now >= item.deadline:
                self._on_reject("deadline")
                error = DeadlineExceeded(
                    f"the deadline passed while the request waited for {self._label}"
                )
                _deliver([item], error=error)
                continue
            batch.append(item)
            rows += item.rows
        return batch

    def _execute(self, batch: list[_Pending]) -> None:
        started = time.monotonic()
        rows = [p.rows for p in batch]
        padded = 0
        try:
            outputs, padded = run_padded(
                self._run, _concat([p.inputs for p in batch]), self._policy.allowed_batch_sizes
            )
            parts = _split(outputs, rows, self._label)
        except Exception as exc:
            _deliver(batch, error=self._batch_error(exc, len(batch), sum(rows)))
        else:
            _deliver(batch, results=parts)
        done = time.monotonic()
        self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * (done - started)
        waits = [started - p.enqueued for p in batch]
        if self._controller is not None:
            with self._cond:
                self._timeout = self._controller.observe(done - p.enqueued for p in batch)
        stats = BatchStats(len(batch), sum(rows), padded, waits, done - started, self._timeout)
        self._on_batch(stats)

    def _batch_error(self, exc: Exception, requests: int, rows: int) -> Exception:
        if isinstance(exc, FitserveError):
            return exc
        log.error("%s failed on a batch", self._label, exc_info=exc)
        return BatchFailed(
            f"{self._label} failed on a batch of {requests} requests ({rows} rows): "
            f"{type(exc).__name__}; every request of the batch failed, retry"
        )


def _concat(inputs: list[Arrays]) -> Arrays:
    if len(inputs) == 1:
        return inputs[0]
    return {k: np.concatenate([i[k] for i in inputs]) for k in inputs[0]}


def _split(outputs: Arrays, rows: list[int], label: str) -> list[Arrays]:
    total = sum(rows)
    for name, value in outputs.items():
        if value.shape[:1] != (total,):
            raise BatchFailed(
                f"{label} returned output {name!r} with {value.shape[0] if value.ndim else 0} "
                f"rows for {total} input rows"
            )
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
        if not loop.is_closed():
            loop.call_soon_threadsafe(_resolve, items, error)


def _resolve(items: list[tuple[_Pending, Arrays | None]], error: Exception | None) -> None:
    for pending, result in items:
        if pending.future.done():
            continue
        if error is not None:
            pending.future.set_exception(error)
        else:
            pending.future.set_result(result or {})
