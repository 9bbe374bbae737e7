"""Supervision with real child processes: a dead child is reported by name, a stop signal
ends the watch, and terminate escalates to SIGKILL after its deadline."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from service.launch.supervision import spawn, supervise, terminate
from tests.conftest import ROOT

SLEEP = "import time; time.sleep(120)"
IGNORE_TERM = (
    "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "print('ready', flush=True); time.sleep(120)"
)


def _python(code: str) -> subprocess.Popen[bytes]:
    return spawn([sys.executable, "-c", code])


def test_a_child_that_exits_brings_the_supervisor_down_naming_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    sleeper, quitter = _python(SLEEP), _python("raise SystemExit(3)")
    try:
        code = supervise([("sleeper", sleeper), ("quitter", quitter)], lambda: False, "test", "all")
    finally:
        terminate([sleeper, quitter])

    assert code == 1
    out = capsys.readouterr()
    assert out.err == "test: quitter exited with code 3; stopping all\n"
    assert sleeper.returncode == -signal.SIGTERM  # terminate stopped the other one


def test_the_stop_flag_ends_supervision_with_exit_0(capsys: pytest.CaptureFixture[str]) -> None:
    sleeper = _python(SLEEP)
    try:
        code = supervise([("sleeper", sleeper)], lambda: True, "test", "all")
    finally:
        terminate([sleeper])

    assert code == 0
    assert capsys.readouterr().out == "test: stopping\n"


def test_sigint_raises_the_stop_flag_of_a_supervisor_process() -> None:
    code = (
        "import time; from service.launch.supervision import stop_flag\n"
        "stopping = stop_flag(); print('ready', flush=True)\n"
        "deadline = time.monotonic() + 60\n"
        "while not stopping() and time.monotonic() < deadline: time.sleep(0.01)\n"
        "raise SystemExit(0 if stopping() else 5)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    try:
        assert proc.stdout.readline() == b"ready\n"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        proc.stdout.close()
        terminate([proc])


def test_terminate_kills_a_child_that_ignores_sigterm_after_the_deadline() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", IGNORE_TERM], stdout=subprocess.PIPE, start_new_session=True
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"ready\n"  # its handler is in place
    started = time.monotonic()
    terminate([proc], timeout=0.5)
    proc.stdout.close()

    assert proc.returncode == -signal.SIGKILL
    assert time.monotonic() - started >= 0.5


def test_terminate_leaves_exited_children_alone() -> None:
    proc = _python("raise SystemExit(4)")
    proc.wait(30)
    terminate([proc], timeout=0.5)
    assert proc.returncode == 4
