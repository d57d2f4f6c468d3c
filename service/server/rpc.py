"""What happens around every gRPC call: request id, logs, span, metrics and the error table.

`unary` and `streaming` wrap the servicer's handlers (`rpc_service` applies them to every RPC).
Each call gets a request id (the client's `request_id` field, or a generated one) and the
shared call record of `service.observability.calls`: log lines bound to it and to the trace, a
server span whose children are the request's phases, one metrics sample, one `rpc_finished`
line. Domain errors become status codes through `service.server.status`; a client that cancels
or passes its deadline is recorded as CANCELLED or DEADLINE_EXCEEDED.
"""

from __future__ import annotations

import asyncio
import functools
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf import json_format
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import Message

from service.observability.calls import Call, Observability
from service.server.status import abort_with

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")
API_PREFIX = "/nemotron.v1.GenerationService/"


class _GrpcCall(Call):
    """One RPC in flight: the shared call record plus what gRPC adds (metadata, abort)."""

    def __init__(self, obs: Observability, method: str, request: Message, context: Any) -> None:
        metadata = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        request_id = _ensure_request_id(request)
        super().__init__(obs, method, request_id, metadata, f"{API_PREFIX[1:]}{method}", deadline)
        self.context = context
        self.request_body = json_format.MessageToDict(request) if obs.log_prompts else None

    def keep_message(self, message: Message) -> None:
        """Keep a response's text for the log (only with --log-prompts)."""
        if self.obs.log_prompts:
            self.keep_text(*(getattr(message, n, "") for n in ("text", "reasoning", "content")))

    async def fail(self, error: BaseException) -> None:
        """End the call for `error`: map it to a status (raises) or re-raise it."""
        if isinstance(error, asyncio.CancelledError):
            self.finish(self.cancel_code())
            raise error
        if isinstance(error, grpc.aio.AbortError | grpc.aio.UsageError):
            self.finish(self.context.code() or grpc.StatusCode.UNKNOWN)
            raise error
        assert isinstance(error, Exception)
        code = await abort_with(self.context, error, self.finish)
        raise AssertionError(f"abort returned for {code}")  # context.abort always raises

    def finish(self, code: grpc.StatusCode, message: str = "") -> None:
        """End with the RPC attributes of the span."""
        attributes = {
            "rpc.system": "grpc",
            "rpc.service": API_PREFIX[1:-1],
            "rpc.method": self.record.method,
            "rpc.grpc.status_code": code.value[0],
        }
        self.end(code, message, attributes)


def _ensure_request_id(request: Message) -> str:
    """The client's request id, or a new one written into the request for the handler."""
    fields = request.DESCRIPTOR.fields_by_name
    if "request_id" in fields:
        if not request.request_id:  # type: ignore[attr-defined]
            request.request_id = f"req-{uuid.uuid4().hex[:16]}"  # type: ignore[attr-defined]
        return str(request.request_id)  # type: ignore[attr-defined]
    return f"rpc-{uuid.uuid4().hex[:16]}"


def unary(handler: F) -> F:
    """Wrap a unary handler: ids, logs, span, metrics, error table."""
    method = handler.__name__

    @_marked
    @functools.wraps(handler)
    async def wrapped(self: Any, request: Message, context: grpc.aio.ServicerContext) -> Any:
        call = _GrpcCall(self.observability, method, request, context)
        with call.active(call.request_body):
            try:
                response = await handler(self, request, context)
            except BaseException as error:
                await call.fail(error)
                raise
            call.keep_message(response)
            call.finish(grpc.StatusCode.OK)
            return response

    return wrapped  # type: ignore[return-value]


def streaming(handler: F) -> F:
    """Wrap a server-streaming handler: ids, logs, span, metrics, error table."""
    method = handler.__name__

    @_marked
    @functools.wraps(handler)
    async def wrapped(
        self: Any, request: Message, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        call = _GrpcCall(self.observability, method, request, context)
        with call.active(call.request_body):
            try:
                async for message in handler(self, request, context):
                    call.keep_message(message)
                    yield message
            except BaseException as error:
                if isinstance(error, GeneratorExit):
                    call.finish(call.cancel_code())
                    raise
                await call.fail(error)
                raise
            call.finish(grpc.StatusCode.OK)

    return wrapped  # type: ignore[return-value]


def _marked(wrapper: F) -> F:
    wrapper.rpc_wrapped = True  # type: ignore[attr-defined]
    return wrapper


def rpc_service(descriptor: ServiceDescriptor) -> Callable[[type[T]], type[T]]:
    """Class decorator: wrap every RPC of `descriptor` on the servicer, so none is forgotten.

    Unary RPCs get `unary`, server-streaming ones `streaming`; a missing method, or an RPC shape
    this server does not serve, is an error when the class is defined.
    """

    def decorate(cls: type[T]) -> type[T]:
        for method in descriptor.methods:
            handler = cls.__dict__.get(method.name)
            if handler is None:
                raise TypeError(f"{cls.__name__} does not implement {method.full_name}")
            if method.client_streaming:
                raise TypeError(f"{method.full_name}: client streaming is not supported")
            setattr(cls, method.name, (streaming if method.server_streaming else unary)(handler))
        return cls

    return decorate
