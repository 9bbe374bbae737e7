"""Plugins for the infrastructure-fault tests (loaded through FITSERVE_PLUGINS by the
private stacks of tests/integration/test_watch_outages.py and test_disk_full.py): a
callback that makes each epoch last a while, so a job outlives an outage, and one that
holds the job where its fit has ended and its export begins, until the test says go."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import keras


class SlowEpochs(keras.callbacks.Callback):  # type: ignore[misc]
    """Sleeps ``seconds`` at the end of every epoch."""

    def __init__(self, seconds: float = 0.5) -> None:
        super().__init__()
        self.seconds = seconds

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        time.sleep(self.seconds)


class PauseBeforeExport(keras.callbacks.Callback):  # type: ignore[misc]
    """At the end of the fit (the export comes next), writes this process's id to
    ``<folder>/paused`` and waits (at most ``seconds``) until ``<folder>/go`` exists, so a
    test can change the world (fill the disk) at exactly that point."""

    def __init__(self, folder: str, seconds: float = 120.0) -> None:
        super().__init__()
        self.folder, self.seconds = Path(folder), seconds

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        (self.folder / "paused").write_text(str(os.getpid()))
        until = time.monotonic() + self.seconds
        while not (self.folder / "go").exists() and time.monotonic() < until:
            time.sleep(0.05)  # a test's signal between processes: a file it creates


FITSERVE_PLUGIN = {"package": "outages", "callbacks": [SlowEpochs, PauseBeforeExport]}
