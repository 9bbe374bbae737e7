"""The ready-file handshake with real child processes: the report arrives whole, a child
that exits first fails the wait at once, and a silent one fails it at the deadline."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from service.launch.ready import Ready, read_ready, wait_ready, write_ready
from service.launch.supervision import ChildExited, Interrupted, spawn, terminate
from tests.conftest import ROOT

REPORT = (
    "import os, sys; from pathlib import Path; from service.launch.ready import write_ready\n"
    "write_ready(Path(sys.argv[1]), 4321, 9999)\n"
    "sys.stdin.read()\n"  # stays up until its parent closes stdin
)


def test_a_child_s_report_reaches_its_parent(tmp_path: Path) -> None:
    path = tmp_path / "ready.json"
    argv = [sys.executable, "-c", REPORT, str(path)]
    proc = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.PIPE)
    try:
        (ready,) = wait_ready([path], [("child", proc)], timeout=60)
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(30)

    assert ready == Ready(port=4321, metrics_port=9999, pid=proc.pid)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ready.json"]  # no partial file left


def test_a_report_is_written_whole_under_its_name(tmp_path: Path) -> None:
    write_ready(tmp_path / "ready.json", 1, None)
    write_ready(tmp_path / "ready.json", 2, None)  # replaced, never appended to

    assert read_ready(tmp_path / "ready.json").port == 2
    assert read_ready(tmp_path / "ready.json").metrics_port is None


def test_a_child_that_exits_before_reporting_fails_the_wait_at_once(tmp_path: Path) -> None:
    proc = spawn([sys.executable, "-c", "raise SystemExit(7)"])
    started = time.monotonic()
    with pytest.raises(ChildExited, match=r"^server exited with code 7$") as exc:
        wait_ready([tmp_path / "ready.json"], [("server", proc)], timeout=60)

    assert exc.value.name == "server"
    assert time.monotonic() - started < 30  # noticed, not waited out


def test_a_child_that_never_reports_fails_the_wait_at_the_deadline(tmp_path: Path) -> None:
    proc = spawn([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        with pytest.raises(TimeoutError, match=r"no ready report in .*ready\.json within 0\.3 s"):
            wait_ready([tmp_path / "ready.json"], [("server", proc)], timeout=0.3)
        assert proc.poll() is None  # the caller decides what to do with it
    finally:
        terminate([proc])


def test_a_stop_signal_interrupts_the_wait(tmp_path: Path) -> None:
    proc = spawn([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        with pytest.raises(Interrupted):
            wait_ready([tmp_path / "ready.json"], [("server", proc)], 60, lambda: True)
    finally:
        terminate([proc])
