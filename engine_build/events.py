"""Structured log events for both CLIs: one line per event, `event key=value ...`, or JSON lines.

Every logger under `nemotron` (`nemotron.build`, `nemotron.serve`, ...) goes through here.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

_LOGGER = logging.getLogger("nemotron")
LOG_LEVELS = ("debug", "info", "warning", "error")  # what --log-level takes, in every CLI


class _EventFormatter(logging.Formatter):
    def __init__(self, as_json: bool) -> None:
        super().__init__()
        self.as_json = as_json

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = getattr(record, "fields", {})
        if self.as_json:
            return json.dumps(
                {"level": record.levelname.lower(), "event": record.getMessage(), **fields},
                default=str,
            )
        pairs = " ".join(f"{k}={json.dumps(v, default=str)}" for k, v in fields.items())
        return f"{record.levelname.lower()} {record.getMessage()} {pairs}".rstrip()


def configure_logging(level: str = "info", as_json: bool = False) -> None:
    """Send events to stderr at `level`; call once at process start."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_EventFormatter(as_json))
    _LOGGER.handlers[:] = [handler]
    _LOGGER.setLevel(level.upper())
    _LOGGER.propagate = False


def log_event(event: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log one named event with key/value fields (never prompt text unless a caller opts in)."""
    _LOGGER.log(level, event, extra={"fields": fields})
