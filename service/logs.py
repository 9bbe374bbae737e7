"""Structured logging: JSON lines in production, readable text on a terminal.

Request and job ids ride in context variables, so every line logged while serving a
request or running a job carries them without being passed around.
"""

from __future__ import annotations

import contextvars
import json
import logging
import secrets
import sys
import time
from typing import Any, Literal

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
    """Send every logger's records to stderr in the chosen format."""
    if fmt == "auto":
        fmt = "text" if sys.stderr.isatty() else "json"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
