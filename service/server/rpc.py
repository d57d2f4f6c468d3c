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
import contextlib
import functools
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf import json_format
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from service.observability.calls import Call, Observability
from service.runtime.interface import RequestError
from service.server.callers import request_id_problem
from service.server.status import abort_with

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")
API_SERVICE = "nemotron.v1.GenerationService"
API_PREFIX = f"/{API_SERVICE}/"


class _GrpcCall(Call):
    """One RPC in flight: the shared call record plus what gRPC adds (metadata, abort)."""

    def __init__(
        self,
        obs: Observability,
        method: str,
        request: Message | Undecodable,
        context: Any,
        service: str = API_SERVICE,
    ) -> None:
        metadata = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        if isinstance(request, Undecodable):
            request_id, self.id_problem = f"req-{uuid.uuid4().hex[:16]}", request.problem
        else:
            request_id, self.id_problem = _ensure_request_id(request)
        super().__init__(obs, method, request_id, metadata, f"{service}/{method}", deadline)
        self.context, self.service = context, service
        self.request_body = (
            json_format.MessageToDict(request)
            if obs.log_prompts and not isinstance(request, Undecodable)
            else None
        )

    def finish_sent(self) -> None:
        """Record a call whose handler finished: OK, unless its deadline passed meanwhile (then
        gRPC answers the client DEADLINE_EXCEEDED: a stream's final message may still have
        been in the write when it expired).

        A client that cancels after this point sees CANCELLED while the record says OK: gRPC's
        server API gives the application no sign of that cancel (docs/service.md, Errors).
        """
        if self.deadline is not None and time.monotonic() >= self.deadline:
            self.finish(grpc.StatusCode.DEADLINE_EXCEEDED)
        else:
            self.finish(grpc.StatusCode.OK)

    def check_id(self) -> None:
        """Refuse the call when its request could not be decoded or its id cannot be used."""
        if self.id_problem is not None:
            raise RequestError(self.id_problem)

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
            "rpc.service": self.service,
            "rpc.method": self.record.method,
            "rpc.grpc.status_code": code.value[0],
        }
        self.end(code, message, attributes)


class Undecodable:
    """What a call carried that is not its method's message (the call wrappers refuse it).

    gRPC's own handling of a deserializer that raises answers UNKNOWN with the exception's text
    and skips the call's record; this way the refusal is INVALID_ARGUMENT, logged and counted.
    """

    def __init__(self, message_name: str) -> None:
        self.problem = (
            f"the request is not a valid {message_name} message (a corrupt protobuf encoding, "
            "or a string field that is not valid UTF-8)"
        )


def _decoder(message_class: type[Message]) -> Callable[[bytes], Message | Undecodable]:
    name = message_class.DESCRIPTOR.full_name

    def decode(data: bytes) -> Message | Undecodable:
        try:
            return message_class.FromString(data)
        except Exception:  # DecodeError, or an encoding error on invalid UTF-8
            return Undecodable(name)

    return decode


def add_servicer(servicer: Any, server: grpc.aio.Server, descriptor: ServiceDescriptor) -> None:
    """Register `servicer`'s RPCs with request decoding that never fails the call unrecorded.

    Only the RPCs the servicer implements are registered (`rpc_service` checks which); gRPC
    answers the others UNIMPLEMENTED.
    """
    handlers = {}
    for method in descriptor.methods:
        if not hasattr(servicer, method.name):
            continue
        request_class = GetMessageClass(method.input_type)
        response_class = GetMessageClass(method.output_type)
        make = _HANDLER_KINDS[method.client_streaming, method.server_streaming]
        handlers[method.name] = make(
            getattr(servicer, method.name),
            request_deserializer=_decoder(request_class),
            response_serializer=response_class.SerializeToString,
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(descriptor.full_name, handlers),)
    )
    server.add_registered_method_handlers(descriptor.full_name, handlers)


_HANDLER_KINDS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def _ensure_request_id(request: Message) -> tuple[str, str | None]:
    """The call's request id, and what is wrong with the client's (None: nothing).

    An empty `request_id` gets a generated one, written into the request for the handler. An
    unusable one (too long, odd characters) is not logged: the call is named by a generated id
    and refused. A KServe request's `id` is the client's to echo back: an empty one stays empty
    and the call is named by a generated id.
    """
    fields = request.DESCRIPTOR.fields_by_name
    if "request_id" not in fields and "id" in fields:
        client_id = str(request.id)  # type: ignore[attr-defined]
        if not client_id:
            return f"req-{uuid.uuid4().hex[:16]}", None
        problem = request_id_problem(client_id, "id")
        return (f"req-{uuid.uuid4().hex[:16]}", problem) if problem else (client_id, None)
    if "request_id" not in fields:
        return f"rpc-{uuid.uuid4().hex[:16]}", None
    if not request.request_id:  # type: ignore[attr-defined]
        request.request_id = f"req-{uuid.uuid4().hex[:16]}"  # type: ignore[attr-defined]
    problem = request_id_problem(request.request_id)  # type: ignore[attr-defined]
    if problem is not None:
        return f"req-{uuid.uuid4().hex[:16]}", problem
    return str(request.request_id), None  # type: ignore[attr-defined]


def check_size(
    response: Message, limit: int | None, instead: str = "use the streaming RPC"
) -> None:
    """Refuse a response over the send limit: gRPC would fail it with RESOURCE_EXHAUSTED, which
    the API documents as "overloaded, retry later", after the call was recorded as OK."""
    if limit is None:
        return
    size = response.ByteSize()
    if size > limit:
        raise RequestError(
            f"the response would be {size} bytes, over the server's message limit of {limit} "
            "bytes (--max-message-bytes): ask for less (a shorter text, fewer tokens or "
            f"log-probabilities), or {instead}"
        )


def unary(handler: F) -> F:
    """Wrap a unary handler: ids, logs, span, metrics, error table."""
    method = handler.__name__

    @_marked
    @functools.wraps(handler)
    async def wrapped(self: Any, request: Message, context: grpc.aio.ServicerContext) -> Any:
        call = _GrpcCall(self.observability, method, request, context, _service_of(self))
        with call.active(call.request_body):
            try:
                call.check_id()
                response = await handler(self, request, context)
                check_size(response, getattr(self, "max_response_bytes", None))
            except BaseException as error:
                await call.fail(error)
                raise
            call.keep_message(response)
            call.finish_sent()
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
        call = _GrpcCall(self.observability, method, request, context, _service_of(self))
        messages = handler(self, request, context)
        delivered = False  # the final message (the one with a finish reason) was handed over

        def abandoned() -> None:  # gRPC ended the call with this generator left at a `yield`
            call.finish_sent() if delivered else call.finish(call.cancel_code())

        close_when_done(context, messages, abandoned)
        with call.active(call.request_body):
            try:
                call.check_id()
                async with contextlib.aclosing(messages):
                    async for message in messages:
                        call.keep_message(message)
                        # Handed to gRPC: a client that closes as soon as it has the final
                        # message (clients stop at the finish reason) ends the call during this
                        # very write.
                        delivered = delivered or bool(getattr(message, "finish_reason", 0))
                        yield message
            except BaseException as error:
                if delivered and isinstance(error, GeneratorExit | asyncio.CancelledError):
                    # The client had the whole answer and closed before the stream's end
                    # arrived: for it the call succeeded (unless the deadline cut the write).
                    call.finish_sent()
                    raise
                if isinstance(error, GeneratorExit):
                    call.finish(call.cancel_code())
                    raise
                await call.fail(error)
                raise
            call.finish_sent()

    return wrapped  # type: ignore[return-value]


def bidirectional(handler: F) -> F:
    """Wrap a bidirectional-streaming handler: its messages are closed when the call ends.

    Such a call carries many requests, each with its own outcome: the handler opens a call
    record per request (`request_call`), not one for the stream.
    """

    @_marked
    @functools.wraps(handler)
    async def wrapped(
        self: Any, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        messages = handler(self, requests, context)
        close_when_done(context, messages, lambda: None)
        async with contextlib.aclosing(messages):
            async for message in messages:
                yield message

    return wrapped  # type: ignore[return-value]


def request_call(
    servicer: Any, method: str, request: Message | Undecodable, context: Any
) -> _GrpcCall:
    """The call record of one request carried by a bidirectional stream."""
    return _GrpcCall(servicer.observability, method, request, context, _service_of(servicer))


def _service_of(servicer: Any) -> str:
    return str(getattr(servicer, "service_name", API_SERVICE))


def close_when_done(
    context: grpc.aio.ServicerContext,
    messages: AsyncGenerator[Any, None],
    abandoned: Callable[[], None],
) -> None:
    """Close a streaming handler's messages when its call ends, however it ends.

    A client that cancels while gRPC is still sending a message ends the call in gRPC's own
    code, outside the handler's generator: the generator is left suspended at its `yield` and
    nothing closes it but the garbage collector, maybe much later (a reference cycle through
    the cancellation's traceback keeps it alive). Its request would go on generating, holding
    its KV cache. Closing it here runs every `finally` down to the engine's stream, which
    aborts the request; then `abandoned` records the call's outcome (the wrapper left at its
    own `yield` would record it only when collected). A generator still running is being
    cancelled by gRPC already, which closes it and records the call; one that finished is left
    alone.
    """
    loop = asyncio.get_running_loop()

    async def close() -> None:
        try:
            await messages.aclose()
        except RuntimeError:  # running: its own cancellation closes it and records the call
            return
        abandoned()

    def ended(_: object) -> None:
        if messages.ag_frame is not None:  # not finished
            loop.call_soon_threadsafe(lambda: _keep(loop.create_task(close())))

    context.add_done_callback(ended)


_CLOSING: set[asyncio.Task[None]] = set()


def _keep(task: asyncio.Task[None]) -> None:
    """Hold a closing task until it is done (the loop keeps only weak references)."""
    _CLOSING.add(task)
    task.add_done_callback(_CLOSING.discard)


def _marked(wrapper: F) -> F:
    wrapper.rpc_wrapped = True  # type: ignore[attr-defined]
    return wrapper


def rpc_service(
    descriptor: ServiceDescriptor, served: tuple[str, ...] | None = None
) -> Callable[[type[T]], type[T]]:
    """Class decorator: wrap every RPC of `descriptor` on the servicer, so none is forgotten.

    `served` names the RPCs the class serves (None: all; `add_servicer` registers no others).
    Unary RPCs get `unary`, server-streaming ones `streaming`, bidirectional ones
    `bidirectional`; a missing method, or an RPC shape this server does not serve
    (client streaming alone), is an error when the class is defined.
    """

    def decorate(cls: type[T]) -> type[T]:
        for method in descriptor.methods:
            if served is not None and method.name not in served:
                continue
            handler = cls.__dict__.get(method.name)
            if handler is None:
                raise TypeError(f"{cls.__name__} does not implement {method.full_name}")
            if method.client_streaming and not method.server_streaming:
                raise TypeError(f"{method.full_name}: client streaming is not supported")
            if method.client_streaming:
                wrap = bidirectional
            else:
                wrap = streaming if method.server_streaming else unary
            setattr(cls, method.name, wrap(handler))
        return cls

    return decorate
