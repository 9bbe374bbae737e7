"""A Keras-like progress bar drawn from a job's events, for `Job.wait(verbose=...)`.

The look is Keras 3's `model.fit` (keras/src/utils/progbar.py): an `Epoch 3/10` line per
epoch, then with verbose=1 a bar redrawn in place on a terminal,

    12/12 ━━━━━━━━━━━━━━━━━━━━ 2s 10ms/step - accuracy: 0.9100 - loss: 0.2700 - val_loss: ...

(batch by batch when the job streams batch progress, `callbacks={"batch_progress": True}`;
else once per epoch), and with verbose=2 one line per epoch,

    12/12 - 2s - 10ms/step - accuracy: 0.9100 - loss: 0.2700 - val_loss: ...

The worker's logs are running averages already, so they are shown as they come.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Mapping
from typing import Literal, TextIO, TypeAlias

from fitserve.v1 import training_pb2

__all__ = ["ProgressBar", "Verbose", "resolve_verbose"]

Verbose: TypeAlias = Literal["auto", 0, 1, 2]
_WIDTH = 20  # the bar's width in characters, as Keras's


def resolve_verbose(verbose: Verbose | int | str, stream: TextIO) -> int:
    """0, 1 or 2: "auto" is 1 on a terminal and 0 otherwise (a pipe, a file, a log);
    anything else raises ValueError naming what is accepted."""
    if verbose == "auto":
        isatty = getattr(stream, "isatty", None)
        return 1 if callable(isatty) and isatty() else 0
    if isinstance(verbose, bool) or verbose not in (0, 1, 2):
        raise ValueError(f'verbose must be "auto", 0, 1 or 2 (as Keras\'s fit), not {verbose!r}')
    return int(verbose)


def total_epochs(request_json: str) -> int:
    """Epochs the job will run (fit.epochs, plus a fine-tune's unfreeze_epochs), from its
    stored request; 0 when the record does not say (a list view, an evaluation)."""
    try:
        request = json.loads(request_json) if request_json else {}
    except ValueError:
        return 0
    if not isinstance(request, dict):
        return 0
    fit, freeze = request.get("fit"), request.get("freeze")
    epochs = fit.get("epochs", 0) if isinstance(fit, dict) else 0
    extra = freeze.get("unfreeze_epochs", 0) if isinstance(freeze, dict) else 0
    return int(epochs or 0) + int(extra or 0) if isinstance(epochs, int) else 0


def format_logs(logs: Mapping[str, float]) -> str:
    """` - name: value` per metric, sorted by name, numbers as Keras prints them."""
    return "".join(f" - {name}: {_number(value)}" for name, value in sorted(logs.items()))


def format_step_time(seconds: float) -> str:
    """Keras's time per step: `2s/step`, `10ms/step` or `800us/step`."""
    if seconds >= 1 or seconds == 0:
        return f"{seconds:.0f}s/step"
    if seconds >= 1e-3:
        return f"{seconds * 1000:.0f}ms/step"
    return f"{seconds * 1e6:.0f}us/step"


def _number(value: float) -> str:
    if math.isnan(value) or math.isinf(value):
        return str(value)
    return f"{value:.4f}" if abs(value) > 1e-3 else f"{value:.4e}"


class ProgressBar:
    """Draws a job's `epoch_ended` and `batch_progress` events on `stream`, as Keras's
    `model.fit(verbose=...)` would on the worker; other events are ignored."""

    def __init__(
        self,
        verbose: int,
        *,
        epochs: int = 0,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._verbose = verbose
        self._epochs = epochs
        self._stream = stream if stream is not None else sys.stdout
        self._clock = clock
        isatty = getattr(self._stream, "isatty", None)
        self._dynamic = bool(callable(isatty) and isatty())
        self._epoch = 0  # the epoch whose header is printed
        self._started = clock()
        # Epochs are timed by the events' own times (the worker's clock) when they carry
        # them: events can arrive in bursts, so the local clock would time the burst.
        self._boundary: float | None = None  # when the last epoch ended (or the job ran)
        self._epoch_start: float | None = None  # when this epoch began, by event times
        self._stamp: float | None = None  # the time of the event being drawn
        self._batches = 0  # batches per epoch, once a batch event said so
        self._open_line = False  # a bar drawn in place, not ended with a newline yet
        self._width = 0

    def update(self, event: training_pb2.JobEvent) -> None:
        """Draw one event of the job."""
        if self._verbose == 0:
            return
        kind = event.WhichOneof("payload")
        self._stamp = event.time.ToNanoseconds() / 1e9 if event.HasField("time") else None
        if kind == "state_changed" and self._stamp is not None:
            self._boundary = self._stamp  # e.g. RUNNING: the first epoch starts about now
        if kind == "batch_progress":
            batch = event.batch_progress
            self._begin(batch.epoch)
            if batch.batches:
                self._batches = int(batch.batches)
            if self._verbose == 1:
                self._draw(int(batch.batch), dict(batch.logs), final=False)
        elif kind == "epoch_ended":
            ended = event.epoch_ended
            if ended.epochs:
                self._epochs = ended.epochs
            self._begin(ended.epoch)
            steps = self._batches or 1
            self._draw(steps, dict(ended.logs), final=True)
            self._boundary = self._stamp

    def close(self) -> None:
        """End a bar left open (the job stopped mid-epoch)."""
        if self._open_line:
            self._write("\n")
            self._open_line = False

    def _begin(self, epoch: int) -> None:
        if epoch <= self._epoch:
            return
        self.close()
        self._epoch = epoch
        self._started = self._clock()
        self._epoch_start = self._boundary if self._boundary is not None else self._stamp
        total = self._epochs if self._epochs >= epoch else "?"
        self._write(f"Epoch {epoch}/{total}\n")

    def _draw(self, current: int, logs: Mapping[str, float], *, final: bool) -> None:
        target = self._batches or (current if final else 0)
        if self._stamp is not None and self._epoch_start is not None:
            elapsed = max(self._stamp - self._epoch_start, 0.0)
        else:
            elapsed = self._clock() - self._started
        per_step = elapsed / current if current else 0.0
        if self._verbose == 2:
            if final:
                count = f"{current:{len(str(target))}d}/{target}"
                line = f"{count} - {elapsed:.0f}s - {format_step_time(per_step)}"
                self._write(line + format_logs(logs) + "\n")
            return
        if target:
            count = f"{current:{len(str(target))}d}/{target}"
            done = min(_WIDTH, int(_WIDTH * current / target))
            plain_bar = "━" * _WIDTH
            bar = f"{self._style(1, count)} {self._style(32, plain_bar[:done])}"
            bar += self._style(37, plain_bar[done:])
            visible = len(count) + 1 + _WIDTH
        else:
            bar = f"{current:7d}/Unknown"
            visible = len(bar)
        if final or not target:
            timing = f"{elapsed:.0f}s"
        else:
            eta = per_step * (target - current)
            timing = f"{eta:.0f}s" if eta < 60 else f"{eta // 60:.0f}:{eta % 60:02.0f}"
        info = f" {timing} {format_step_time(per_step)}{format_logs(logs)}"
        visible += len(info)
        info = f" {self._style(1, timing)} {format_step_time(per_step)}{format_logs(logs)}"
        text = bar + info
        if self._dynamic:
            pad = " " * max(0, self._width - visible)
            self._write("\r" + text + pad + ("\n" if final else ""))
            self._open_line = not final
        elif final:  # not a terminal: no redrawing, only the epoch's last line
            self._write(text + "\n")
        self._width = 0 if final else visible

    def _style(self, code: int, text: str) -> str:
        """``text`` in Keras's bar style (bold, green, grey) on a terminal; plain in a
        pipe or a file, which has no use for escape codes."""
        return f"\x1b[{code}m{text}\x1b[0m" if self._dynamic else text

    def _write(self, text: str) -> None:
        self._stream.write(text)
        self._stream.flush()
