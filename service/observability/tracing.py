"""Per-request records and OpenTelemetry tracing, configured by the standard `OTEL_*` variables.

Tracing is off unless the environment asks for it (`OTEL_TRACES_EXPORTER=otlp|console`, or an
`OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT`), and `OTEL_SDK_DISABLED=true` turns it off whatever
else is set. When off, nothing of the SDK is imported and a request costs one small record.

The RPC layer keeps one `RequestRecord` per call in a context variable; code below it marks
phases (`with phase("tokenize")`) and the outcome (`finish`). At the end of the call the RPC
span gets GenAI attributes and child spans for tokenize, queue, prefill and decode, placed on
the timeline from the engine's own timings.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from service.runtime.interface import Timings

EXPORTERS = ("otlp", "console", "none")
PROTOCOLS = ("grpc", "http/protobuf")
DEFAULT_SERVICE_NAME = "nemotron-serve"


class TracingConfigError(ValueError):
    """An `OTEL_*` variable this service cannot honour; the message names it."""


@dataclass
class RequestRecord:
    """What one RPC did, filled in as it runs."""

    method: str
    started_ns: int = field(default_factory=time.time_ns)
    request_id: str = ""
    operation: str = ""  # GenAI operation: "chat" or "text_completion"; "" for other RPCs
    request_attributes: dict[str, Any] = field(default_factory=dict)
    phases: list[tuple[str, int, int]] = field(default_factory=list)
    submitted_ns: int | None = None  # when the request reached the engine
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    cached_prompt_tokens: int = 0
    timings: Timings | None = None
    finish_reason: str | None = None

    def finish(
        self,
        prompt_tokens: int,
        completion_tokens: int,
        timings: Timings | None,
        finish_reason: str | None,
        reasoning_tokens: int = 0,
        cached_prompt_tokens: int = 0,
    ) -> None:
        """Record the outcome of the generation."""
        self.prompt_tokens, self.completion_tokens = prompt_tokens, completion_tokens
        self.reasoning_tokens, self.cached_prompt_tokens = reasoning_tokens, cached_prompt_tokens
        self.timings, self.finish_reason = timings, finish_reason

    def engine_phases(self) -> list[tuple[str, int, int]]:
        """Queue, prefill and decode on the wall clock, from the engine's timings."""
        if self.timings is None or self.submitted_ns is None:
            return []
        t = self.timings
        at = [self.submitted_ns + int(s * 1e9) for s in (0, t.queue_s, t.time_to_first_token_s)]
        end = self.submitted_ns + int(t.total_s * 1e9)
        return [("queue", at[0], at[1]), ("prefill", at[1], at[2]), ("decode", at[2], end)]

    @property
    def time_per_output_token_s(self) -> float | None:
        """Mean time between output tokens after the first."""
        if self.timings is None or self.completion_tokens < 2:
            return None
        decode = self.timings.total_s - self.timings.time_to_first_token_s
        return max(0.0, decode) / (self.completion_tokens - 1)


_CURRENT: ContextVar[RequestRecord | None] = ContextVar("nemotron_request", default=None)


def current_record() -> RequestRecord | None:
    """The record of the RPC being served on this task, if any."""
    return _CURRENT.get()


@contextmanager
def recording(record: RequestRecord) -> Iterator[RequestRecord]:
    """Make `record` the current one inside the block."""
    token = _CURRENT.set(record)
    try:
        yield record
    finally:
        _CURRENT.reset(token)


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Time a phase of the current request (a no-op outside an RPC)."""
    record = _CURRENT.get()
    if record is None:
        yield
        return
    start = time.time_ns()
    try:
        yield
    finally:
        end = time.time_ns()
        record.phases.append((name, start, end))
        record.submitted_ns = end  # the engine gets the request right after its last phase


def tracing_requested(environ: Mapping[str, str]) -> bool:
    """Whether the `OTEL_*` variables ask for traces (off by default)."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter:
        return exporter != "none"
    return bool(
        environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    )


class Tracing:
    """The tracer of this process, or nothing when tracing is off."""

    def __init__(self, environ: Mapping[str, str], service_version: str = "") -> None:
        self.enabled = tracing_requested(environ)
        self._provider: Any = None
        self._tracer: Any = None
        if self.enabled:
            self._provider = _provider(environ, service_version)
            self._tracer = self._provider.get_tracer("nemotron-serve", service_version)

    def start_rpc_span(self, name: str, metadata: Mapping[str, str]) -> Any:
        """A server span for an RPC, child of the caller's `traceparent` when it sent one."""
        from opentelemetry import propagate, trace

        parent = propagate.extract(metadata)
        return self._tracer.start_span(
            name, context=parent, kind=trace.SpanKind.SERVER, start_time=time.time_ns()
        )

    def add_phase_spans(self, rpc_span: Any, phases: list[tuple[str, int, int]]) -> None:
        """Child spans of `rpc_span` with the given wall-clock bounds."""
        from opentelemetry import trace

        context = trace.set_span_in_context(rpc_span)
        for name, start, end in phases:
            span = self._tracer.start_span(name, context=context, start_time=start)
            span.end(end_time=max(start, end))

    def shutdown(self) -> None:
        """Flush and stop the exporter."""
        if self._provider is not None:
            self._provider.shutdown()


def caller_trace_ids(metadata: Mapping[str, str]) -> tuple[str, str]:
    """(trace id, span id) of the caller's `traceparent`, for logs when tracing is off."""
    header = metadata.get("traceparent", "")
    parts = header.split("-")
    if len(parts) == 4 and len(parts[1]) == 32 and len(parts[2]) == 16:
        return parts[1], parts[2]
    return "", ""


def span_ids(span: Any) -> tuple[str, str]:
    """(trace id, span id) of a live span, as the 32 and 16 hex digits logs carry."""
    context = span.get_span_context()
    return f"{context.trace_id:032x}", f"{context.span_id:016x}"


def _provider(environ: Mapping[str, str], service_version: str) -> Any:
    from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    attributes: dict[str, Any] = {SERVICE_VERSION: service_version}
    if not environ.get("OTEL_SERVICE_NAME") and "service.name=" not in environ.get(
        "OTEL_RESOURCE_ATTRIBUTES", ""
    ):
        attributes[SERVICE_NAME] = DEFAULT_SERVICE_NAME
    provider = TracerProvider(resource=Resource.create(attributes))  # sampler from OTEL_*
    exporter_name = environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() or "otlp"
    if exporter_name == "console":
        exporter: Any = ConsoleSpanExporter()
    elif exporter_name == "otlp":
        exporter = _otlp_exporter(environ)
    else:
        raise TracingConfigError(
            f"OTEL_TRACES_EXPORTER={exporter_name!r} is not supported; use one of "
            f"{', '.join(EXPORTERS)}"
        )
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def _otlp_exporter(environ: Mapping[str, str]) -> Any:
    protocol = (
        environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "grpc"
    ).strip()
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()  # endpoint, headers, TLS and timeout from OTEL_*
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpExporter,
        )

        return HttpExporter()
    raise TracingConfigError(
        f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r} is not supported; use one of "
        f"{', '.join(PROTOCOLS)}"
    )
