"""Structured logging: JSON lines in production, readable text on a terminal.

Request and job ids ride in context variables, so every line logged while serving a
request or running a job carries them without being passed around.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import secrets
import sys
import time
from collections.abc import Mapping
from typing import Any, Literal, TextIO

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
job_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("job_id", default="")


def new_request_id() -> str:
    """32 hex digits: the creation time in milliseconds, then 80 random bits.

    Time-ordered ids sort in logs, and let any replica tell how old an id is (Feedback
    waits for a prediction that is still on its way to Redis).
    """
    return f"{int(time.time() * 1000):012x}{secrets.token_hex(10)}"


def request_id_age(request_id: str) -> float | None:
    """Seconds since ``new_request_id`` made this id; None for ids of another form."""
    if len(request_id) != 32:
        return None
    try:
        created_ms = int(request_id[:12], 16)
    except ValueError:
        return None
    return time.time() - created_ms / 1000


_RESERVED = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


def _context(record: logging.LogRecord) -> dict[str, Any]:
    fields = {k: v for k, v in record.__dict__.items() if k not in _RESERVED}
    if request_id := request_id_var.get():
        fields.setdefault("request_id", request_id)
    if job_id := job_id_var.get():
        fields.setdefault("job_id", job_id)
    return fields


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with extra fields and context ids at the top level."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **_context(record),
        }
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """``time level logger: message key=value ...`` for people at a terminal."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = " ".join(f"{k}={v}" for k, v in _context(record).items())
        return f"{line} {fields}" if fields else line


def configure_logging(fmt: Literal["auto", "json", "text"], level: str) -> None:
    """Send every logger's records to stderr in the chosen format; below debug, the noisy
    loggers of libraries (``NOISY_LOGGERS``) log errors only."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if resolved_format(fmt) == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if is_debug(level) else logging.ERROR)


# --- Quiet start: what the processes of the embedded stack (``fitserve up``) print --------

NOISY_LOGGERS = ("absl", "matplotlib", "h5py")
"""Python loggers whose INFO/WARNING lines no user can act on (absl's notices of TensorFlow,
matplotlib's font cache); below FITSERVE_LOG_LEVEL=debug they log errors only."""

NATIVE_LINE = re.compile(r"^([IWEF])\d{4} [\d:.]+\s+\d+ ([\w.-]+):\d+\] ?(.*)$")
"""One line of TensorFlow's (absl's) C++ log: ``I0000 00:00:17.9 123 port.cc:153] text``."""

CELERY_LINE = re.compile(
    r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}): (DEBUG|INFO|WARNING|ERROR|CRITICAL)"
    r"/([\w.-]+)\] (.*)$"
)
"""One line of Celery's own format: ``[2026-01-01 10:00:00,123: INFO/MainProcess] text``."""

TEXT_LINE = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR|CRITICAL) +\S+: ")
"""A line of ``TextFormatter``."""

NOISE = re.compile(
    "|".join(
        (
            r"All log messages before absl::InitializeLog\(\) is called",
            r"oneDNN custom operations are on",
            r"Could not find cuda drivers",
            r"failed call to cuInit",
            r"computation placer",
            r"Unable to register cu(DNN|FFT|BLAS) factory",
            r"TensorFlow binary is optimized to use available CPU instructions",
            r"^To enable the following instructions: ",
            r"rebuild TensorFlow with the appropriate compiler flags",
            r"Matplotlib is building the font cache",
            r"running the worker with superuser privileges",
        )
    )
)
"""What TensorFlow, CUDA stubs, matplotlib and Celery print at start that no user can act on
(a CPU machine has no CUDA; oneDNN's round-off notice is about a default we keep)."""

ROOT_WARNING = "You're running the worker with superuser privileges"  # Celery's SecurityWarning
_LEVELS = {"I": logging.INFO, "W": logging.WARNING, "E": logging.ERROR, "F": logging.CRITICAL}


def is_debug(level: str) -> bool:
    return level.upper() == "DEBUG"


def resolved_format(fmt: Literal["auto", "json", "text"]) -> Literal["json", "text"]:
    """``auto``: text on a terminal (this process's stderr), else JSON."""
    if fmt == "auto":
        return "text" if sys.stderr.isatty() else "json"
    return fmt


def quiet_environment(
    env: Mapping[str, str], level: str, fmt: Literal["json", "text"], *, root: bool
) -> dict[str, str]:
    """The environment of every process the embedded stack starts: TensorFlow's C++ notices
    off unless FITSERVE_LOG_LEVEL=debug (TF_CPP_MIN_LOG_LEVEL, read as TensorFlow loads;
    a value the user set is kept), the one log format of this process, and, as root,
    Celery allowed to run the worker (C_FORCE_ROOT) without its warning.

    TF_ENABLE_ONEDNN_OPTS is left alone: it changes numerics, not only what is printed.
    """
    out = dict(env)
    out.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if is_debug(level) else "2")
    out["FITSERVE_LOG_FORMAT"] = fmt
    out["FITSERVE_LOG_LEVEL"] = level
    if root:
        out.setdefault("C_FORCE_ROOT", "1")
        if not is_debug(level):
            ignore = f"ignore:{ROOT_WARNING}"
            out["PYTHONWARNINGS"] = ",".join(w for w in (env.get("PYTHONWARNINGS"), ignore) if w)
    return out


class Relayed:
    """Turns lines a child of the stack printed into this process's log: lines in the one
    format pass as they are, Celery's and TensorFlow's native lines become records in it,
    anything else (a print, a traceback) becomes a record of the child's logger; noise no
    user can act on, and native notices under TF_CPP_MIN_LOG_LEVEL, are dropped (none with
    FITSERVE_LOG_LEVEL=debug)."""

    def __init__(self, child: str, level: str, native_min_level: int) -> None:
        self.logger = logging.getLogger(f"fitserve.{child}")
        self.debug = is_debug(level)
        self.native_min = 0 if self.debug else native_min_level
        self._level = logging.INFO  # a continuation line takes the level of the line before

    def record(self, line: str, created: float | None = None) -> logging.LogRecord | str | None:
        """What to emit for ``line`` (read at ``created``, default now): a record, the line
        itself (already in the one format), or None (dropped)."""
        line = line.rstrip("\r\n")
        if not line.strip():
            return None
        if not self.debug and NOISE.search(line):
            return None
        if _in_one_format(line):
            return line
        fields: dict[str, Any] = {}
        native, celery = NATIVE_LINE.match(line), CELERY_LINE.match(line)
        if native:
            severity = "IWEF".index(native.group(1))
            if severity < self.native_min:
                return None
            self._level, message = _LEVELS[native.group(1)], native.group(3)
            fields["source"] = native.group(2)
            name = "tensorflow.native"
        elif celery:
            self._level, message = logging.getLevelNamesMapping()[celery.group(3)], celery.group(5)
            fields["celery_process"] = celery.group(4)
            name = self.logger.name
        else:
            message, name = line, self.logger.name
        if self._level < self.logger.getEffectiveLevel():
            return None
        record = logging.makeLogRecord({"name": name, "levelno": self._level, "msg": message})
        record.levelname = logging.getLevelName(self._level)
        if created is not None:
            record.created, record.msecs = created, (created % 1) * 1000
        record.__dict__.update(fields)
        return record

    def emit(self, line: str, out: TextIO, created: float | None = None) -> None:
        what = self.record(line, created)
        if isinstance(what, str):
            out.write(what + "\n")
            out.flush()
        elif what is not None:
            self.logger.handle(what)


def _in_one_format(line: str) -> bool:
    if TEXT_LINE.match(line):
        return True
    if not line.startswith("{"):
        return False
    try:
        entry = json.loads(line)
    except ValueError:
        return False
    return isinstance(entry, dict) and {"time", "level", "logger", "message"} <= entry.keys()
