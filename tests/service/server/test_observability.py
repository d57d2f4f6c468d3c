"""Tracing, logs and metrics of a real server: spans at a real OTLP receiver, JSON log lines
carrying request and trace ids (and no prompt text), Prometheus counters that move."""

from __future__ import annotations

import itertools
import json
import re
import urllib.request

import grpc
import pytest
from nemotron.v1 import generation_pb2 as pb

from bench.otlp_sink import start_receiver
from tests.service.server_process import start_server, stop_server, wait_ready, wait_until

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
PROMPT = "What is the capital of France? Reply briefly."


@pytest.fixture(scope="module")
def traced(cache_dir, cached_embedded_checkpoint):
    receiver, otlp_server, port = start_receiver()
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_SERVICE_NAME": "nemotron-under-test",
        "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=test",
    }
    server = start_server(cache_dir, env=env)
    wait_ready(server)
    yield server, receiver
    assert stop_server(server) == 0
    otlp_server.stop(None)


def _chat_stream(server, request_id: str, traceparent: str | None = None):
    metadata = [("traceparent", traceparent)] if traceparent else []
    request = pb.ChatStreamRequest(
        request_id=request_id,
        messages=[pb.ChatMessage(role=pb.ROLE_USER, content=PROMPT)],
        limits=pb.GenerationLimits(max_new_tokens=12),
    )
    return list(server.api.ChatStream(request, timeout=120, metadata=metadata))


def test_spans_join_the_callers_trace_with_phase_children(traced):
    server, receiver = traced
    _chat_stream(server, "traced-1", f"00-{TRACE_ID}-{CALLER_SPAN}-01")
    (rpc,) = receiver.wait_for(
        lambda s: (
            s.name == "nemotron.v1.GenerationService/ChatStream"
            and s.attributes.get("nemotron.request_id") == "traced-1"
        )
    )
    assert rpc.trace_id == TRACE_ID and rpc.parent_span_id == CALLER_SPAN
    assert rpc.resource["service.name"] == "nemotron-under-test"
    assert rpc.resource["deployment.environment"] == "test"
    a = rpc.attributes
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.request.model"] and a["gen_ai.response.id"] == "traced-1"
    assert a["gen_ai.usage.input_tokens"] > 0
    assert 0 < a["gen_ai.usage.output_tokens"] <= 12
    assert a["gen_ai.request.max_tokens"] == 12
    assert a["gen_ai.server.time_to_first_token"] > 0
    assert a["rpc.grpc.status_code"] == 0
    children = receiver.wait_for(lambda s: s.parent_span_id == rpc.span_id)
    by_name = {s.name: s for s in children}
    assert set(by_name) == {"tokenize", "queue", "prefill", "decode"}
    assert all(s.trace_id == TRACE_ID for s in children)
    order = [by_name[n] for n in ("tokenize", "queue", "prefill", "decode")]
    for before, after in itertools.pairwise(order):
        assert before.end_ns <= after.start_ns + 1_000_000  # in order, within a millisecond
    assert rpc.start_ns <= order[0].start_ns and order[-1].end_ns <= rpc.end_ns + 5_000_000


def test_a_prompt_of_token_ids_gets_the_engine_phase_spans_too(traced):
    server, receiver = traced
    request = pb.GenerateStreamRequest(
        request_id="ids-traced",
        prompt=pb.Prompt(token_ids=pb.TokenIds(ids=[1, 2, 3, 4])),
        limits=pb.GenerationLimits(max_new_tokens=3),
    )
    list(server.api.GenerateStream(request, timeout=60))
    (rpc,) = receiver.wait_for(lambda s: s.attributes.get("nemotron.request_id") == "ids-traced")
    children = receiver.wait_for(lambda s: s.parent_span_id == rpc.span_id)
    assert {s.name for s in children} == {"queue", "prefill", "decode"}  # no tokenize phase


def test_kserve_stream_requests_join_the_callers_trace_as_their_own_spans(traced):
    import numpy as np
    import tritonclient.grpc as triton

    server, receiver = traced
    text = triton.InferInput("text_input", [1, 1], "BYTES")
    text.set_data_from_numpy(np.array([[b"Hello"]], dtype=object))
    limit = triton.InferInput("max_tokens", [1, 1], "INT32")
    limit.set_data_from_numpy(np.array([[3]], dtype=np.int32))
    done = []
    with triton.InferenceServerClient(server.address) as client:
        client.start_stream(
            callback=lambda result, error: done.append((result, error)),
            headers={"traceparent": f"00-{TRACE_ID}-{CALLER_SPAN}-01"},
        )
        client.async_stream_infer("ensemble", [text, limit], request_id="kserve-traced")
        client.stop_stream()  # waits until the server has answered it
    assert done and done[-1][1] is None
    (rpc,) = receiver.wait_for(
        lambda s: (
            s.name == "inference.GRPCInferenceService/ModelStreamInfer"
            and s.attributes.get("nemotron.request_id") == "kserve-traced"
        )
    )
    assert rpc.trace_id == TRACE_ID and rpc.parent_span_id == CALLER_SPAN
    assert rpc.attributes["rpc.service"] == "inference.GRPCInferenceService"
    assert rpc.attributes["gen_ai.operation.name"] == "text_completion"
    children = receiver.wait_for(lambda s: s.parent_span_id == rpc.span_id)
    assert {s.name for s in children} == {"tokenize", "queue", "prefill", "decode"}


def test_a_call_without_traceparent_starts_its_own_trace_and_errors_mark_the_span(traced):
    server, receiver = traced
    _chat_stream(server, "traced-2")
    (rpc,) = receiver.wait_for(lambda s: s.attributes.get("nemotron.request_id") == "traced-2")
    assert rpc.parent_span_id == "" and rpc.trace_id != TRACE_ID
    bad = pb.ChatRequest(request_id="traced-bad")  # no messages: INVALID_ARGUMENT
    with pytest.raises(Exception):  # noqa: B017 - any RpcError; the span is what we check
        server.api.Chat(bad, timeout=30)
    (failed,) = receiver.wait_for(lambda s: s.attributes.get("nemotron.request_id") == "traced-bad")
    assert failed.attributes["rpc.grpc.status_code"] == 3 and failed.status_code == 2  # ERROR


def test_every_request_line_carries_request_and_trace_ids_and_no_prompt_text(traced):
    server, receiver = traced
    _chat_stream(server, "logged-1", f"00-{TRACE_ID}-{CALLER_SPAN}-01")
    (rpc,) = receiver.wait_for(lambda s: s.attributes.get("nemotron.request_id") == "logged-1")
    server.wait_for_log(
        lambda line: line.get("request_id") == "logged-1" and line["event"] == "rpc_finished",
        "rpc_finished of logged-1",
    )
    lines = server.log_lines()
    mine = [line for line in lines if line.get("request_id") == "logged-1"]
    assert mine, lines[-5:]
    finished = [line for line in mine if line["event"] == "rpc_finished"]
    assert len(finished) == 1
    line = finished[0]
    assert line["trace_id"] == TRACE_ID and line["span_id"] == rpc.span_id
    assert line["code"] == "OK" and line["method"] == "ChatStream" and line["completion_tokens"]
    assert {"time", "level"} <= set(line)
    assert all(line.get("trace_id") == TRACE_ID for line in mine)
    text = server.log_path.read_text()
    assert "capital of France" not in text  # prompts are not logged unless asked for
    assert all(line["event"] != "<not json>" for line in lines)


def _scrape(server) -> str:
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def _sample(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        match = re.match(rf"{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", line)
        if match and all(f'{k}="{v}"' in (match.group(1) or "") for k, v in labels.items()):
            return float(match.group(2))
    return 0.0


def test_metrics_are_scraped_over_http_and_move_as_requests_run(traced):
    server, _ = traced
    before = _scrape(server)
    assert "nemotron_engine_info{" in before and 'profile="cpu"' in before
    _chat_stream(server, "metered-1")
    long = server.api.GenerateStream(
        pb.GenerateStreamRequest(
            prompt=pb.Prompt(text="Count: one two three"),
            limits=pb.GenerationLimits(max_new_tokens=400, ignore_eos=True),
        ),
        timeout=120,
    )
    next(iter(long))
    during = _scrape(server)
    assert _sample(during, "nemotron_requests_running") == 1
    assert _sample(during, "nemotron_kv_cache_blocks_used") > 0
    assert 0 < _sample(during, "nemotron_kv_cache_usage_ratio") < 1
    long.cancel()
    code_ok = {"method": "ChatStream", "code": "OK"}
    cancelled = {"method": "GenerateStream", "code": "CANCELLED"}

    def settled() -> str | None:
        """The metrics once the cancelled stream is counted and nothing runs."""
        text = _scrape(server)
        counted = _sample(text, "nemotron_requests_total", **cancelled) > _sample(
            before, "nemotron_requests_total", **cancelled
        )
        return text if counted and _sample(text, "nemotron_requests_running") == 0 else None

    after = wait_until(settled, "the cancelled stream to be counted and the engine idle")
    assert (
        _sample(after, "nemotron_requests_total", **code_ok)
        == _sample(before, "nemotron_requests_total", **code_ok) + 1
    )
    assert (
        _sample(after, "nemotron_requests_total", **cancelled)
        == _sample(before, "nemotron_requests_total", **cancelled) + 1
    )
    streamed = {"method": "GenerateStream"}  # a cancelled stream's tokens still count
    assert _sample(after, "nemotron_generation_tokens_total", **streamed) > _sample(
        before, "nemotron_generation_tokens_total", **streamed
    )
    for name in (
        "nemotron_generation_tokens_total",
        "nemotron_prompt_tokens_total",
        "nemotron_time_to_first_token_seconds_count",
        "nemotron_inter_token_latency_seconds_count",
        "nemotron_request_duration_seconds_count",
    ):
        assert _sample(after, name, method="ChatStream") > _sample(
            before, name, method="ChatStream"
        )
    assert _sample(after, "nemotron_requests_running") == 0


def test_a_passed_deadline_is_recorded_as_deadline_exceeded_not_cancelled(traced):
    server, _ = traced
    labels = {"method": "GenerateStream", "code": "DEADLINE_EXCEEDED"}
    before = _sample(_scrape(server), "nemotron_requests_total", **labels)
    request = pb.GenerateStreamRequest(
        prompt=pb.Prompt(text="Count: one two three"),
        limits=pb.GenerationLimits(max_new_tokens=2000, ignore_eos=True),
    )
    with pytest.raises(grpc.RpcError) as error:
        list(server.api.GenerateStream(request, timeout=1.0))
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until(
        lambda: _sample(_scrape(server), "nemotron_requests_total", **labels) == before + 1,
        "the server to record DEADLINE_EXCEEDED",
        interval_s=0.2,
    )


def test_http_calls_continue_the_callers_trace_with_the_same_phase_children(traced):
    import httpx

    server, receiver = traced
    body = {
        "model": httpx.get(f"{server.http_url}/v1/models", timeout=30).json()["data"][0]["id"],
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 12,
        "stream": True,
    }
    headers = {"traceparent": f"00-{TRACE_ID}-{CALLER_SPAN}-01", "x-request-id": "traced-http"}
    with httpx.stream(
        "POST", f"{server.http_url}/v1/chat/completions", json=body, headers=headers, timeout=120
    ) as reply:
        assert reply.status_code == 200 and reply.headers["x-request-id"] == "traced-http"
        lines = list(reply.iter_lines())
    assert "data: [DONE]" in lines
    (span,) = receiver.wait_for(
        lambda s: (
            s.name == "POST /v1/chat/completions"
            and s.attributes.get("nemotron.request_id") == "traced-http"
        )
    )
    assert span.trace_id == TRACE_ID and span.parent_span_id == CALLER_SPAN
    a = span.attributes
    assert a["gen_ai.operation.name"] == "chat" and a["http.response.status_code"] == 200
    assert a["http.route"] == "/v1/chat/completions" and 0 < a["gen_ai.usage.output_tokens"] <= 12
    children = receiver.wait_for(lambda s: s.parent_span_id == span.span_id)
    assert {s.name for s in children} == {"tokenize", "queue", "prefill", "decode"}
    (line,) = server.wait_for_log(
        lambda line: (
            line.get("event") == "rpc_finished" and line.get("request_id") == "traced-http"
        ),
        "the HTTP call's log line",
    )
    assert line["trace_id"] == TRACE_ID and line["method"] == "/v1/chat/completions"
    assert PROMPT not in json.dumps(line)
    completion = {"model": body["model"], "prompt": PROMPT, "max_tokens": 4}
    httpx.post(
        f"{server.http_url}/v1/completions",
        json=completion,
        headers={"x-request-id": "traced-http-2"},
        timeout=120,
    ).raise_for_status()
    (span,) = receiver.wait_for(
        lambda s: s.attributes.get("nemotron.request_id") == "traced-http-2"
    )
    children = receiver.wait_for(lambda s: s.parent_span_id == span.span_id)
    assert {s.name for s in children} == {"tokenize", "queue", "prefill", "decode"}
