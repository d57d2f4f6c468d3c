"""One API call's request id, log lines, span and metrics, whatever protocol carried it.

The gRPC wrapping (`service.server.rpc`) and the HTTP API (`service.openai`) each open a `Call`
per request: log lines inside it carry the request id and the trace ids, the span continues the
caller's W3C `traceparent`, and `end` records one metrics sample, one `rpc_finished` line and
the span's GenAI attributes. Outcomes are the canonical status codes (gRPC's names), whichever
protocol renders them to the client.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc

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

DEADLINE_SLACK_S = 0.25


@dataclass
class Observability:
    """The process's tracer, metrics and logging choices, shared by all calls."""

    tracing: Tracing = field(default_factory=lambda: Tracing({}))
    metrics: ServiceMetrics | None = None
    model: str = ""
    log_prompts: bool = False  # log request and response bodies (off: they may be private)
    cut_off_at: float | None = None  # monotonic time the drain's grace ends (None: serving)


class Call:
    """One API call in flight: its record, span and ids, until `end`."""

    def __init__(
        self,
        obs: Observability,
        method: str,
        request_id: str,
        headers: Mapping[str, str],
        span_name: str,
        deadline: float | None = None,
    ) -> None:
        self.obs, self.deadline = obs, deadline
        self.started = time.perf_counter()
        self.record = RequestRecord(method=method, request_id=request_id)
        self.span = obs.tracing.start_rpc_span(span_name, headers) if obs.tracing.enabled else None
        self.trace_id, self.span_id = (
            span_ids(self.span) if self.span is not None else caller_trace_ids(headers)
        )
        self.response_text: list[str] = []
        self.ended = False

    @contextmanager
    def active(self, request_body: Any = None) -> Iterator[None]:
        """Bind the call's ids to every log line and make its record current."""
        fields = {"request_id": self.record.request_id, "method": self.record.method}
        if self.trace_id:
            fields |= {"trace_id": self.trace_id, "span_id": self.span_id}
        with bind_request(**fields), recording(self.record):
            if self.obs.log_prompts and request_body is not None:
                log_event("rpc_request", body=request_body)
            yield

    def cancel_code(self) -> grpc.StatusCode:
        """What the client saw of a call that ended before its handler did: DEADLINE_EXCEEDED
        at its deadline, UNAVAILABLE when the drain's grace ran out (the server cut it off),
        else CANCELLED (the client went away).

        The client's clock runs out slightly before the server's copy of the deadline (it was
        sent as a timeout and started on arrival), so a cancellation close to it counts.
        """
        now = time.monotonic()
        if self.deadline is not None and now >= self.deadline - DEADLINE_SLACK_S:
            return grpc.StatusCode.DEADLINE_EXCEEDED
        if self.obs.cut_off_at is not None and now >= self.obs.cut_off_at - DEADLINE_SLACK_S:
            return grpc.StatusCode.UNAVAILABLE
        return grpc.StatusCode.CANCELLED

    def keep_text(self, *texts: str) -> None:
        """Keep response text for the log (only with --log-prompts)."""
        if self.obs.log_prompts:
            self.response_text.extend(t for t in texts if t)

    def end(
        self, code: grpc.StatusCode, message: str = "", attributes: Mapping[str, Any] = ()
    ) -> None:
        """Record the outcome once: metrics, the `rpc_finished` line, the span."""
        if self.ended:
            return
        self.ended = True
        duration = time.perf_counter() - self.started
        record = self.record
        if self.obs.metrics is not None:
            self.obs.metrics.observe(record, code.name, duration)
        if self.span is not None:
            self._end_span(code, message, dict(attributes))
        fields: dict[str, Any] = {"code": code.name, "duration_ms": round(duration * 1000, 2)}
        if record.operation:
            fields |= {
                "prompt_tokens": record.prompt_tokens,
                "completion_tokens": record.completion_tokens,
                "finish_reason": record.finish_reason,
            }
            if record.timings is not None:
                fields["ttft_ms"] = round(record.timings.time_to_first_token_s * 1000, 2)
            # The sampling that ran (the request's fields, else the model's defaults).
            attributes = record.request_attributes
            for name in ("temperature", "top_p"):
                if f"gen_ai.request.{name}" in attributes:
                    fields[name] = attributes[f"gen_ai.request.{name}"]
        if message:
            fields["error"] = message
        if self.obs.log_prompts and self.response_text:
            fields["output"] = "".join(self.response_text)
        level = logging.WARNING if code is grpc.StatusCode.INTERNAL else logging.INFO
        log_event("rpc_finished", level, **fields)

    def _end_span(self, code: grpc.StatusCode, message: str, attributes: dict[str, Any]) -> None:
        from opentelemetry.trace import Status, StatusCode

        span, record = self.span, self.record
        attributes["nemotron.request_id"] = record.request_id
        if record.operation:
            attributes |= self._gen_ai_attributes()
        span.set_attributes(attributes)
        if code is not grpc.StatusCode.OK:
            span.set_status(Status(StatusCode.ERROR, message or code.name))
        self.obs.tracing.add_phase_spans(span, record.phases + record.engine_phases())
        span.end()

    def _gen_ai_attributes(self) -> dict[str, Any]:
        record = self.record
        attributes: dict[str, Any] = {
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
            attributes["gen_ai.server.time_to_first_token"] = record.timings.time_to_first_token_s
            attributes["nemotron.queue_time"] = record.timings.queue_s
        per_token = record.time_per_output_token_s
        if per_token is not None:
            attributes["gen_ai.server.time_per_output_token"] = per_token
        return attributes
