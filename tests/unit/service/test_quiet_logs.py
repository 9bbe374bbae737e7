"""What the embedded stack makes of its children's lines and environment (service.logs)."""

from __future__ import annotations

import logging

from service.logs import Relayed, quiet_environment

ONEDNN = (
    "I0000 00:00:1796298146.140939   16341 port.cc:153] oneDNN custom operations are on. "
    "You may see slightly different numerical results"
)
CUINIT = "E0000 00:00:1796298154.629669   16345 cuda_platform.cc:52] failed call to cuInit: x"
NATIVE_ERROR = "E0000 00:00:1796298154.629669   16345 op_kernel.cc:1830] OP_REQUIRES failed"


def test_noise_is_dropped_and_lines_of_the_one_format_pass_as_they_are() -> None:
    relayed = Relayed("server", "INFO", 2)
    assert relayed.record(ONEDNN + "\n") is None
    assert relayed.record(CUINIT) is None
    assert relayed.record("Matplotlib is building the font cache; this may take a moment.") is None
    line = '{"time": "t", "level": "INFO", "logger": "fitserve", "message": "m"}'
    assert relayed.record(line + "\n") == line
    assert relayed.record("12:00:00 INFO    fitserve: hello") == "12:00:00 INFO    fitserve: hello"
    assert relayed.record("   \n") is None


def test_foreign_lines_become_records_with_their_level() -> None:
    relayed = Relayed("worker", "INFO", 2)
    record = relayed.record("[2026-12-03 11:42:24,973: WARNING/ForkPoolWorker-1] slow job")
    assert isinstance(record, logging.LogRecord)
    assert (record.name, record.levelname, record.getMessage()) == (
        "fitserve.worker",
        "WARNING",
        "slow job",
    )
    assert record.__dict__["celery_process"] == "ForkPoolWorker-1"
    cont = relayed.record("Traceback (most recent call last):")  # takes the level before
    assert isinstance(cont, logging.LogRecord)
    assert cont.levelname == "WARNING"
    native = relayed.record(NATIVE_ERROR)  # an error nobody listed as noise is kept
    assert isinstance(native, logging.LogRecord)
    assert (native.name, native.levelname) == ("tensorflow.native", "ERROR")
    assert relayed.record("[2026-12-03 11:42:24,973: DEBUG/MainProcess] detail") is None


def test_debug_keeps_everything() -> None:
    relayed = Relayed("server", "debug", 2)
    relayed.logger.setLevel(logging.DEBUG)  # as configure_logging("debug") sets the root
    try:
        record = relayed.record(ONEDNN)
    finally:
        relayed.logger.setLevel(logging.NOTSET)
    assert isinstance(record, logging.LogRecord)
    assert record.name == "tensorflow.native"
    assert record.levelname == "INFO"


def test_the_environment_silences_tensorflow_unless_the_user_chose() -> None:
    env = quiet_environment({}, "INFO", "json", root=False)
    assert env["TF_CPP_MIN_LOG_LEVEL"] == "2"
    assert "TF_ENABLE_ONEDNN_OPTS" not in env  # numerics are the user's
    assert "C_FORCE_ROOT" not in env
    assert (
        quiet_environment({"TF_CPP_MIN_LOG_LEVEL": "1"}, "INFO", "json", root=False)[
            "TF_CPP_MIN_LOG_LEVEL"
        ]
        == "1"
    )
    assert quiet_environment({}, "DEBUG", "text", root=False)["TF_CPP_MIN_LOG_LEVEL"] == "0"
    root = quiet_environment({"PYTHONWARNINGS": "default"}, "INFO", "text", root=True)
    assert root["C_FORCE_ROOT"] == "1"
    assert root["PYTHONWARNINGS"].startswith("default,ignore:You're running the worker")
    assert root["FITSERVE_LOG_FORMAT"] == "text"
    assert "PYTHONWARNINGS" not in quiet_environment({}, "DEBUG", "text", root=True)
