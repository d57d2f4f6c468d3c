"""The gRPC service end to end: a real server process, real clients, the embedded model."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time

import grpc
import pytest
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2
from nemotron.v1 import generation_pb2 as pb

from tests.service.server_process import WAIT_S, start_server, wait_ready

pytestmark = pytest.mark.slow

PARIS = [pb.ChatMessage(role=pb.ROLE_USER, content="What is the capital of France?")]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def test_streaming_chat_answers_and_unary_gives_the_same_text(server):
    stream = list(server.api.ChatStream(pb.ChatStreamRequest(messages=PARIS), timeout=120))
    streamed = "".join(m.content for m in stream)
    assert "Paris" in streamed
    assert stream[-1].finish_reason == pb.FINISH_REASON_STOP
    assert stream[-1].usage.prompt_tokens > 0 and stream[-1].usage.completion_tokens > 0
    assert stream[-1].timings.time_to_first_token_ms > 0
    unary = server.api.Chat(pb.ChatRequest(messages=PARIS), timeout=120)
    assert unary.content == streamed


def test_generate_stream_and_unary_agree_and_carry_token_ids(server):
    request = dict(
        prompt=pb.Prompt(text="The capital of France is"),
        limits=pb.GenerationLimits(max_new_tokens=6),
    )
    stream = list(server.api.GenerateStream(pb.GenerateStreamRequest(**request), timeout=60))
    unary = server.api.Generate(pb.GenerateRequest(**request), timeout=60)
    assert "".join(m.text for m in stream) == unary.text
    assert [t for m in stream for t in m.token_ids] == list(unary.token_ids)
    assert unary.finish_reason == pb.FINISH_REASON_LENGTH and len(unary.token_ids) == 6


def test_tokenize_model_info_and_stats(server):
    tokens = server.api.Tokenize(pb.TokenizeRequest(text="Hello world"), timeout=10)
    assert tokens.count == len(tokens.token_ids) > 0
    info = server.api.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    assert (info.profile, info.backend, info.tensor_parallel) == ("cpu", "torch", 1)
    assert info.engine_name == "torch-cpu-bf16-tp1" and info.max_context_tokens == 8192
    stats = server.api.GetEngineStats(pb.GetEngineStatsRequest(), timeout=10)
    assert stats.kv_blocks_total > 0 and stats.kv_bytes_per_token > 0


def _invalid(server, call, request):
    with pytest.raises(grpc.RpcError) as error:
        call(request, timeout=30)
    return error.value.code(), error.value.details()


def _bad_tool():
    parameters = struct_pb2.Struct()
    parameters.update({"type": "string"})
    return pb.Tool(name="lookup", description="d", parameters=parameters)


@pytest.mark.parametrize(
    ("name", "request_", "code", "detail"),
    [
        (
            "empty messages",
            pb.ChatRequest(),
            grpc.StatusCode.INVALID_ARGUMENT,
            "messages must not be empty",
        ),
        (
            "unknown role",
            pb.ChatRequest(messages=[pb.ChatMessage(content="hi")]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "messages[0].role: ROLE_UNSPECIFIED is not allowed",
        ),
        (
            "malformed tool schema",
            pb.ChatRequest(messages=PARIS, tools=[_bad_tool()]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "tools[0].parameters must be a JSON schema of type",
        ),
        (
            "top_p 7",
            pb.ChatRequest(messages=PARIS, sampling=pb.SamplingParams(top_p=7)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "top_p 7.0 is outside (0.0, 1.0]",
        ),
        (
            "max tokens -1",
            pb.ChatRequest(messages=PARIS, limits=pb.GenerationLimits(max_new_tokens=-1)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "max_new_tokens -1 is outside [1,",
        ),
        (
            "prompt beyond the context",
            pb.ChatRequest(messages=[pb.ChatMessage(role=pb.ROLE_USER, content="word " * 9000)]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "allowed: 1 to 8191",
        ),
        (
            "reasoning on a model without it",
            pb.ChatRequest(messages=PARIS, reasoning=pb.REASONING_MODE_ON),
            grpc.StatusCode.INVALID_ARGUMENT,
            "has no reasoning switch",
        ),
        (
            "oversized message",
            pb.ChatRequest(messages=[pb.ChatMessage(role=pb.ROLE_USER, content="x" * 5_000_000)]),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "larger than max",
        ),
    ],
)
def test_bad_input_gets_the_right_status_and_the_server_keeps_serving(
    server, name, request_, code, detail
):
    got_code, got_detail = _invalid(server, server.api.Chat, request_)
    assert got_code == code, (name, got_detail)
    assert detail in got_detail
    after = server.api.Generate(
        pb.GenerateRequest(
            prompt=pb.Prompt(text="Hi"), limits=pb.GenerationLimits(max_new_tokens=1)
        ),
        timeout=30,
    )
    assert len(after.token_ids) == 1


def _kv_free(server, timeout_s: float = WAIT_S) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stats = server.api.GetEngineStats(pb.GetEngineStatsRequest(), timeout=5)
        if stats.kv_blocks_used == 0 and stats.running_requests == 0:
            return True
        time.sleep(0.05)
    return False


def _long_request(tokens: int = 2000):
    return pb.GenerateStreamRequest(
        prompt=pb.Prompt(text="Count: one two three"),
        limits=pb.GenerationLimits(max_new_tokens=tokens, ignore_eos=True),
    )


def test_client_cancellation_frees_the_engines_kv(server):
    call = server.api.GenerateStream(_long_request(), timeout=120)
    for _, _message in zip(range(3), call, strict=False):
        pass
    stats = server.api.GetEngineStats(pb.GetEngineStatsRequest(), timeout=5)
    assert stats.kv_blocks_used > 0
    call.cancel()
    assert _kv_free(server)


def test_a_deadline_frees_the_engines_kv(server):
    with pytest.raises(grpc.RpcError) as error:
        list(server.api.GenerateStream(_long_request(), timeout=1.0))
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert _kv_free(server)


def test_abort_by_request_id_ends_the_stream(server):
    request = _long_request()
    request.request_id = "abort-me"
    call = server.api.GenerateStream(request, timeout=120)
    next(iter(call))
    assert server.api.Abort(pb.AbortRequest(request_id="abort-me"), timeout=5).aborted
    last = list(call)[-1]
    assert last.finish_reason == pb.FINISH_REASON_ABORTED
    assert not server.api.Abort(pb.AbortRequest(request_id="abort-me"), timeout=5).aborted


def _grpcurl(grpcurl, server, *args):
    result = subprocess.run(
        [grpcurl, "-plaintext", *args], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_real_grpcurl_lists_describes_calls_and_checks_health(server, grpcurl):
    services = _grpcurl(grpcurl, server, server.address, "list").split()
    assert {"nemotron.v1.GenerationService", "grpc.health.v1.Health"} <= set(services)
    described = _grpcurl(
        grpcurl, server, server.address, "describe", "nemotron.v1.GenerationService"
    )
    assert "rpc ChatStream" in described and "rpc GetEngineStats" in described
    body = json.dumps(
        {"prompt": {"text": "The capital of France is"}, "limits": {"max_new_tokens": 4}}
    )
    generated = json.loads(
        _grpcurl(
            grpcurl, server, "-d", body, server.address, "nemotron.v1.GenerationService/Generate"
        )
    )
    assert generated["finish_reason"] == "FINISH_REASON_LENGTH" and len(generated["token_ids"]) == 4
    health = json.loads(
        _grpcurl(
            grpcurl,
            server,
            "-d",
            '{"service": "readiness"}',
            server.address,
            "grpc.health.v1.Health/Check",
        )
    )
    assert health["status"] == "SERVING"  # grpcurl exits 0 either way: read the JSON


# Enough to be still running when the drain begins, few enough to finish well within the grace
# on a loaded machine (an idle CPU makes about 5 a second, a loaded one under 0.5: 200 did not
# fit in 240 s).
TOKENS_TO_DRAIN = 30


def test_health_watch_sees_startup_and_drain_while_liveness_stays_serving(
    cache_dir, cached_embedded_checkpoint
):
    server = start_server(cache_dir, "--grace-s", "240")  # generous: CI machines are slow
    seen: list[int] = []
    liveness: list[int] = []

    def watch() -> None:
        request = health_pb2.HealthCheckRequest(service="readiness")
        try:
            for response in server.health.Watch(request, timeout=300):
                seen.append(response.status)
                liveness.append(server.status("liveness"))
        except grpc.RpcError:
            pass  # the server went away

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    wait_ready(server)
    request = _long_request(TOKENS_TO_DRAIN)
    request.request_id = "drained"
    stream = server.api.GenerateStream(request, timeout=300)
    first = next(iter(stream))
    server.process.send_signal(signal.SIGTERM)
    rest = list(stream)  # drain lets the in-flight stream finish
    watcher.join(timeout=60)
    code = server.process.wait(timeout=120)
    assert seen[:2] == [NOT_SERVING, SERVING] and seen[-1] == NOT_SERVING
    assert set(liveness[:2]) == {SERVING}
    assert rest[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert len(first.token_ids) + sum(len(m.token_ids) for m in rest) == TOKENS_TO_DRAIN
    assert code == 0
    events = [(line["event"], line.get("request_id")) for line in server.log_lines()]
    # The stream was still running when the drain began, and finished inside it.
    assert events.index(("server_draining", None)) < events.index(("rpc_finished", "drained"))
    server.channel.close()
