"""What happens around every API call: request id, logs, span, metrics and the error table.

`unary` and `streaming` wrap the servicer's handlers. Each call gets a request id (the client's
`request_id` field, or a generated one), log lines bound to it and to the trace, a server span
(when tracing is on) whose children are the request's phases, one metrics sample, and one
`rpc_finished` log line. Domain errors become status codes through `service.server.status`; a
client that cancels or passes its deadline is recorded as CANCELLED or DEADLINE_EXCEEDED.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from google.protobuf import json_format
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import Message

from engine_build.events import log_event
from service.observability.logs import bind_request
from service.observability.metrics import ServiceMetrics
from service.observability.tracing import (
    RequestRecord,
    Tracing,
    caller_trace_ids,
    recording,
    span_ids,
)
from service.server.status import abort_with

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")
API_PREFIX = "/nemotron.v1.GenerationService/"
DEADLINE_SLACK_S = 0.25


@dataclass
class Observability:
    """The process's tracer, metrics and logging choices, shared by all calls."""

    tracing: Tracing = field(default_factory=lambda: Tracing({}))
    metrics: ServiceMetrics | None = None
    model: str = ""
    log_prompts: bool = False  # log request and response bodies (off: they may be private)


class _Call:
    """One RPC in flight."""

    def __init__(self, obs: Observability, method: str, request: Message, context: Any) -> None:
        self.obs, self.context = obs, context
        self.started = time.perf_counter()
        self.record = RequestRecord(method=method, request_id=_ensure_request_id(request))
        metadata = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        self.span = (
            obs.tracing.start_rpc_span(f"{API_PREFIX[1:]}{method}", metadata)
            if obs.tracing.enabled
            else None
        )
        self.trace_id, self.span_id = (
            span_ids(self.span) if self.span is not None else caller_trace_ids(metadata)
        )
        remaining = context.time_remaining()
        self.deadline = time.monotonic() + remaining if remaining is not None else None
        self.response_text: list[str] = []
        if obs.log_prompts:
            self.request_body = json_format.MessageToDict(request)

    @contextmanager
    def active(self) -> Iterator[None]:
        fields = {"request_id": self.record.request_id, "method": self.record.method}
        if self.trace_id:
            fields |= {"trace_id": self.trace_id, "span_id": self.span_id}
        with bind_request(**fields), recording(self.record):
            if self.obs.log_prompts:
                log_event("rpc_request", body=self.request_body)
            yield

    def cancel_code(self) -> grpc.StatusCode:
        """DEADLINE_EXCEEDED when the call went away at its deadline, else CANCELLED.

        The client's clock runs out slightly before the server's copy of the deadline (it was
        sent as a timeout and started on arrival), so a cancellation close to it counts.
        """
        if self.deadline is not None and time.monotonic() >= self.deadline - DEADLINE_SLACK_S:
            return grpc.StatusCode.DEADLINE_EXCEEDED
        return grpc.StatusCode.CANCELLED

    def keep_text(self, message: Message) -> None:
        if self.obs.log_prompts:
            for name in ("text", "reasoning", "content"):
                value = getattr(message, name, "")
                if isinstance(value, str) and value:
                    self.response_text.append(value)

    async def fail(self, error: BaseException) -> None:
        """End the call for `error`: map it to a status (raises) or re-raise it."""
        if isinstance(error, asyncio.CancelledError):
            self.end(self.cancel_code())
            raise error
        if isinstance(error, grpc.aio.AbortError | grpc.aio.UsageError):
            self.end(self.context.code() or grpc.StatusCode.UNKNOWN)
            raise error
        assert isinstance(error, Exception)
        code = await abort_with(self.context, error, self.end)
        raise AssertionError(f"abort returned for {code}")  # context.abort always raises

    def end(self, code: grpc.StatusCode, message: str = "") -> None:
        duration = time.perf_counter() - self.started
        record = self.record
        if self.obs.metrics is not None:
            self.obs.metrics.observe(record, code.name, duration)
        if self.span is not None:
            self._end_span(code, message)
        fields: dict[str, Any] = {
            "code": code.name,
            "duration_ms": round(duration * 1000, 2),
        }
        if record.operation:
            fields |= {
                "prompt_tokens": record.prompt_tokens,
                "completion_tokens": record.completion_tokens,
                "finish_reason": record.finish_reason,
            }
            if record.timings is not None:
                fields["ttft_ms"] = round(record.timings.time_to_first_token_s * 1000, 2)
        if message:
            fields["error"] = message
        if self.obs.log_prompts and self.response_text:
            fields["output"] = "".join(self.response_text)
        level = logging.WARNING if code is grpc.StatusCode.INTERNAL else logging.INFO
        log_event("rpc_finished", level, **fields)

    def _end_span(self, code: grpc.StatusCode, message: str) -> None:
        from opentelemetry.trace import Status, StatusCode

        span, record = self.span, self.record
        attributes: dict[str, Any] = {
            "rpc.system": "grpc",
            "rpc.service": API_PREFIX[1:-1],
            "rpc.method": record.method,
            "rpc.grpc.status_code": code.value[0],
            "nemotron.request_id": record.request_id,
        }
        if record.operation:
            attributes |= {
                "gen_ai.operation.name": record.operation,
                "gen_ai.request.model": self.obs.model,
                "gen_ai.response.model": self.obs.model,
                "gen_ai.response.id": record.request_id,
                "gen_ai.usage.input_tokens": record.prompt_tokens,
                "gen_ai.usage.output_tokens": record.completion_tokens,
                "nemotron.usage.reasoning_tokens": record.reasoning_tokens,
                "nemotron.usage.cached_prompt_tokens": record.cached_prompt_tokens,
                **record.request_attributes,
            }
            if record.finish_reason:
                attributes["gen_ai.response.finish_reasons"] = [record.finish_reason]
            if record.timings is not None:
                attributes["gen_ai.server.time_to_first_token"] = (
                    record.timings.time_to_first_token_s
                )
                attributes["nemotron.queue_time"] = record.timings.queue_s
            per_token = record.time_per_output_token_s
            if per_token is not None:
                attributes["gen_ai.server.time_per_output_token"] = per_token
        span.set_attributes(attributes)
        if code is not grpc.StatusCode.OK:
            span.set_status(Status(StatusCode.ERROR, message or code.name))
        self.obs.tracing.add_phase_spans(span, record.phases + record.engine_phases())
        span.end()


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
        call = _Call(self.observability, method, request, context)
        with call.active():
            try:
                response = await handler(self, request, context)
            except BaseException as error:
                await call.fail(error)
                raise
            call.keep_text(response)
            call.end(grpc.StatusCode.OK)
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
        call = _Call(self.observability, method, request, context)
        with call.active():
            try:
                async for message in handler(self, request, context):
                    call.keep_text(message)
                    yield message
            except BaseException as error:
                if isinstance(error, GeneratorExit):
                    call.end(call.cancel_code())
                    raise
                await call.fail(error)
                raise
            call.end(grpc.StatusCode.OK)

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
