"""One table from domain errors to gRPC status codes, applied around every handler.

INVALID_ARGUMENT carries the field and the allowed range (our messages already do);
RESOURCE_EXHAUSTED adds a retry hint; INTERNAL never echoes internal text, only an id to find
the logged traceback by.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable

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

# Domain exception -> status code, most specific first.
STATUS_OF: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (RequestFailedError, grpc.StatusCode.INTERNAL),  # a bug: its text stays in the log
    (UnauthenticatedError, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    (OverloadedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (NotReadyError, grpc.StatusCode.UNAVAILABLE),
    (RequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (TokenizerError, grpc.StatusCode.INVALID_ARGUMENT),
    (CheckpointError, grpc.StatusCode.FAILED_PRECONDITION),
    (EngineError, grpc.StatusCode.UNAVAILABLE),
)


def status_for(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and the message a client may see."""
    for kind, code in STATUS_OF:
        if not isinstance(error, kind):
            continue
        if code is grpc.StatusCode.INTERNAL:
            break
        message = str(error)
        if isinstance(error, OverloadedError):
            message += f" (retry after {error.retry_after_s:g} s)"
        return code, message
    incident = uuid.uuid4().hex[:12]
    _LOG.error("internal_error", exc_info=error, extra={"fields": {"incident": incident}})
    return grpc.StatusCode.INTERNAL, f"internal error (incident {incident} in the server log)"


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
