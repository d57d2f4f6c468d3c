"""Tracing switches and request records, without a server."""

from __future__ import annotations

import pytest

from service.observability.tracing import (
    RequestRecord,
    Tracing,
    TracingConfigError,
    phase,
    recording,
    tracing_requested,
)
from service.runtime.interface import Timings


@pytest.mark.parametrize(
    ("environ", "on"),
    [
        ({}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4317"}, True),
        ({"OTEL_TRACES_EXPORTER": "console"}, True),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}, False),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}, False),
    ],
)
def test_tracing_is_off_unless_the_environment_asks(environ, on):
    assert tracing_requested(environ) is on
    assert Tracing(environ).enabled is on


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER='zipkin' is not supported"),
        (
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
            "OTEL_EXPORTER_OTLP_PROTOCOL='http/json' is not supported; use one of grpc",
        ),
    ],
)
def test_unsupported_otel_settings_are_named(environ, message):
    with pytest.raises(TracingConfigError, match=message.replace("(", r"\(")):
        Tracing(environ)


def test_phases_and_engine_timings_line_up_on_the_wall_clock():
    record = RequestRecord(method="Chat")
    with recording(record), phase("tokenize"):
        pass
    record.finish(10, 5, Timings(queue_s=0.5, time_to_first_token_s=1.0, total_s=3.0), "stop")
    (_, _, tokenized), *engine = [record.phases[0], *record.engine_phases()]
    names = [name for name, _, _ in engine]
    assert names == ["queue", "prefill", "decode"]
    assert engine[0][1] == tokenized and engine[2][2] - engine[0][1] == 3_000_000_000
    assert record.time_per_output_token_s == pytest.approx(0.5)  # 2 s over 4 gaps
    with phase("outside"):  # no current record: nothing happens
        pass
