"""The server's logs: structlog, JSON lines (or colourless console lines on a terminal).

Every `nemotron.*` log record (including `log_event` from `engine_build.events`) goes through
one structlog formatter that adds the time, the level and whatever the current request bound
with `bind_request` (request id, method, trace id, span id). Prompts and outputs are never
logged unless the operator turns `--log-prompts` on.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from typing import Any

import structlog

LOG_FORMATS = ("auto", "json", "console")
_LOGGER = logging.getLogger("nemotron")


def _record_fields(
    _logger: Any, _method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Lift `log_event`'s key/value fields from the stdlib record into the event."""
    record = event.get("_record")
    for key, value in getattr(record, "fields", {}).items():
        event.setdefault(key, value)
    return event


def _level(_logger: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    event["level"] = method
    return event


def configure_service_logging(level: str = "info", fmt: str = "auto") -> None:
    """Send `nemotron.*` records to stderr as JSON (or console lines) at `level`."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format {fmt!r} is not one of {', '.join(LOG_FORMATS)}")
    as_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer(default=str)
        if as_json
        # Tracebacks without local variables: they hold prompts, tokens and keys.
        else structlog.dev.ConsoleRenderer(
            colors=False, exception_formatter=structlog.dev.plain_traceback
        )
    )
    chain: list[Any] = [
        _record_fields,
        structlog.contextvars.merge_contextvars,
        _level,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="time"),
    ]
    if as_json:
        chain.append(
            structlog.processors.ExceptionRenderer(
                structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
            )
        )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=chain,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    _LOGGER.handlers[:] = [handler]
    _LOGGER.setLevel(level.upper())
    _LOGGER.propagate = False


@contextmanager
def bind_request(**fields: Any) -> Iterator[None]:
    """Add `fields` (request id, trace id, ...) to every line logged inside the block."""
    tokens = structlog.contextvars.bind_contextvars(**fields)
    try:
        yield
    finally:
        structlog.contextvars.reset_contextvars(**tokens)
