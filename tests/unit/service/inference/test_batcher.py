import asyncio
import threading
import time

import numpy as np
import pytest

from service.errors import DeadlineExceeded, ResourceExhausted, Unavailable
from service.inference.batcher import Batcher, BatchFailed, BatchPolicy, BatchStats, QueueFull

TIMEOUT = 10  # seconds; a bound for waits that should return at once


class Model:
    """A run function that records each batch; doubles its input as output 'y'."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.batches: list[np.ndarray] = []
        self.started = threading.Event()
        self.gate = gate

    def __call__(self, inputs):
        self.batches.append(inputs["x"].copy())
        self.started.set()
        if self.gate is not None:
            assert self.gate.wait(TIMEOUT)
        return {"y": inputs["x"] * 2, "first": inputs["x"][:, :1]}

    @property
    def sizes(self) -> list[int]:
        return [len(b) for b in self.batches]


def rows(value: int, n: int = 1) -> dict[str, np.ndarray]:
    return {"x": np.full((n, 3), value, dtype=np.float32)}


async def started(model: Model) -> None:
    assert await asyncio.to_thread(model.started.wait, TIMEOUT)


@pytest.fixture
def closing():
    made: list[Batcher] = []

    def make(run, **kwargs) -> Batcher:
        hooks = {k: kwargs.pop(k) for k in ("on_batch", "on_reject", "arriving") if k in kwargs}
        policy = BatchPolicy(**{"max_batch_size": 64, "max_queue": 100, **kwargs})
        made.append(Batcher(run, policy, label="model 'm' version 1", **hooks))
        return made[-1]

    yield make
    for batcher in made:
        batcher.close()


def test_concurrent_requests_are_batched_and_each_gets_its_own_rows(closing):
    gate = threading.Event()
    model = Model(gate=gate)
    batcher = closing(model)

    async def main():
        first = asyncio.create_task(batcher.submit(rows(0), 1))
        await started(model)  # request 0 is running, held at the gate
        rest = asyncio.gather(*(batcher.submit(rows(i), 1) for i in range(1, 50)))
        await asyncio.sleep(0)  # let the other 49 enqueue while the model is busy
        assert batcher.depth == 49
        gate.set()
        return await asyncio.wait_for(asyncio.gather(first, rest), TIMEOUT)

    first, rest = asyncio.run(main())

    assert model.sizes == [1, 49]
    for i, out in enumerate([first, *rest]):
        np.testing.assert_array_equal(out["y"], np.full((1, 3), 2 * i, np.float32))
        np.testing.assert_array_equal(out["first"], [[i]])


def test_requests_with_several_rows_get_their_slices(closing):
    gate = threading.Event()
    model = Model(gate=gate)
    batcher = closing(model)
    sizes = [1, 3, 2, 5]

    async def main():
        tasks = [asyncio.create_task(batcher.submit(rows(i, n), n)) for i, n in enumerate(sizes)]
        await asyncio.sleep(0)
        gate.set()
        return await asyncio.wait_for(asyncio.gather(*tasks), TIMEOUT)

    results = asyncio.run(main())

    for i, (n, out) in enumerate(zip(sizes, results, strict=True)):
        np.testing.assert_array_equal(out["y"], np.full((n, 3), 2 * i, np.float32))


def test_a_lone_request_goes_out_as_a_batch_of_one():
    model = Model()
    stats: list[BatchStats] = []
    batcher = Batcher(model, BatchPolicy(max_batch_size=64, max_queue=10), on_batch=stats.append)

    out = asyncio.run(batcher.submit(rows(7), 1))
    batcher.close()  # on_batch runs after delivery; closing waits for it

    np.testing.assert_array_equal(out["y"], np.full((1, 3), 14, np.float32))
    assert model.sizes == [1]
    assert [(s.requests, s.rows, len(s.queue_waits)) for s in stats] == [(1, 1, 1)]
    assert stats[0].compute_seconds >= 0


def test_batches_never_exceed_max_batch_size(closing):
    gate = threading.Event()
    model = Model(gate=gate)
    batcher = closing(model, max_batch_size=8)

    async def main():
        tasks = [asyncio.create_task(batcher.submit(rows(0, 3), 3))]
        await started(model)
        tasks += [asyncio.create_task(batcher.submit(rows(i, 3), 3)) for i in range(1, 10)]
        await asyncio.sleep(0)
        gate.set()
        return await asyncio.wait_for(asyncio.gather(*tasks), TIMEOUT)

    results = asyncio.run(main())

    assert model.sizes == [3, 6, 6, 6, 6, 3]  # two requests of 3 rows fit in 8, three do not
    for i, out in enumerate(results):
        np.testing.assert_array_equal(out["y"], np.full((3, 3), 2 * i, np.float32))


def test_a_request_larger_than_max_batch_size_goes_out_alone(closing):
    model = Model()
    batcher = closing(model, max_batch_size=4)

    out = asyncio.run(batcher.submit(rows(1, 6), 6))

    assert out["y"].shape == (6, 3)
    assert model.sizes == [6]


def test_a_full_queue_refuses_with_resource_exhausted(closing):
    gate = threading.Event()
    model = Model(gate=gate)
    batcher = closing(model, max_queue=3)

    async def main():
        running = asyncio.create_task(batcher.submit(rows(0), 1))
        await started(model)  # the batcher thread is inside run, holding request 0
        queued = [asyncio.create_task(batcher.submit(rows(i), 1)) for i in (1, 2, 3)]
        await asyncio.sleep(0)
        assert batcher.depth == 3
        with pytest.raises(ResourceExhausted, match=r"queue is full \(3 requests\)"):
            await batcher.submit(rows(4), 1)
        gate.set()
        return await asyncio.wait_for(asyncio.gather(running, *queued), TIMEOUT)

    results = asyncio.run(main())

    assert [int(r["first"][0, 0]) for r in results] == [0, 1, 2, 3]
    assert 4 not in np.concatenate(model.batches)


def test_a_failing_run_fails_every_waiter_and_the_batcher_keeps_serving(closing):
    gate, failing = threading.Event(), threading.Event()
    failing.set()
    error = ValueError("model exploded")
    model = Model(gate=gate)

    def run(inputs):
        outputs = model(inputs)
        if failing.is_set():
            raise error
        return outputs

    batcher = closing(run)

    async def main():
        first = asyncio.create_task(batcher.submit(rows(0), 1))
        await started(model)
        rest = [asyncio.create_task(batcher.submit(rows(i), 1)) for i in range(1, 5)]
        await asyncio.sleep(0)
        assert batcher.depth == 4
        gate.set()
        failed = await asyncio.wait_for(
            asyncio.gather(first, *rest, return_exceptions=True), TIMEOUT
        )
        failing.clear()
        after = await asyncio.wait_for(batcher.submit(rows(9), 1), TIMEOUT)
        return failed, after

    failed, after = asyncio.run(main())

    assert model.sizes == [1, 4, 1]
    assert all(isinstance(f, BatchFailed) for f in failed)
    assert all(f is failed[1] for f in failed[1:])  # one error, the same for every waiter
    assert "failed on a batch of 4 requests (4 rows): ValueError" in str(failed[1])
    assert "exploded" not in str(failed[1])  # the model's own message stays in the log
    np.testing.assert_array_equal(after["y"], np.full((1, 3), 18, np.float32))


def test_an_output_with_the_wrong_number_of_rows_fails_the_batch(closing):
    batcher = closing(lambda inputs: {"y": np.zeros((len(inputs["x"]) + 1, 2))})

    async def main():
        with pytest.raises(BatchFailed, match=r"output 'y' with 3 rows for 2 input rows"):
            await asyncio.wait_for(batcher.submit(rows(1, 2), 2), TIMEOUT)

    asyncio.run(main())


def test_close_finishes_queued_work_then_refuses():
    gate = threading.Event()
    model = Model(gate=gate)
    batcher = Batcher(model, BatchPolicy(max_batch_size=2, max_queue=100))

    async def main():
        tasks = [asyncio.create_task(batcher.submit(rows(i), 1)) for i in range(7)]
        await started(model)
        gate.set()
        batcher.close()  # blocks until the thread has run every queued request
        assert sum(model.sizes) == 7
        with pytest.raises(Unavailable, match="unloading"):
            await batcher.submit(rows(8), 1)
        return await asyncio.wait_for(asyncio.gather(*tasks), TIMEOUT)

    results = asyncio.run(main())

    assert [int(r["first"][0, 0]) for r in results] == list(range(7))
    assert max(model.sizes) <= 2


# ---- batch timeout, deadlines, retry hint, threads, padding ------------------------------


def test_a_lone_request_never_waits_for_the_batch_timeout(closing):
    model = Model()
    batcher = closing(model, batch_timeout=3600.0)  # waiting at all would hang the test

    async def main():
        for i in range(3):
            await asyncio.wait_for(batcher.submit(rows(i), 1), TIMEOUT)

    asyncio.run(main())

    assert model.sizes == [1, 1, 1]


def test_under_load_a_batch_waits_to_fill_and_goes_out_when_full(closing):
    gate = threading.Event()
    model = Model(gate=gate)
    batcher = closing(model, max_batch_size=4, batch_timeout=3600.0)

    async def main():
        first = asyncio.create_task(batcher.submit(rows(0), 1))
        await started(model)
        queued = [asyncio.create_task(batcher.submit(rows(i), 1)) for i in (1, 2)]
        await asyncio.sleep(0)
        gate.set()  # two are queued, so more are coming: the batcher holds them for more
        late = [asyncio.create_task(batcher.submit(rows(i), 1)) for i in (3, 4)]
        return await asyncio.wait_for(asyncio.gather(first, *queued, *late), TIMEOUT)

    results = asyncio.run(main())

    assert model.sizes == [1, 4]  # without the timeout: [1, 2, 2]
    assert [int(r["first"][0, 0]) for r in results] == [0, 1, 2, 3, 4]


def test_told_what_is_arriving_a_batch_waits_for_those_requests_and_no_more(closing):
    gate, asked = threading.Event(), threading.Event()

    def arriving() -> int:  # what the server reports as held, not yet at the batcher
        asked.set()
        return 2

    model = Model(gate=gate)
    batcher = closing(model, batch_timeout=3600.0, arriving=arriving)

    async def main():
        first = asyncio.create_task(batcher.submit(rows(0), 1))
        await started(model)
        queued = [asyncio.create_task(batcher.submit(rows(i), 1)) for i in (1, 2)]
        await asyncio.sleep(0)
        gate.set()  # the next batch: 2 queued + 2 arriving; it waits for exactly those
        assert await asyncio.to_thread(asked.wait, TIMEOUT)
        assert model.sizes == [1]  # still waiting: the two have not come yet
        late = [asyncio.create_task(batcher.submit(rows(i), 1)) for i in (3, 4)]
        return await asyncio.wait_for(asyncio.gather(first, *queued, *late), TIMEOUT)

    asyncio.run(main())

    assert model.sizes == [1, 4]  # not held for the full batch of 64 or the hour


def test_a_failing_arriving_reader_is_dropped_and_the_batches_still_go_out(closing):
    gate = threading.Event()
    model = Model(gate=gate)

    def arriving() -> int:
        raise ValueError("Failed to get the server")  # channelz after the server stopped

    batcher = closing(model, batch_timeout=0.05, arriving=arriving)

    async def main():
        first = asyncio.create_task(batcher.submit(rows(0), 1))
        await started(model)
        queued = [asyncio.create_task(batcher.submit(rows(i), 1)) for i in (1, 2)]
        await asyncio.sleep(0)
        gate.set()
        return await asyncio.wait_for(asyncio.gather(first, *queued), TIMEOUT)

    results = asyncio.run(main())

    assert [int(r["first"][0, 0]) for r in results] == [0, 1, 2]
    assert model.sizes == [1, 2]  # the batch waited the 50 ms timeout, then went out


def test_told_nothing_is_arriving_a_batch_goes_out_without_waiting(closing):
    gate = threading.Event()
    model = Model(gate=gate)
    batcher = closing(model, batch_timeout=3600.0, arriving=lambda: 0)

    async def main():
        first = asyncio.create_task(batcher.submit(rows(0), 1))
        await started(model)
        queued = [asyncio.create_task(batcher.submit(rows(i), 1)) for i in (1, 2)]
        await asyncio.sleep(0)
        gate.set()  # two queued, none arriving: no wait (an hour would hang the test)
        return await asyncio.wait_for(asyncio.gather(first, *queued), TIMEOUT)

    asyncio.run(main())

    assert model.sizes == [1, 2]


def test_a_request_past_its_deadline_is_refused_before_queueing(closing):
    model, reasons = Model(), []
    batcher = closing(model, on_reject=reasons.append)

    async def main():
        with pytest.raises(DeadlineExceeded, match="deadline passed"):
            await batcher.submit(rows(1), 1, deadline=time.monotonic())

    asyncio.run(main())

    assert model.sizes == []
    assert reasons == ["deadline"]


def test_a_request_whose_deadline_passes_in_the_queue_is_dropped_before_compute(closing):
    gate = threading.Event()
    model, reasons = Model(gate=gate), []
    batcher = closing(model, on_reject=reasons.append)

    async def main():
        first = asyncio.create_task(batcher.submit(rows(0), 1))
        await started(model)
        deadline = time.monotonic() + 0.01
        late = asyncio.create_task(batcher.submit(rows(1), 1, deadline=deadline))
        kept = asyncio.create_task(batcher.submit(rows(2), 1, deadline=deadline + 3600))
        await asyncio.sleep(0.02)  # the request's deadline passes while it is queued
        assert time.monotonic() > deadline
        gate.set()
        with pytest.raises(DeadlineExceeded, match="waited for model 'm' version 1"):
            await asyncio.wait_for(late, TIMEOUT)
        return await asyncio.wait_for(asyncio.gather(first, kept), TIMEOUT)

    asyncio.run(main())

    assert model.sizes == [1, 1]
    assert 1 not in np.concatenate(model.batches)
    assert reasons == ["deadline"]


def test_a_full_queue_says_when_to_retry(closing):
    gate = threading.Event()
    model, reasons = Model(gate=gate), []
    batcher = closing(model, max_queue=1, on_reject=reasons.append)

    async def main():
        running = asyncio.create_task(batcher.submit(rows(0), 1))
        await started(model)
        queued = asyncio.create_task(batcher.submit(rows(1), 1))
        await asyncio.sleep(0)
        with pytest.raises(QueueFull, match=r"retry in \d+ ms") as refused:
            await batcher.submit(rows(2), 1)
        gate.set()
        await asyncio.wait_for(asyncio.gather(running, queued), TIMEOUT)
        return refused.value

    refused = asyncio.run(main())

    assert isinstance(refused, ResourceExhausted)
    assert 0 < refused.retry_after_seconds <= 5
    assert reasons == ["queue_full"]


def test_several_batch_threads_run_batches_in_parallel(closing):
    both = threading.Barrier(2, timeout=TIMEOUT)  # breaks unless two batches run at once
    run = lambda inputs: (both.wait(), {"y": inputs["x"]})[1]  # noqa: E731
    batcher = closing(run, max_batch_size=1, threads=2)

    async def main():
        return await asyncio.wait_for(
            asyncio.gather(batcher.submit(rows(1), 1), batcher.submit(rows(2), 1)), TIMEOUT
        )

    first, second = asyncio.run(main())

    assert (first["y"][0, 0], second["y"][0, 0]) == (1, 2)


def test_batches_are_padded_to_allowed_sizes_and_outputs_cut_back(closing):
    model, stats = Model(), []
    batcher = closing(model, max_batch_size=8, allowed_batch_sizes=(2, 4, 8), on_batch=stats.append)

    async def main():
        small = await batcher.submit(rows(3, 3), 3)
        large = await batcher.submit(rows(5, 11), 11)
        return small, large

    small, large = asyncio.run(main())
    batcher.close()  # on_batch runs after delivery; closing waits for it

    assert model.sizes == [4, 8, 4]  # 3 -> 4; 11 -> chunks of 8 and 3 -> 4
    np.testing.assert_array_equal(small["y"], np.full((3, 3), 6, np.float32))
    np.testing.assert_array_equal(large["y"], np.full((11, 3), 10, np.float32))
    assert [(s.rows, s.padded_rows) for s in stats] == [(3, 1), (11, 1)]
