"""The shutdown settings (FITSERVE_SHUTDOWN__*): defaults, the fallback to
FITSERVE_GRACE_SECONDS, refusals naming the variable, and the SIGKILL deadline of
``serve --processes N`` that follows from them."""

from __future__ import annotations

import pytest

from service import main
from service.config import Settings, ShutdownSettings
from service.launch.serving import stop_timeout
from service.launch.supervision import STOP_TIMEOUT


def test_a_server_drains_a_few_seconds_and_falls_back_to_the_old_grace_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FITSERVE_GRACE_SECONDS", "7")
    settings = Settings()
    assert settings.shutdown.drain_seconds == 5.0
    assert settings.shutdown.grace_seconds is None  # FITSERVE_GRACE_SECONDS applies

    monkeypatch.setenv("FITSERVE_SHUTDOWN__DRAIN_SECONDS", "0.5")
    monkeypatch.setenv("FITSERVE_SHUTDOWN__GRACE_SECONDS", "3")
    assert Settings().shutdown == ShutdownSettings(drain_seconds=0.5, grace_seconds=3.0)


@pytest.mark.parametrize(
    ("variable", "value", "said"),
    [
        ("FITSERVE_SHUTDOWN__DRAIN_SECONDS", "-1", "greater than or equal to 0"),
        ("FITSERVE_SHUTDOWN__GRACE_SECONDS", "soon", "a valid number"),
    ],
)
def test_a_bad_shutdown_setting_exits_2_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    variable: str,
    value: str,
    said: str,
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SystemExit) as exit_info:
        main.main(["serve", "--port", "0"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"fitserve serve: {variable}: " in err
    assert said in err
    assert "Traceback" not in err


def test_server_processes_get_their_drain_and_grace_before_sigkill() -> None:
    assert stop_timeout(Settings()) == STOP_TIMEOUT  # 5 + 10 + closing: within 30 s
    long = Settings(shutdown=ShutdownSettings(drain_seconds=30, grace_seconds=20))
    assert stop_timeout(long) == 30 + 20 + 10
    assert stop_timeout(Settings(grace_seconds=40)) == 5 + 40 + 10
