"""One table from domain errors to statuses, rendered for gRPC and for HTTP (OpenAI's errors).

Every RPC and every HTTP route goes through it. INVALID_ARGUMENT carries the field and the
allowed range (our messages already do); RESOURCE_EXHAUSTED adds a retry hint; INTERNAL never
echoes internal text, only an id to find the logged traceback by.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from engine_build.checkpoint import CheckpointError
from service.runtime.interface import (
    EngineError,
    NotReadyError,
    OverloadedError,
    RequestError,
    RequestFailedError,
)
from service.runtime.tokenizer import TokenizerError
from service.server.api_keys import PermissionDeniedError, UnauthenticatedError

_LOG = logging.getLogger("nemotron.api")


class NotFoundError(LookupError):
    """A model or route the server does not have (HTTP 404 `model_not_found`, gRPC NOT_FOUND)."""


class TooLargeError(ValueError):
    """A request body over the size limit (HTTP 413; gRPC refuses it before our code runs)."""


@dataclass(frozen=True)
class Status:
    """A canonical outcome and how each protocol renders it."""

    code: grpc.StatusCode  # gRPC, and the label of metrics, logs and spans
    http_status: int
    error_type: str  # OpenAI's error `type`


INVALID = Status(grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request_error")
INTERNAL = Status(grpc.StatusCode.INTERNAL, 500, "server_error")
UNAVAILABLE = Status(grpc.StatusCode.UNAVAILABLE, 503, "service_unavailable")

# Domain exception -> status, most specific first.
STATUS_OF: tuple[tuple[type[BaseException], Status], ...] = (
    (RequestFailedError, INTERNAL),  # a bug: its text stays in the log
    (UnauthenticatedError, Status(grpc.StatusCode.UNAUTHENTICATED, 401, "authentication_error")),
    (PermissionDeniedError, Status(grpc.StatusCode.PERMISSION_DENIED, 403, "permission_error")),
    (NotFoundError, Status(grpc.StatusCode.NOT_FOUND, 404, "invalid_request_error")),
    (TooLargeError, Status(grpc.StatusCode.RESOURCE_EXHAUSTED, 413, "invalid_request_error")),
    (OverloadedError, Status(grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "rate_limit_error")),
    (NotReadyError, UNAVAILABLE),
    (RequestError, INVALID),
    (TokenizerError, INVALID),
    (CheckpointError, Status(grpc.StatusCode.FAILED_PRECONDITION, 500, "server_error")),
    (EngineError, UNAVAILABLE),
)
# Outcomes that no exception carries (the client went away or ran out of time).
CANCELLED = Status(grpc.StatusCode.CANCELLED, 499, "cancelled")
DEADLINE_EXCEEDED = Status(grpc.StatusCode.DEADLINE_EXCEEDED, 504, "timeout")


def classify(error: BaseException) -> tuple[Status, str]:
    """The status of `error` and the message a client may see (INTERNAL: an incident id)."""
    for kind, status in STATUS_OF:
        if not isinstance(error, kind):
            continue
        if status is INTERNAL:
            break
        message = str(error)
        if isinstance(error, OverloadedError):
            message += f" (retry after {error.retry_after_s:g} s)"
        return status, message
    incident = uuid.uuid4().hex[:12]
    _LOG.error("internal_error", exc_info=error, extra={"fields": {"incident": incident}})
    return INTERNAL, f"internal error (incident {incident} in the server log)"


def status_for(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status code and the message a client may see."""
    status, message = classify(error)
    return status.code, message


async def abort_with(
    context: grpc.aio.ServicerContext,
    error: Exception,
    end: Callable[[grpc.StatusCode, str], None],
) -> grpc.StatusCode:
    """End the call with the status for `error` (`end` records it first); raises AbortError."""
    code, message = status_for(error)
    end(code, message)
    if isinstance(error, OverloadedError):
        context.set_trailing_metadata((("retry-after-ms", str(int(error.retry_after_s * 1000))),))
    await context.abort(code, message)
    return code
