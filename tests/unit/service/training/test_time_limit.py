"""The TimeLimit callback on real Keras fits and evaluations (no batch hooks: a timer)."""

import threading
import time

import keras
import numpy as np
import pytest

from service.training.callbacks import TimeLimit, TimeLimitReached

X = np.random.default_rng(0).random((64, 4), dtype=np.float32)
Y = (X[:, 0] > 0.5).astype(np.int64)


class SlowEpochs(keras.callbacks.Callback):  # type: ignore[misc]
    """Counts epochs and makes each one take ``seconds`` (at its end, not per batch)."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds, self.epochs = seconds, 0

    def on_epoch_end(self, epoch, logs=None):
        self.epochs += 1
        time.sleep(self.seconds)


class Batches(keras.callbacks.Callback):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.train, self.test = 0, 0

    def on_train_batch_end(self, batch, logs=None):
        self.train += 1

    def on_test_batch_end(self, batch, logs=None):
        self.test += 1


def model() -> keras.Model:
    m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, activation="softmax")])
    m.compile(loss="sparse_categorical_crossentropy")
    return m


def test_a_fit_stops_soon_after_its_limit_and_the_check_names_it():
    limit, slow = TimeLimit(0.5, time.time()), SlowEpochs(0.2)

    model().fit(X, Y, epochs=1000, batch_size=8, verbose=0, callbacks=[limit, slow])

    assert limit.reached
    assert 1 <= slow.epochs <= 6
    with pytest.raises(TimeLimitReached) as failed:
        limit.check(1000)
    assert failed.value.reason == "TIME_LIMIT"
    assert failed.value.code == "DEADLINE_EXCEEDED"
    assert "time limit of 0.5 s" in failed.value.message
    assert f"in epoch {limit.epoch} of 1000" in failed.value.message
    assert not [t for t in threading.enumerate() if t.name == "time-limit"]  # disarmed


def test_a_fit_that_begins_past_its_deadline_runs_one_batch():
    limit, batches = TimeLimit(1, time.time() - 5), Batches()

    model().fit(X, Y, epochs=50, batch_size=8, verbose=0, callbacks=[limit, batches])

    assert limit.reached
    assert batches.train == 1


def test_a_second_fit_after_the_limit_stops_at_once_too():
    limit, batches, m = TimeLimit(1, time.time() - 5), Batches(), model()
    m.fit(X, Y, epochs=2, batch_size=8, verbose=0, callbacks=[limit])

    m.fit(X, Y, epochs=50, batch_size=8, verbose=0, callbacks=[limit, batches])

    assert batches.train == 1


def test_an_evaluation_past_its_deadline_stops_and_fails_the_check():
    limit, batches = TimeLimit(2, time.time() - 5), Batches()

    model().evaluate(X, Y, batch_size=8, verbose=0, callbacks=[limit, batches])

    assert batches.test == 1
    with pytest.raises(TimeLimitReached, match="stopped while evaluating"):
        limit.check()


def test_a_job_within_its_limit_is_left_alone():
    limit, slow = TimeLimit(600, time.time()), SlowEpochs(0)
    m = model()

    m.fit(X, Y, epochs=3, batch_size=8, verbose=0, validation_split=0.25, callbacks=[limit, slow])
    m.evaluate(X, Y, verbose=0, callbacks=[limit])

    assert (limit.reached, slow.epochs) == (False, 3)
    limit.check(3)  # nothing raised
    assert not [t for t in threading.enumerate() if t.name == "time-limit"]
